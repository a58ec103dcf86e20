"""Shared parts of the benchmark scenarios: random adapters, servers, results, README table.

Scenarios (``gateway_overhead``, ``adapter_scaling``, ``fast_lora``, ``noisy_neighbour``)
start what they need with these helpers, drive it, and write JSON (+ PNG) under
``bench/results/``. Servers run as child processes (``loraplex.testing.launcher``), one at a
time, with the same engine settings for loraplex and for vLLM's own OpenAI server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.client.bench.report import build_report, machine_info
from loraplex.client.bench.runner import BenchConfig, run_bench
from loraplex.testing.launcher import (
    RunningServer,
    reserved_port,
    running_server,
)
from loraplex.testing.launcher import (
    loraplex_server as launch_loraplex,
)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
SCRATCH = RESULTS / "tmp"
SERVED_NAME = "smollm2-135m"


@dataclass
class Engine:
    """Engine settings given identically to loraplex and to vLLM."""

    base: Path
    dtype: str = "bfloat16"
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16
    max_model_len: int = 1024
    max_num_seqs: int = 32
    kv_cache_gib: int = 1
    fast_lora: str = "on"
    """loraplex's CPU LoRA ops (a vLLM platform plugin installed with loraplex): it applies to
    vLLM's own server in the same environment too, so both get the same value."""
    cpu_worker: str = "inline"
    """Where the model runs on CPU (loraplex's ``--cpu-worker``); vLLM's own server gets the
    same layout (``inline``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that a comparison
    measures the gateways, not the layouts."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}

    def in_process_llm(self) -> Any:
        """vLLM's ``LLM`` on these settings in this process (no engine-core process), eager."""
        import os

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        from vllm import LLM

        return LLM(
            model=str(self.base),
            dtype=self.dtype,
            enable_lora=True,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            seed=0,
            enforce_eager=True,
        )


def base_model_dir() -> Path:
    """The prepared bundled base model (prepared now if missing)."""
    from loraplex.basemodel import prepare
    from loraplex.config import Settings

    settings = Settings()
    return prepare(settings.models_dir, settings.base_model).path


def make_adapters(base: Path, count: int, rank: int, targets: list[str], seed: int = 0) -> Path:
    """``count`` random PEFT LoRA adapters (bf16) named ``bench-000``...; cached by settings."""
    from loraplex.testing.random_adapters import make_random_adapters

    folder = SCRATCH / f"adapters-r{rank}-{'-'.join(targets)}-s{seed}"
    make_random_adapters(
        base,
        [path for _, path in adapter_paths(folder, count)],
        seed=seed,
        rank=rank,
        targets=targets,
        dtype="bfloat16",
        skip_existing=True,
    )
    return folder


def adapter_paths(folder: Path, count: int) -> list[tuple[str, Path]]:
    """(name, folder) of the first ``count`` adapters made by ``make_adapters``."""
    return [(f"bench-{i:03d}", folder / f"bench-{i:03d}") for i in range(count)]


def loraplex_server(engine: Engine, adapters_dir: Path, log: Path, extra_env: dict | None = None):
    """Context manager: ``loraplex serve`` on a free port, auth off, these adapters."""
    env = {
        "LORAPLEX_AUTH": "off",
        "LORAPLEX_ADAPTERS_DIR": str(adapters_dir),
        "LORAPLEX_BASE_MODEL": str(engine.base),
        "LORAPLEX_SERVED_MODEL_NAME": SERVED_NAME,
        **{f"LORAPLEX_{k.upper()}": str(v) for k, v in engine.describe().items() if k != "base"},
        **(extra_env or {}),
    }
    return launch_loraplex(log, env=env, timeout=900)


def vllm_command(
    engine: Engine,
    port: int,
    adapters: Sequence[tuple[str, Path]] = (),
    enable_lora: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's own OpenAI server with ``engine``'s settings (LoRA slots only when enabled)."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(engine.base), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", engine.dtype,
        "--max-model-len", str(engine.max_model_len), "--max-num-seqs", str(engine.max_num_seqs),
        "--seed", "0", "--disable-log-stats",
    ]  # fmt: skip
    if enable_lora:
        command += ["--enable-lora", "--max-loras", str(engine.max_loras)]
        command += ["--max-cpu-loras", str(engine.max_cpu_loras)]
        command += ["--max-lora-rank", str(engine.max_lora_rank)]
    if adapters:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
    return command + list(extra)


@contextmanager
def vllm_server(
    engine: Engine,
    adapters: Sequence[tuple[str, Path]],
    log: Path,
    enable_lora: bool = True,
    extra: Sequence[str] = (),
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> Iterator[RunningServer]:
    """vLLM's own OpenAI server with the same engine settings and adapters, until the block
    ends; ``env`` adds to its environment."""
    server_env = {
        **(env or {}),
        "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
        "LORAPLEX_FAST_LORA": engine.fast_lora,
    }
    if engine.cpu_worker == "inline":
        server_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        server_env["OMP_NUM_THREADS"] = os.environ.get(
            "OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)))
        )  # unset, vLLM would run the model on one thread (as loraplex's engine_args says)
    with reserved_port() as port:
        command = vllm_command(engine, port, adapters, enable_lora, extra)
        url = f"http://127.0.0.1:{port}"
        with running_server(
            command, log, url=url, env=server_env, ready_path="/health", timeout=timeout
        ) as server:
            yield server


def measure(url: str, **settings: Any) -> dict[str, Any]:
    """One benchmark run against ``url``; returns its report."""
    return build_report(run_bench(BenchConfig(url=url, **settings)))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing or b is zero."""
    return None if a is None or not b else round(a / b, 3)


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (with the machine it ran on) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"scenario": name, "machine": machine_info(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def update_readme(section: str, markdown: str) -> None:
    """Replace the text between ``<!-- section -->`` and ``<!-- /section -->`` in README.md."""
    readme = BENCH_DIR / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    if start not in text or end not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}", encoding="utf-8")


def machine_line() -> str:
    """One line naming the machine, for the README tables."""
    m = machine_info()
    return f"{m['cpu'] or 'unknown CPU'}, {m['cpu_count']} cores, {m['platform']}"


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """Flags every server scenario shares: dtype, endpoint, ignore-eos, fast LoRA."""
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--endpoint", choices=["chat", "completion"], default="chat")
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="fixed output length (servers that honour vLLM's ignore_eos)",
    )
    parser.add_argument(
        "--fast-lora",
        choices=["on", "off"],
        default="on",
        help="loraplex's CPU LoRA ops, given to every server alike",
    )
