"""The ``loraplex`` command: model, adapters, tenants, keys, usage, train, serve, bench.

Each sub-command lives beside the code it drives; this module only wires them together and
turns loraplex errors into a one-line message and a non-zero exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraplex.client.bench.cli import bench_command
from loraplex.config import Settings
from loraplex.evals.cli import eval_command
from loraplex.registry.accounts_cli import keys_app, tenants_app, usage_command
from loraplex.registry.cli import adapters_app
from loraplex.server.serve_cli import serve_command
from loraplex.train.cli import train_command

app = typer.Typer(
    help="Serve many LoRA adapters over one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(adapters_app, name="adapters")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.command("usage")(usage_command)
app.command("serve")(serve_command)
app.command("bench")(bench_command)
app.command("train")(train_command)
app.command("eval")(eval_command)


@model_app.command("prepare")
def model_prepare(
    base: Annotated[Path | None, typer.Option(help="Use this HF model folder as the base.")] = None,
) -> None:
    """Prepare the base model (bundled SmolLM2 by default) and print its folder."""
    from loraplex.basemodel import prepare

    settings = Settings()
    info = prepare(settings.models_dir, base or settings.base_model)
    typer.echo(f"fingerprint {info.fingerprint}", err=True)
    typer.echo(str(info.path))


def main() -> None:
    """Entry point that prints loraplex errors as one line instead of a traceback."""
    from loraplex.errors import LoraplexError

    try:
        app()
    except LoraplexError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
