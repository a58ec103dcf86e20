"""One training run: data -> PEFT LoRA on the base model -> adapter folder + manifest.

``train(options)`` validates the whole data file first (nothing trains on a bad file), loads
the base model (bf16 on a CUDA device that supports it, fp32 on CPU), wraps it with a PEFT
LoRA, and runs the transformers ``Trainer`` with checkpoints in ``OUTPUT/.checkpoints``.
``--resume`` continues from the last checkpoint, after checking that data, base and
hyperparameters are the ones it was started with. Batch, accumulation, epochs and warmup
not given are chosen from the dataset size (``loraplex.train.schedule``), printed, and
recorded; with ``--eval-data`` the saved adapter is the checkpoint of lowest eval loss. The
prompt format (chat or completion) is recorded as ``prompt_format``. The finished folder holds
``adapter_config.json``, ``adapter_model.safetensors`` and ``loraplex.json`` (written last).
Device, model and Trainer set-up live in ``loraplex.train.runtime``, batch planning in
``loraplex.train.memory``; this module does not parse command lines.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraplex.basemodel import prepare
from loraplex.config import Settings
from loraplex.errors import Conflict, InvalidRequest
from loraplex.train import manifest, memory, packing, runtime, schedule
from loraplex.train.data import DataError
from loraplex.train.encode import Encoded, Encoder, encode_file, resolve_format
from loraplex.train.options import TrainOptions
from loraplex.train.runtime import Interrupted, OutOfMemory

__all__ = ["Interrupted", "OutOfMemory", "TrainResult", "train"]

CHECKPOINTS = ".checkpoints"
RUN_FILE = "loraplex-run.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", manifest.MANIFEST_FILE)


@dataclass(frozen=True)
class TrainResult:
    """Where the adapter went and what its manifest says."""

    path: Path
    manifest: dict[str, Any]


def _prepare_output(opts: TrainOptions, output: Path) -> Path | None:
    """Check the output folder against --resume/--force; the checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = output / CHECKPOINTS
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if opts.resume:
        if last is None:
            raise InvalidRequest(
                f"--resume: {ckpt_dir} holds no checkpoint to continue from; run without --resume."
            )
        return Path(last)
    if opts.force:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        for name in ADAPTER_FILES:
            (output / name).unlink(missing_ok=True)
        return None
    if (output / manifest.MANIFEST_FILE).is_file():
        raise Conflict(
            f"{output} already holds a trained adapter; pass --force to replace it "
            "or --output to write elsewhere."
        )
    if last is not None:
        raise Conflict(
            f"{output} has checkpoints of an unfinished run; pass --resume to continue it "
            "or --force to start over."
        )
    return None


def _read_data(
    opts: TrainOptions, encoder: Encoder
) -> tuple[Any, list[Encoded], Any, list[Encoded]]:
    """Encode train and eval files, reporting the bad lines of both together."""
    problems: list[DataError] = []
    results: list[Any] = []
    for path in (opts.data, opts.eval_data):
        if path is None:
            results.append((None, []))
            continue
        try:
            results.append(encode_file(encoder, path, opts.max_seq_len))
        except DataError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidRequest("\n".join(p.message for p in problems))
    (train_ds, train_items), (eval_ds, eval_items) = results
    return train_ds, train_items, eval_ds, eval_items


def _run_record(opts: TrainOptions, fingerprint: str, train_ds: Any, eval_ds: Any) -> dict:
    return {
        "name": opts.name,
        "base_fingerprint": fingerprint,
        "data_sha256": train_ds.sha256,
        "eval_data_sha256": eval_ds.sha256 if eval_ds else None,
        "hyperparameters": opts.hyperparameters(),
    }


def _check_resume(ckpt_dir: Path, record: dict) -> dict:
    """The saved run record; raise ``Conflict`` if this run differs from it."""
    try:
        saved = json.loads((ckpt_dir / RUN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise Conflict(f"--resume: {ckpt_dir / RUN_FILE} is missing or unreadable.") from exc
    differences = [key for key in record if saved.get(key) != record[key]]
    if differences:
        raise Conflict(
            f"--resume: this run differs from the checkpointed one in {', '.join(differences)}; "
            "resume with the same data, base and hyperparameters, or pass --force to start over."
        )
    return saved


def _schedule(
    env: Any, opts: TrainOptions, plan: memory.Plan, examples: int, longest: int,
    saved: dict | None,
) -> tuple[memory.Plan, schedule.Schedule]:  # fmt: skip
    """The run's schedule, and the memory plan re-made for its batch if that is smaller."""
    sched = schedule.choose(
        examples,
        device_batch=plan.batch_size,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        epochs=opts.epochs,
        max_steps=opts.max_steps,
        warmup_ratio=opts.warmup_ratio,
    )
    if sched.batch_size != plan.batch_size and saved is None:
        fixed = replace(opts, batch_size=sched.batch_size,
                        gradient_checkpointing=plan.gradient_checkpointing)  # fmt: skip
        plan = memory.plan_batch(env, fixed, longest, None)
    return plan, sched


def _rows(
    opts: TrainOptions, device: str, items: list[Encoded], saved: dict | None
) -> tuple[list[dict[str, list[int]]], bool]:
    """The training rows: packed into rows as long as the longest example, or one per
    example; a resumed run keeps its first choice."""
    rows = packing.pack(items, max(len(item.input_ids) for item in items))
    requested = saved.get("packing", False) if saved is not None else opts.packing
    if packing.should_pack(requested, device, len(items), len(rows)):
        return rows, True
    return runtime.rows_of(items), False


def train(opts: TrainOptions, settings: Settings | None = None) -> TrainResult:
    """Train one adapter as ``opts`` says and return its folder and manifest."""
    opts.check()
    settings = settings or Settings()
    base = prepare(settings.models_dir, opts.base or settings.base_model)
    output = (opts.output or settings.resolved_adapters_dir / opts.name).expanduser()
    tokenizer = runtime.load_tokenizer(base.path)
    prompt_format = resolve_format(opts.prompt_format, tokenizer)
    encoder = Encoder(tokenizer, runtime.stop_token_ids(base.path), prompt_format)
    train_ds, train_items, eval_ds, eval_items = _read_data(opts, encoder)
    resume_from = _prepare_output(opts, output)
    record = _run_record(opts, base.fingerprint, train_ds, eval_ds)
    ckpt_dir = output / CHECKPOINTS
    saved = _check_resume(ckpt_dir, record) if resume_from else None
    env = runtime.load_base(base.path, opts.device, tokenizer)

    longest = max(len(item.input_ids) for item in train_items + eval_items)
    train_rows, packed = _rows(opts, env.device, train_items, saved)
    plan = memory.plan_batch(env, opts, longest, saved)
    plan, sched = _schedule(env, opts, plan, len(train_rows), longest, saved)
    record.update(batch_size=plan.batch_size, gradient_checkpointing=plan.gradient_checkpointing,
                  packing=packed)  # fmt: skip
    rows = f" packed into {len(train_rows)} rows" if packed else ""
    runtime.log(
        f"{opts.name}: {len(train_items)} examples{rows} as {prompt_format}, {env.describe()}, "
        f"{plan.describe()}"
    )
    runtime.log(f"{opts.name}: {sched.describe()}")
    if plan.estimated_bytes > plan.available_bytes * memory.HEADROOM:
        runtime.log(
            "warning: this batch may not fit in memory; lower --batch-size (raise --grad-accum "
            "to keep the effective batch), lower --max-seq-len or add --gradient-checkpointing."
        )

    trainer, callbacks = runtime.build_trainer(
        env, opts, sched, plan, ckpt_dir, train_rows, eval_items
    )
    with runtime.oom_guard(opts, plan, sched.grad_accum):
        if saved is not None:
            eval_before = saved.get("eval_loss_before")
        else:
            eval_before = trainer.evaluate()["eval_loss"] if eval_items else None
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            run_file = {**record, "eval_loss_before": eval_before}
            (ckpt_dir / RUN_FILE).write_text(json.dumps(run_file))
        stats = runtime.run(trainer, callbacks, resume_from)
    if callbacks.interrupt.interrupted:
        last = runtime.last_checkpoint(ckpt_dir)
        raise Interrupted(
            f"Stopped by Ctrl-C; checkpoint saved in {last}. Continue with the same command "
            "and --resume."
        )
    with runtime.oom_guard(opts, plan, sched.grad_accum):
        eval_after = trainer.evaluate()["eval_loss"] if eval_items else None
    runtime.save_adapter(trainer.model, output)
    data_info = {
        "train": {"sha256": train_ds.sha256, "examples": len(train_items),
                  "formats": sorted(train_ds.kinds), "file": train_ds.path.name},
        "eval": {"sha256": eval_ds.sha256, "examples": len(eval_items),
                 "file": eval_ds.path.name} if eval_ds else None,
    }  # fmt: skip
    hyper = {
        **opts.hyperparameters(),
        **sched.record(),
        "prompt_format": prompt_format,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "packing": packed,
        "rows": len(train_rows),
        "fused_kernels": runtime.use_kernels(env, opts),
        "compiled": runtime.use_compile(env, opts, plan),
        "precision": env.precision,
    }
    results = {**stats, "eval_loss_before": eval_before, "eval_loss": eval_after}
    doc = manifest.build(
        name=opts.name,
        prompt_format=prompt_format,
        base={"name": base.name, "fingerprint": base.fingerprint},
        data=data_info,
        hyperparameters=hyper,
        results=results,
    )
    manifest.write(output, doc)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(output, doc)
