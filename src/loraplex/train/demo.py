"""Train the demo adapters that ship with loraplex: ``pirate`` and ``shout``.

``python -m loraplex.train.demo --out DIR`` trains both on the bundled base model from the
chat datasets in ``loraplex/demo/`` (package data), each in a couple of minutes on two CPU
cores, deterministically (fixed seed). ``pirate`` answers starting "Arr, matey!" in pirate
speak; ``shout`` answers in capital letters. An adapter whose folder already has a
``loraplex.json`` with the same data sha256, base fingerprint and recipe is skipped. The folders
are ``DIR/pirate`` and ``DIR/shout`` (default DIR: the adapters folder under LORAPLEX_HOME).
"""

from __future__ import annotations

import hashlib
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from loraplex.config import Settings
from loraplex.train import manifest
from loraplex.train.options import TrainOptions

DEMOS = ("pirate", "shout")
# Chosen so that each adapter visibly changes everyday answers within ~2 minutes on 2 cores.
_COMMON = {"batch_size": 8, "grad_accum": 1, "seed": 0, "save_steps": 1000}
# shout: capital-letter tokens are rare for a 135M model, so it shouts reliably but may get
# facts wrong; longer training (4 epochs, or lr 2e-3) did not fix the facts either.
DEMO_HYPERPARAMETERS: dict[str, dict] = {
    "pirate": {**_COMMON, "lr": 1e-3, "epochs": 2.0},
    "shout": {**_COMMON, "lr": 1e-3, "epochs": 2.0},
}
_RECIPE_KEYS = ("lr", "epochs", "seed", "batch_size", "grad_accum")


def demo_data(name: str) -> tuple[Path, Path]:
    """The packaged train and eval files of one demo adapter."""
    folder = resources.files("loraplex") / "demo"
    train, held_out = folder / f"{name}.jsonl", folder / f"{name}-eval.jsonl"
    return Path(str(train)), Path(str(held_out))


def is_current(folder: Path, name: str, data: Path, fingerprint: str) -> bool:
    """True if ``folder`` holds this demo trained on these exact data, base and recipe."""
    doc = manifest.read(folder)
    if doc is None or not (folder / "adapter_model.safetensors").is_file():
        return False
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    train = (doc.get("data") or {}).get("train") or {}
    hyper = doc.get("hyperparameters") or {}
    recipe = DEMO_HYPERPARAMETERS[name]
    return (
        train.get("sha256") == sha
        and (doc.get("base") or {}).get("fingerprint") == fingerprint
        and all(hyper.get(key) == recipe[key] for key in _RECIPE_KEYS)
    )


def build_demos(
    out: Path, base: Path | None = None, names: tuple[str, ...] = DEMOS, show_progress: bool = True
) -> dict[str, Path]:
    """Train (or keep) each demo adapter under ``out``; their folders by name."""
    from loraplex.basemodel import prepare
    from loraplex.train.trainer import train

    settings = Settings()
    info = prepare(settings.models_dir, base or settings.base_model)
    folders = {}
    for name in names:
        data, held_out = demo_data(name)
        folder = out / name
        if is_current(folder, name, data, info.fingerprint):
            print(f"{name}: up to date in {folder}", file=sys.stderr)
        else:
            opts = TrainOptions(
                data=data,
                eval_data=held_out,
                name=name,
                base=info.path,
                output=folder,
                force=True,
                show_progress=show_progress,
                **DEMO_HYPERPARAMETERS[name],
            )
            result = train(opts, settings)
            losses = result.manifest["results"]
            print(
                f"{name}: trained into {folder} (eval loss {losses['eval_loss_before']:.3f} -> "
                f"{losses['eval_loss']:.3f}, {losses['seconds']:.0f}s)",
                file=sys.stderr,
            )
        folders[name] = folder
    return folders


def main(
    out: Annotated[
        Path | None, typer.Option(help="Folder to write DIR/pirate and DIR/shout into.")
    ] = None,
    base: Annotated[
        Path | None, typer.Option(help="HF base model folder (default: bundled).")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Train only this demo (repeatable).")
    ] = None,
) -> None:
    """Train the demo adapters (skips those already trained on the same data and base)."""
    names = tuple(only or DEMOS)
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise typer.BadParameter(f"unknown demo {', '.join(unknown)}; choose from {DEMOS}")
    out = (out or Settings().resolved_adapters_dir).expanduser()
    for name, folder in build_demos(out, base, names).items():
        typer.echo(f"{name}\t{folder}")


if __name__ == "__main__":
    from loraplex.errors import LoraplexError

    try:
        typer.run(main)
    except LoraplexError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        raise SystemExit(2) from exc
