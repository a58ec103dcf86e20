"""Run a test file as a vLLM engine script in a subprocess (vLLM starts processes of its own,
and each engine needs a fresh interpreter): ``python SCRIPT ARGS... OUT_JSON``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any


def run_engine_script(script: str, args: list[str], tmp_path: Path, **env: str) -> tuple[Any, str]:
    """The JSON the script wrote and its log; fast LoRA on and a 1 GiB KV cache unless ``env``
    says otherwise. Fails the test, with the log's end, when the script fails."""
    out = tmp_path / f"{Path(script).stem}-{uuid.uuid4().hex[:8]}.json"
    full_env = {**os.environ, "LORAPLEX_FAST_LORA": "on", "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    full_env.pop("VLLM_TARGET_DEVICE", None)  # vLLM skips platform plugins when it is set
    proc = subprocess.run(
        [sys.executable, script, *args, str(out)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text()), log
