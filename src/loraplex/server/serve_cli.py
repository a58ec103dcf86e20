"""``loraplex serve``: settings from flags, environment and loraplex.toml, then uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from loraplex.config import Settings


def serve_command(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    base_model: Annotated[Path | None, typer.Option("--base", help="HF base model folder.")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help="Folder of PEFT adapters.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name of the base model.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto|bfloat16|float16|float32")] = None,
    max_loras: Annotated[int | None, typer.Option(help="Adapters in one batch.")] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(help="Adapters kept in CPU cache.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest adapter rank.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length in tokens.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Sequences batched at once.")] = None,
    kv_cache_gib: Annotated[int | None, typer.Option(help="KV cache GiB (CPU).")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="GPU share.")] = None,
    auth: Annotated[str | None, typer.Option(help="on|off: require tenant keys.")] = None,
    fast_lora: Annotated[str | None, typer.Option(help="on|off: loraplex's CPU LoRA ops.")] = None,
) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API."""
    overrides = {k: v for k, v in locals().items() if v is not None}
    import uvicorn

    from loraplex.server.app import create_app

    settings = Settings(**overrides)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("loraplex.server")
    if settings.auth == "on":
        raise typer.BadParameter(
            "auth=on needs tenant keys, which this version does not implement yet; "
            "serve with --auth off (LORAPLEX_AUTH=off) on a trusted network only."
        )
    log.warning("authentication is OFF: every caller may use every adapter (local use only)")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
