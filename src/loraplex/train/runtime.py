"""The torch side of a training run: device, precision, batch plan, PEFT model and Trainer.

All heavy imports (torch, transformers, peft) happen inside these functions, so importing
loraplex stays light. The device is CUDA when present (bf16 if it supports it, else fp32)
and CPU otherwise (fp32). ``build_trainer`` wraps the base in a PEFT LoRA and returns a
transformers ``Trainer`` with loraplex's progress and Ctrl-C callbacks; with eval data it
evaluates (and checkpoints) about ten times per run and ends on the checkpoint of lowest eval
loss. ``run`` turns out-of-memory into ``OutOfMemory`` with the knobs to turn. Orchestration is in
``loraplex.train.trainer``.
"""

from __future__ import annotations

import inspect
import json
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidRequest, LoraplexError
from loraplex.train import compiling, kernels, memory, varlen
from loraplex.train.callbacks import InterruptCallback, ProgressCallback
from loraplex.train.encode import Encoded
from loraplex.train.loss import collate, trainer_class
from loraplex.train.options import TrainOptions
from loraplex.train.packing import packed_attention
from loraplex.train.schedule import Schedule

EVALS_PER_RUN = 10  # with eval data: evaluate (and checkpoint) about this often per run


class OutOfMemory(LoraplexError):
    """The device ran out of memory; the message names the knobs to turn."""

    code = "out_of_memory"


class Interrupted(LoraplexError):
    """Training was stopped by Ctrl-C after saving a checkpoint."""

    code = "interrupted"


def log(message: str) -> None:
    """One status line on stderr."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Env:
    """The loaded base model and where it runs."""

    model: Any
    tokenizer: Any
    device: str
    precision: str  # "bf16" or "fp32"

    def describe(self) -> str:
        """Device and precision in words."""
        return f"{self.device} {self.precision}"


@dataclass
class Callbacks:
    """The callbacks a run's caller inspects afterwards."""

    progress: ProgressCallback
    interrupt: InterruptCallback


def load_tokenizer(path: Path) -> Any:
    """The base model's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(path)


def load_base(path: Path, device: str, tokenizer: Any) -> Env:
    """Load the model: bf16 on a CUDA device that supports it, fp32 otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("--device cuda: no CUDA device is visible; use --device cpu.")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    placement = {"device_map": {"": "cuda"}} if device == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    model.config.use_cache = False
    return Env(model, tokenizer, device, "bf16" if bf16 else "fp32")


def stop_token_ids(path: Path) -> list[int]:
    """EOS ids from the base's ``generation_config.json`` (what ends a served answer)."""
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


class _Examples:
    """Rows (encoded examples, or packed rows) as a map-style dataset of int64 tensors."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        import torch

        self.items = [{k: torch.tensor(v) for k, v in row.items()} for row in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def rows_of(items: list[Encoded]) -> list[dict[str, list[int]]]:
    """Encoded examples as unpacked rows."""
    return [{"input_ids": i.input_ids, "labels": i.labels} for i in items]


def use_kernels(env: Env, opts: TrainOptions) -> bool:
    """Liger's fused kernels: as ``--fused-kernels`` says, else wherever they are available."""
    possible = kernels.available(env.device, env.model.config.model_type)
    if opts.fused_kernels and not possible:
        raise InvalidRequest(
            "--fused-kernels needs a CUDA device, a Llama-family base and the liger-kernel "
            "package (pip install 'loraplex[gpu]')."
        )
    return possible if opts.fused_kernels is None else opts.fused_kernels


def use_compile(env: Env, opts: TrainOptions, plan: memory.Plan) -> bool:
    """Compile the decoder layers: as ``--compile`` says, else on CUDA without checkpointing."""
    if opts.torch_compile is not None:
        return opts.torch_compile
    return compiling.should_compile(None, env.device) and not plan.gradient_checkpointing


def _training_args(**kwargs: Any) -> Any:
    """``TrainingArguments`` with the keys this transformers version does not know dropped."""
    from transformers import TrainingArguments

    known = inspect.signature(TrainingArguments.__init__).parameters
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k in known})


def build_trainer(
    env: Env,
    opts: TrainOptions,
    schedule: Schedule,
    plan: memory.Plan,
    ckpt_dir: Path,
    train_rows: list[dict[str, list[int]]],
    eval_items: list[Encoded],
) -> tuple[Any, Callbacks]:
    """A PEFT-wrapped model inside a configured ``Trainer`` (``train_rows``: ``rows_of``
    the examples, or ``loraplex.train.packing.pack`` rows)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgressCallback

    set_seed(opts.seed)
    width = None
    packed = "position_ids" in train_rows[0]
    attention = packed_attention(opts.packed_attention, env.device, varlen.available())
    if packed and env.device == "cuda" and attention == "flex":
        # block-diagonal attention as a flex BlockMask: skips the masked blocks, where SDPA
        # with a dense mask falls back to its slower masked kernel
        env.model.set_attn_implementation("flex_attention")
        width = max(len(row["input_ids"]) for row in train_rows)
    varlen_rows = packed and attention == "varlen"
    if varlen_rows:  # FlashAttention over each example's span (eval batches too): no mask
        varlen.use(env.model)
        width = max(len(row["input_ids"]) for row in train_rows)
    fused = use_kernels(env, opts)
    compiled = use_compile(env, opts, plan)
    if fused and not compiled:  # compiled layers get inductor's own fused kernels
        kernels.apply(env.model)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=list(opts.target_modules),
        bias="none",
    )
    try:
        model = get_peft_model(env.model, lora)
    except ValueError as exc:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in env.model.named_modules()
             if isinstance(m, torch.nn.Linear)}
        )  # fmt: skip
        raise InvalidRequest(
            f"--target-modules {','.join(opts.target_modules)} do not fit this base model "
            f"({exc}). Its linear layers are: {', '.join(linear)}."
        ) from exc
    if env.precision == "bf16":
        kernels.keep_lora_input_dtype(model)
    if compiled:
        compiling.compile_layers(model)
    pad_id = env.tokenizer.pad_token_id
    pad_id = env.tokenizer.eos_token_id if pad_id is None else pad_id

    total_steps = schedule.steps
    every = opts.save_steps
    evaluated: dict[str, Any] = {"eval_strategy": "no"}
    if eval_items:
        every = min(opts.save_steps, max(1, -(-total_steps // EVALS_PER_RUN)))
        evaluated = {
            "eval_strategy": "steps",
            "eval_steps": every,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    args = _training_args(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=schedule.batch_size,
        per_device_eval_batch_size=schedule.batch_size,
        gradient_accumulation_steps=schedule.grad_accum,
        num_train_epochs=schedule.epochs,
        max_steps=total_steps,
        learning_rate=opts.lr,
        lr_scheduler_type="linear",
        warmup_steps=schedule.warmup_steps,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=env.precision == "bf16",
        use_cpu=env.device == "cpu",
        logging_steps=max(1, total_steps // 100),
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        **evaluated,
        report_to="none",
        disable_tqdm=True,
        seed=opts.seed,
        data_seed=opts.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # its isnan check made every step wait for the GPU
        **opts.extra,
    )
    callbacks = Callbacks(ProgressCallback(opts.name, opts.show_progress), InterruptCallback())
    trainer = trainer_class(fused)(
        model=model,
        args=args,
        data_collator=partial(collate, pad_id=pad_id, width=width, varlen=varlen_rows),
        train_dataset=_Examples(train_rows),
        eval_dataset=_Examples(rows_of(eval_items)) if eval_items else None,
        callbacks=[callbacks.progress, callbacks.interrupt, *opts.callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgressCallback)
    return trainer, callbacks


@contextmanager
def oom_guard(opts: TrainOptions, plan: memory.Plan, grad_accum: int) -> Iterator[None]:
    """Turn the device's out-of-memory error into ``OutOfMemory`` with advice."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        ckpt = "on" if plan.gradient_checkpointing else "off"
        half = max(plan.batch_size // 2, 1)
        raise OutOfMemory(
            f"Out of device memory (batch size {plan.batch_size}, gradient accumulation "
            f"{grad_accum}, max length {opts.max_seq_len}, gradient checkpointing {ckpt}). "
            f"Try --batch-size {half} --grad-accum {grad_accum * 2} (same effective batch), "
            "a smaller --max-seq-len, or --gradient-checkpointing."
        ) from exc


def run(trainer: Any, callbacks: Callbacks, resume_from: Path | None) -> dict[str, Any]:
    """Train (resuming if asked) with Ctrl-C handling; figures for the manifest."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    callbacks.interrupt.install()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        callbacks.interrupt.restore()
    state = trainer.state
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    seconds = float(out.metrics.get("train_runtime", 0.0))
    epoch_tokens = sum(len(item["input_ids"]) for item in trainer.train_dataset.items)
    tokens = round(epoch_tokens * (state.epoch or 0.0))
    session_tokens = round(epoch_tokens * ((state.epoch or 0.0) - callbacks.progress.start_epoch))
    if torch.cuda.is_available() and trainer.args.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated())
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    evals = [(e["step"], e["eval_loss"]) for e in state.log_history if "eval_loss" in e]
    best = state.best_model_checkpoint
    return {
        "train_loss": float(out.training_loss),
        "eval_history": [{"step": step, "eval_loss": loss} for step, loss in evals],
        "best_step": int(best.rsplit("-", 1)[-1]) if best else None,
        "final_train_loss": losses[-1] if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "steps": int(state.global_step),
        "train_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(session_tokens / seconds, 1) if seconds else None,
        "peak_memory_bytes": peak,
    }


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    return Path(found) if found else None


def save_adapter(model: Any, output: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (no pickle, no card)."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    (output / "README.md").unlink(missing_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (output / name).is_file():
            raise LoraplexError(f"PEFT did not write {name} into {output}.")
