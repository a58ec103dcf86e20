"""Training speed of ``loraplex train``: tokens/s and peak memory, against a plain PEFT loop.

For each model shape (``small``: SmolLM2-135M's config; ``8b``: Llama-3.1-8B's) this builds
a base folder with random bf16 weights and a word-level tokenizer (speed does not depend on
weight values), writes synthetic data whose examples are exactly ``--seq-len`` tokens, and
runs ``loraplex.train.train`` for ``--steps`` optimizer steps with the batch size and
checkpointing it chooses from the device's memory (variant ``auto``) or with checkpointing on
at the batch of the given references (``checkpointed``). Tokens/s is measured
over the steps after ``--warmup``. With ``--reference`` a plain PEFT loop (r=16 on all
projections, same batch and checkpointing, loss on all tokens) runs in the same process, and
the ratio is printed. Results go to ``bench/results/train_speed.json``.

    python -m bench.train_speed --shapes small,8b --variants auto,checkpointed --reference
    python -m bench.train_speed --shapes tiny --steps 5 --warmup 2   # smoke test on CPU

loraplex must be importable: installed, or ``PYTHONPATH=src`` on a machine with only the
training dependencies.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
    "small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                  tie_word_embeddings=True, rope_theta=100000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               rope_theta=500000.0),
}  # fmt: skip
# Measured with a plain PEFT loop on one H200 (bf16, r=16 on all projections): tokens/s.
REFERENCE_TOKS = {
    ("8b", 2048, 2, True): 5970,
    ("8b", 2048, 2, False): 8480,
    ("small", 1024, 8, True): 19015,
    ("small", 1024, 32, False): 85167,
}
TARGETS = {"8b": 8000, "small": 80000}
CHECKPOINTED_BATCH = {"small": 8, "8b": 2, "tiny": 4}  # the given checkpointed references
DEFAULT_SEQ = {"tiny": 128, "small": 1024, "8b": 2048}


def build_base(shape: str, folder: Path, seq_len: int) -> None:
    """A Llama base folder: random bf16 weights (made on the GPU if any) and a tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SHAPES[shape]
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(spec["vocab_size"] - 2)}}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(**spec, max_position_embeddings=max(seq_len, 2048),
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def write_data(path: Path, lines: int, seq_len: int, vocab: int) -> None:
    """Completion lines of exactly ``seq_len`` tokens: 8 prompt words, the rest answer + EOS."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(lines):
            words = [f"w{rng.randrange(vocab - 2)}" for _ in range(seq_len - 1)]
            line = {"input": " ".join(words[:8]), "output": " " + " ".join(words[8:])}
            handle.write(json.dumps(line) + "\n")


class StepTimer:
    """Times optimizer steps after a warm-up (a transformers callback, built lazily)."""

    def __new__(cls, warmup: int) -> Any:
        import torch
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.marks: list[float] = []

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step >= warmup:
                    self.marks.append(time.perf_counter())

        return _Timer()


def loraplex_run(shape: str, base: Path, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """One ``loraplex.train.train`` run; tokens/s over the timed steps."""
    import torch

    from loraplex.train.options import TrainOptions
    from loraplex.train.trainer import train

    timer = StepTimer(args.warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    opts = TrainOptions(
        data=data, name=f"bench-{shape}", base=base, output=work / f"adapter-{shape}",
        max_steps=args.steps, grad_accum=1, max_seq_len=args.seq_len, save_steps=10**6,
        batch_size=args.batch_size, gradient_checkpointing=args.checkpointing,
        force=True, show_progress=False, callbacks=[timer],
    )  # fmt: skip
    result = train(opts)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    gc.collect()  # free this run's model before the next run's peak is measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hyper = result.manifest["hyperparameters"]
    steps = len(timer.marks) - 1
    seconds = timer.marks[-1] - timer.marks[0]
    tokens = steps * hyper["batch_size"] * args.seq_len
    return {
        "batch_size": hyper["batch_size"],
        "gradient_checkpointing": hyper["gradient_checkpointing"],
        "precision": hyper["precision"],
        "timed_steps": steps,
        "tokens_per_second": round(tokens / seconds, 1),
        "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
        "manifest_peak_memory_gib": round(
            result.manifest["results"]["peak_memory_bytes"] / 2**30, 2
        ),
    }


def reference_run(base: Path, batch: int, ckpt: bool, args: argparse.Namespace) -> dict:
    """A plain PEFT loop: AdamW, bf16 weights, loss on every token, same batch and length."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraplex.adapters import LINEAR_PROJECTIONS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": device})
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode: no dropout, no checkpointing
    if ckpt:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    targets = list(LINEAR_PROJECTIONS)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets)
    model = get_peft_model(model, lora)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (batch, args.seq_len), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    marks = []
    for step in range(args.steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step + 1 >= args.warmup:
            marks.append(time.perf_counter())
    tokens = (len(marks) - 1) * batch * args.seq_len
    out = {
        "batch_size": batch,
        "gradient_checkpointing": ckpt,
        "tokens_per_second": round(tokens / (marks[-1] - marks[0]), 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device == "cuda"
        else None,
    }
    del model, optim
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def variants(cli: argparse.Namespace, shape: str) -> list[tuple[str, int | None, bool | None]]:
    """(label, batch size, checkpointing) runs for one shape; None = loraplex chooses."""
    runs: list[tuple[str, int | None, bool | None]] = []
    for name in cli.variants.split(","):
        if name == "auto":
            runs.append(("auto", cli.batch_size, cli.checkpointing))
        elif name == "checkpointed":
            runs.append(("checkpointed", CHECKPOINTED_BATCH.get(shape, 2), True))
        else:
            raise SystemExit(f"unknown variant {name!r}; use auto, checkpointed")
    return runs


def run_shape(shape: str, cli: argparse.Namespace) -> list[dict]:
    """Build one shape's base and data once, then run each variant (and its reference)."""
    args = argparse.Namespace(**vars(cli))
    args.seq_len = cli.seq_len or DEFAULT_SEQ[shape]
    out = []
    with tempfile.TemporaryDirectory(prefix=f"train-speed-{shape}-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        build_base(shape, work / "base", args.seq_len)
        built = round(time.perf_counter() - started, 1)
        lines = 64 * args.steps if shape != "8b" else 8 * args.steps
        write_data(work / "data.jsonl", lines, args.seq_len, SHAPES[shape]["vocab_size"])
        for label, batch, ckpt in variants(cli, shape):
            args.batch_size, args.checkpointing = batch, ckpt
            run = {"shape": shape, "variant": label, "seq_len": args.seq_len,
                   "build_seconds": built}  # fmt: skip
            mine = run["loraplex"] = loraplex_run(shape, work / "base", work / "data.jsonl",
                                                  work, args)  # fmt: skip
            key = (shape, args.seq_len, mine["batch_size"], mine["gradient_checkpointing"])
            run["given_reference_tokens_per_second"] = REFERENCE_TOKS.get(key)
            run["target_tokens_per_second"] = TARGETS.get(shape) if label == "auto" else None
            if cli.reference:
                ref = run["reference"] = reference_run(
                    work / "base", mine["batch_size"], mine["gradient_checkpointing"], args
                )
                run["ratio_vs_reference"] = round(
                    mine["tokens_per_second"] / ref["tokens_per_second"], 3
                )
            print(json.dumps(run), flush=True)
            out.append(run)
    return out


def print_table(runs: list[dict]) -> None:
    """One line per run: what loraplex chose, its speed and memory, the plain loop's."""
    print(f"{'shape':<6} {'variant':<12} {'seq':>5} {'batch':>5} {'ckpt':>5} {'tok/s':>9} "
          f"{'peak GiB':>9} {'target':>7} {'given ref':>9} {'plain PEFT':>10} {'ref GiB':>8} "
          f"{'ratio':>6}")  # fmt: skip
    for run in runs:
        mine, ref = run["loraplex"], run.get("reference") or {}
        print(f"{run['shape']:<6} {run['variant']:<12} {run['seq_len']:>5} "
              f"{mine['batch_size']:>5} {str(mine['gradient_checkpointing']):>5} "
              f"{mine['tokens_per_second']:>9.0f} {str(mine['peak_memory_gib']):>9} "
              f"{str(run['target_tokens_per_second'] or '-'):>7} "
              f"{str(run['given_reference_tokens_per_second'] or '-'):>9} "
              f"{str(ref.get('tokens_per_second', '-')):>10} "
              f"{str(ref.get('peak_memory_gib', '-')):>8} "
              f"{str(run.get('ratio_vs_reference', '-')):>6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="small,8b", help="comma list of tiny, small, 8b")
    parser.add_argument("--variants", default="auto", help="comma list of auto, checkpointed")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 1024 small, 2048 8b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=None, help="auto variant's batch size")
    parser.add_argument("--checkpointing", choices=["on", "off"], default=None)
    parser.add_argument("--reference", action="store_true", help="also run a plain PEFT loop")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    cli = parser.parse_args()
    cli.checkpointing = None if cli.checkpointing is None else cli.checkpointing == "on"
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    runs = [run for shape in cli.shapes.split(",") for run in run_shape(shape, cli)]
    results = {"device": device, "torch": torch.__version__, "steps": cli.steps,
               "warmup": cli.warmup, "runs": runs}  # fmt: skip
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(runs)


if __name__ == "__main__":
    main()
