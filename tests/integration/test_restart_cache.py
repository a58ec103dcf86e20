"""A restart with the same settings loads the compiled model from vLLM's compile cache.

The session ``server`` (compiled, ``enforce_eager=False``) compiled the model and saved it
under its home's ``compile-cache``; a second server with the same settings and that cache must
log that it loaded the compiled artifacts, not that it compiled again, and answer exactly as
the server that compiled (greedy, fp32: base model and an adapter).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from loraplex.testing.launcher import RunningServer, loraplex_server, server_env

pytestmark = pytest.mark.integration

LOADED = "Directly load AOT compilation from path"
"""What vLLM logs when it loads the compiled model from its cache."""
RECOMPILED = "Compiling model again due to a load failure"


def _complete(url: str, model: str) -> str:
    response = httpx.post(
        url + "/v1/completions",
        json={
            "model": model,
            "prompt": "The capital of France is",
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_second_start_loads_compiled_model_from_cache(
    server: RunningServer,
    tmp_path: Path,
    base_model_dir: Path,
    adapters_dir: Path,
) -> None:
    first_home = server.log_path.parent  # the session server's home (conftest)
    cache = first_home / "compile-cache"
    assert list(cache.glob("torch_compile_cache/torch_aot_compile/*/rank_0_0/model")), (
        "the compiled server saved no compiled model"
    )
    env = server_env(
        tmp_path,
        base_model_dir,
        adapters_dir=adapters_dir,
        served_model_name=server.base,  # type: ignore[attr-defined]
        enforce_eager=False,
    )
    env["VLLM_CACHE_ROOT"] = str(cache)
    with loraplex_server(tmp_path / "server.log", env=env) as second:
        log = second.log_path.read_text(errors="replace")
        assert LOADED in log, second.log_tail(80)
        assert RECOMPILED not in log, second.log_tail(80)
        for model in (server.base, "pirate"):  # type: ignore[attr-defined]
            assert _complete(second.url, model) == _complete(server.url, model)
