"""``loraplex train``: the command line over ``loraplex.train.trainer.train``.

Parses flags into ``TrainOptions``, runs the training, prints the adapter folder on stdout
(and with ``--push`` the new registry version ``N@vK`` and its sha256; with ``--eval-data``
too, the eval gate's report against the current stable, or the base if there is none, and
whether the version may be promoted). Ctrl-C exits 130
after saving a checkpoint; other loraplex errors (bad data, out of memory) are printed by
``loraplex.cli.main`` with a non-zero exit. torch, transformers and peft are imported only
when the command runs, so ``loraplex --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from loraplex.train.options import DEFAULT_TARGET_MODULES

_DEVICES = ("auto", "cpu", "cuda")


def train_command(
    data: Annotated[
        Path, typer.Option(help="Training data: JSONL of {input, output} or {messages}.")
    ],
    name: Annotated[str, typer.Option(help="Adapter name (a-z, 0-9, _ and -).")],
    base: Annotated[
        Path | None, typer.Option(help="HF base model folder (default: bundled).")
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="Held-out JSONL: eval loss, best checkpoint; with --push, the gate."),
    ] = None,
    push: Annotated[
        bool,
        typer.Option(
            help="Register the result as a new version (not promoted; gated with --eval-data)."
        ),
    ] = False,
    output: Annotated[
        Path | None, typer.Option(help="Adapter folder (default HOME/adapters/NAME).")
    ] = None,
    r: Annotated[int, typer.Option("--r", help="LoRA rank.")] = 16,
    alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).")] = 32,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names.")] = ",".join(
        DEFAULT_TARGET_MODULES
    ),
    epochs: Annotated[
        float | None, typer.Option(help="Passes over the data (default: auto, from data size).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    warmup_ratio: Annotated[
        float, typer.Option(help="Share of the steps spent warming the learning rate up.")
    ] = 0.03,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences per pass (default: auto, from data and memory).")
    ] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Gradient accumulation steps (default: auto).")
    ] = None,
    max_seq_len: Annotated[int, typer.Option(help="Longest example in tokens.")] = 2048,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same adapter).")] = 0,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps.")] = 50,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Trade compute for memory (default: on only if needed).",
        ),
    ] = None,
    packing: Annotated[
        bool | None,
        typer.Option(
            "--packing/--no-packing",
            help="Pack several examples into each row, attention kept within each example "
            "(default: on for CUDA when it saves at least 20% of the rows).",
        ),
    ] = None,
    fused_kernels: Annotated[
        bool | None,
        typer.Option(
            "--fused-kernels/--no-fused-kernels",
            help="Liger Kernel's fused RMSNorm, SwiGLU and linear + cross-entropy (default: on "
            "where installed, on CUDA).",
        ),
    ] = None,
    torch_compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the decoder layers (default: on for CUDA, off on CPU).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    prompt_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="chat or completion: how clients will prompt the adapter (default: chat if "
            "the base has a chat template; {input, output} rows become a user/assistant turn).",
        ),
    ] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    force: Annotated[
        bool, typer.Option(help="Replace an existing adapter or checkpoints.")
    ] = False,
) -> None:
    """Train a LoRA adapter with PEFT on the base model; prints the adapter folder."""
    from loraplex.errors import InvalidRequest
    from loraplex.train.options import TrainOptions
    from loraplex.train.trainer import Interrupted, train

    if device not in _DEVICES:
        raise InvalidRequest(f"--device {device}: use one of {', '.join(_DEVICES)}.")
    chosen: Literal["auto", "cpu", "cuda"] = device  # type: ignore[assignment]
    opts = TrainOptions(
        data=data,
        name=name,
        base=base,
        eval_data=eval_data,
        output=output,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        warmup_ratio=warmup_ratio,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_seq_len=max_seq_len,
        seed=seed,
        save_steps=save_steps,
        gradient_checkpointing=gradient_checkpointing,
        packing=packing,
        fused_kernels=fused_kernels,
        torch_compile=torch_compile,
        device=chosen,
        prompt_format=prompt_format,  # type: ignore[arg-type]  # checked by opts.check()
        resume=resume,
        force=force,
    )
    try:
        result = train(opts)
    except Interrupted as exc:
        typer.secho(exc.message, fg="yellow", err=True)
        raise typer.Exit(130) from exc
    figures = result.manifest["results"]
    summary = f"train loss {figures['final_train_loss']:.4f}"
    if figures.get("eval_loss") is not None:
        summary += f", eval loss {figures['eval_loss_before']:.4f} -> {figures['eval_loss']:.4f}"
    hyper = result.manifest["hyperparameters"]
    summary += f", {hyper['steps']} steps, trained for {result.manifest['prompt_format']} prompts"
    typer.echo(f"{name}: {summary}, {figures['seconds']:.0f}s", err=True)
    typer.echo(str(result.path))
    if push:
        from loraplex.registry.registry import open_registry

        pushed = open_registry().push(result.path, name, description="loraplex train")
        typer.echo(f"{pushed.version.key} {pushed.version.sha256}")
        if eval_data is not None:
            from loraplex.evals.cli import run_gate
            from loraplex.evals.gate import DEFAULT_MAX_DROP

            typer.echo(f"eval gate: {pushed.version.key} on {eval_data}", err=True)
            run_gate(pushed.version.key, eval_data, None, DEFAULT_MAX_DROP)
