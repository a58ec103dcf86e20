"""``loraplex serve``: flags generated from Settings, bind before loading, one-line errors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import typer.main

from loraplex.cli import app
from loraplex.config import Settings, SettingsError, load_settings
from loraplex.errors import LoraplexError
from loraplex.server.serve_cli import (
    RAY_PARAMETERS,
    PortUnavailable,
    bind_socket,
    check_exposure,
)


def serve_flags() -> dict[str, list[str]]:
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {param.name: param.opts for param in command.params if param.name != "help"}


def test_every_setting_is_a_serve_flag() -> None:
    flags = serve_flags()
    assert set(flags) == set(Settings.model_fields) | {p.name for p in RAY_PARAMETERS}
    assert flags["replicas"] == ["--replicas"]
    assert flags["max_cpu_loras"] == ["--max-cpu-loras"]
    assert "--base" in flags["base_model"]


def run_serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **env},
    )


def test_taken_port_is_one_line_error_before_loading() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--port", str(port))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use. Stop what uses it, "
        "or choose another --port (--port 0 picks a free one)."
    ]
    assert "listening" not in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LORAPLEX_PORT": "99999"}, "--port / LORAPLEX_PORT=99999"),
        ({"LORAPLEX_FAST_LORA": "fast"}, "--fast-lora / LORAPLEX_FAST_LORA=fast"),
        ({"LORAPLEX_MAX_LORAS": "40"}, "max_cpu_loras (32) must be >= max_loras (40)"),
    ],
)
def test_bad_setting_is_one_line_error(env: dict[str, str], message: str) -> None:
    result = run_serve(**env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: invalid setting") and message in line


def test_bad_flag_value_is_a_usage_error() -> None:
    result = run_serve("--max-loras", "many")
    assert result.returncode == 2 and "--max-loras" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_settings_names_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_KV_CACHE_GIB", "0")
    with pytest.raises(SettingsError, match="--kv-cache-gib / LORAPLEX_KV_CACHE_GIB=0"):
        load_settings()
    assert load_settings(kv_cache_gib=3).kv_cache_gib == 3  # a flag beats the environment


def test_bind_socket_port_zero_and_taken_port() -> None:
    with bind_socket("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        assert port != 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens already
        with pytest.raises(PortUnavailable, match=f"127.0.0.1:{port}: Address already in use"):
            bind_socket("127.0.0.1", port)


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """engine_args sets vLLM's variables in os.environ; put them back after the test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.usefixtures("restored_environ")
def test_kv_cache_setting_always_reaches_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    from loraplex.engine.vllm_engine import engine_args

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    args = engine_args(Settings(kv_cache_gib=1, max_loras=2, max_cpu_loras=3), "/model")
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert (args.max_loras, args.max_cpu_loras) == (2, 3)


@pytest.mark.parametrize(
    ("cpu_worker", "bind", "inline"),
    [
        ("auto", None, True),
        ("auto", "0-3", False),  # a core binding (Ray Serve replicas) needs vLLM's worker process
        ("inline", "0-3", True),
        ("process", None, False),
    ],
)
@pytest.mark.usefixtures("restored_environ")
def test_where_the_model_runs_on_cpu(
    monkeypatch: pytest.MonkeyPatch, cpu_worker: str, bind: str | None, inline: bool
) -> None:
    pytest.importorskip("vllm")
    from loraplex.engine.vllm_engine import engine_args, inline_cpu_worker

    if bind is None:
        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert inline_cpu_worker(cpu_worker) is inline
    engine_args(Settings(cpu_worker=cpu_worker), "/model")  # type: ignore[arg-type]
    # vLLM's CPU platform keeps its in-process executor only with multiprocessing off
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == ("0" if inline else "1")


@pytest.mark.usefixtures("restored_environ")
def test_an_inline_model_gets_every_usable_core_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset, vLLM would give the process that runs the model one torch thread."""
    pytest.importorskip("vllm")
    from loraplex.engine.vllm_engine import engine_args

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    engine_args(Settings(cpu_worker="inline"), "/model")
    assert os.environ["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    engine_args(Settings(cpu_worker="inline"), "/model")
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_auth_off_on_a_public_address_is_refused() -> None:
    result = run_serve("--host", "0.0.0.0", "--auth", "off", "--port", "0")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "Refusing to serve 0.0.0.0 with auth off" in line and "--allow-insecure-no-auth" in line


@pytest.mark.parametrize(
    ("host", "auth", "insecure", "refused"),
    [
        ("0.0.0.0", "off", False, True),
        ("0.0.0.0", "off", True, False),
        ("0.0.0.0", "on", False, False),
        ("127.0.0.1", "off", False, False),
        ("localhost", "off", False, False),
        ("::1", "off", False, False),
    ],
)
def test_exposure_check(host: str, auth: str, insecure: bool, refused: bool) -> None:
    settings = Settings(host=host, auth=auth, allow_insecure_no_auth=insecure)  # type: ignore[arg-type]
    if refused:
        with pytest.raises(LoraplexError, match="Refusing"):
            check_exposure(settings)
    else:
        check_exposure(settings)


def test_settings_over_the_memory_budget_refuse_to_start() -> None:
    result = run_serve("--port", "0", LORAPLEX_MEMORY_BUDGET_GIB="0.5")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: memory budget exceeded: these settings need ")
    assert "1.00 GiB adapter cache (--adapter-cache-mb 1024)" in line
    assert "more than the memory budget 0.50 GiB (--memory-budget-gib)" in line
    assert "listening" not in result.stdout


def test_autoscaling_config_is_checked_before_ray_starts() -> None:
    pytest.importorskip("ray.serve")
    from loraplex.server.ray_serve import autoscaling_config
    from loraplex.server.serve_cli import serve_ray

    config = '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}'
    assert autoscaling_config(config)["max_replicas"] == 4
    for text, message in [
        ("{min_replicas: 1}", "not JSON"),
        ("[1, 4]", "a JSON object"),
        ('{"min_replica": 1}', "unknown fields ['min_replica']"),
        ('{"min_replicas": 3, "max_replicas": 2}', "must be greater than or equal"),
    ]:
        with pytest.raises(LoraplexError, match=re.escape(message)):
            autoscaling_config(text)
    with pytest.raises(LoraplexError, match="exclude each other"):
        serve_ray(Settings(), 2, config, None, None)
