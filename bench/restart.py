"""Restart time: ``loraplex serve`` started twice with the same settings in a fresh compile cache.

The first (cold) start compiles the model with torch.compile and saves it in vLLM's compile
cache; the second (warm) start should load it from there. Prints seconds to ready for both,
their ratio, and whether the warm start loaded the compiled model (its log says so), and
writes ``bench/results/restart.json``. Run it on a quiet machine: start times under load say
little. ``--eager`` adds a start without torch.compile, the floor a warm start can reach;
``--process`` a start with vLLM's own CPU layout (``cpu_worker=process``: a worker process of
its own, one more to spawn) beside loraplex's default (the model in a forked engine core); its
engine core is spawned, and vLLM's compile cache key holds the start method, so it compiles.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex.testing.launcher import loraplex_server, server_env

RESULTS = Path(__file__).resolve().parent / "results"
LOADED = "Directly load AOT compilation from path"
RECOMPILED = "Compiling model again due to a load failure"


def start_once(root: Path, name: str, base: Path, cache: Path, **settings: object) -> dict:
    """Start one server (own home, shared compile ``cache``) until ready; its timings."""
    home = root / name
    home.mkdir()
    env = server_env(home, base, **settings)
    env["VLLM_CACHE_ROOT"] = str(cache)
    with loraplex_server(home / "server.log", env=env, timeout=1800) as server:
        seconds = server.startup_seconds
    log = (home / "server.log").read_text(errors="replace")
    return {
        "seconds_to_ready": round(seconds, 1),
        "loaded_compiled_model": LOADED in log,
        "recompiled_after_load_failure": RECOMPILED in log,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action="store_true", help="also time an eager start")
    parser.add_argument(
        "--process", action="store_true", help="also time a warm start with cpu_worker=process"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "restart.json")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so started servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from loraplex.basemodel import prepare
    from loraplex.config import Settings

    base = prepare(Settings().home / "models").path
    settings: dict[str, Any] = {"dtype": args.dtype, "enforce_eager": False}
    with tempfile.TemporaryDirectory(prefix="loraplex-restart-") as scratch:
        root = Path(scratch)
        cache = root / "compile-cache"
        runs = {
            "cold": start_once(root, "cold", base, cache, **settings),
            "warm": start_once(root, "warm", base, cache, **settings),
        }
        if args.process:
            runs["warm_process"] = start_once(
                root, "warm_process", base, cache, **settings, cpu_worker="process"
            )
        if args.eager:
            runs["eager"] = start_once(root, "eager", base, cache, dtype=args.dtype)
    cold, warm = runs["cold"]["seconds_to_ready"], runs["warm"]["seconds_to_ready"]
    result = {
        "benchmark": "restart",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "runs": runs,
        "warm_over_cold": round(warm / cold, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cold start: {cold:.1f} s to ready (compiled and saved the model)")
    loaded = "loaded the compiled model" if runs["warm"]["loaded_compiled_model"] else "COMPILED"
    print(f"warm start: {warm:.1f} s to ready ({loaded})")
    if "warm_process" in runs:
        seconds = runs["warm_process"]["seconds_to_ready"]
        print(f"warm start, cpu_worker=process: {seconds:.1f} s to ready")
    if "eager" in runs:
        print(f"eager start: {runs['eager']['seconds_to_ready']:.1f} s to ready (no compile)")
    print(f"warm / cold: {warm / cold:.2f}  ->  {args.out}")


if __name__ == "__main__":
    main()
