"""Training speed of ``loraplex train``: tokens/s and peak memory, against a plain PEFT loop.

For each model shape (``small``: SmolLM2-135M's config; ``8b``: Llama-3.1-8B's) this builds
a base folder with random bf16 weights and a word-level tokenizer (speed does not depend on
weight values), writes synthetic data whose examples are exactly ``--seq-len`` tokens, and
runs ``loraplex.train.train`` for ``--steps`` optimizer steps with the batch size and
checkpointing it chooses from the device's memory (variant ``auto``), the same with the
decoder layers not compiled (``eager``), or with checkpointing on at the batch of the given
references (``checkpointed``). Tokens/s is measured over the steps after ``--warmup``; the
device is waited for only at the first and last timed step. With ``--reference`` a plain
PEFT loop (r=16 on all projections, same batch and checkpointing, loss on all tokens) runs in
the same process, and the ratios of speed and peak memory are printed. ``--lengths
fixed,realistic`` runs the first variant on realistic lengths too, against its fixed-length
speed. Results go to ``bench/results/train_speed.json`` (rewritten after each run).

    python -m bench.train_speed --shapes small,8b --variants auto,checkpointed --reference
    python -m bench.train_speed --shapes small --variants auto,eager --lengths fixed,realistic \
        --reference --steps 8 --warmup 3
    python -m bench.train_speed --shapes tiny --steps 5 --warmup 2   # smoke test on CPU

loraplex must be importable: installed, or ``PYTHONPATH=src`` on a machine with only the
training dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import random
import sys
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


def write_data(
    path: Path, lines: int, seq_len: int, vocab: int, realistic: bool = False
) -> list[tuple[list[int], list[int]]]:
    """Completion lines; returns each line's (prompt ids, answer ids + EOS) for the plain loop.

    Fixed: exactly ``seq_len`` tokens, 8 prompt words, the rest answer + EOS. Realistic:
    log-uniform lengths in [32, seq_len], answers (with EOS) 20-60% of each.
    """
    rng = random.Random(0)
    examples = []
    with path.open("w") as handle:
        for _ in range(lines):
            size, answer = seq_len, seq_len - 8
            if realistic:
                size = int(math.exp(rng.uniform(math.log(32), math.log(seq_len))))
                answer = max(2, round(size * rng.uniform(0.2, 0.6)))
            ids = [rng.randrange(vocab - 2) for _ in range(size - 1)]
            words = [f"w{i}" for i in ids]
            cut = size - answer
            line = {"input": " ".join(words[:cut]), "output": " " + " ".join(words[cut:])}
            handle.write(json.dumps(line) + "\n")
            examples.append(([i + 2 for i in ids[:cut]], [i + 2 for i in ids[cut:]] + [1]))
    return examples


class StepTimer:
    """Times optimizer steps after a warm-up (a transformers callback, built lazily): waits
    for the device only at the first and last mark, so steps queue as in a real run."""

    def __new__(cls, warmup: int, last: int) -> Any:
        import torch
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self) -> None:
                self.marks: list[float] = []

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step not in (warmup, last):
                    return
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())

        return _Timer()


class Profiled:
    """Context: profile what runs inside (CPU and CUDA); print and save the top ops by device
    and by host time, the wall time against the device's busy time, and a Chrome trace."""

    def __init__(self, out: Path) -> None:
        import torch

        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.out, self.prof = out, torch.profiler.profile(activities=acts)
        self.started = 0.0

    def __enter__(self) -> Profiled:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.prof.__exit__(*exc)
        events = self.prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e3
        head = f"wall {wall * 1e3:.1f} ms, device kernels {busy:.1f} ms\n"
        by_device = events.table(sort_by="self_cuda_time_total", row_limit=25)
        by_host = events.table(sort_by="self_cpu_time_total", row_limit=25)
        text = f"{head}== by device time\n{by_device}\n== by host time\n{by_host}"
        print(f"== profile {self.out.name}: {text}", flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        self.prof.export_chrome_trace(str(self.out.with_suffix(".json.gz")))


class StepProfiler:
    """Profiles one optimizer step (a transformers callback, built lazily)."""

    def __new__(cls, step: int, out: Path) -> Any:
        from transformers import TrainerCallback

        class _Profiler(TrainerCallback):
            def __init__(self) -> None:
                self.prof: Profiled | None = None

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step == step:
                    self.prof = Profiled(out).__enter__()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if self.prof is not None and state.global_step == step + 1:
                    self.prof.__exit__(None, None, None)
                    self.prof = None

        return _Profiler()


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def loraplex_run(shape: str, base: Path, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """One ``loraplex.train.train`` run; tokens/s over the timed steps."""
    import torch

    from loraplex.train.options import TrainOptions
    from loraplex.train.trainer import train

    timer = StepTimer(args.warmup, args.steps)
    profile = RESULTS / f"profile-{shape}-{args.lengths}.txt"
    extra = [StepProfiler(args.warmup, profile)] if args.profile else []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # only when asked, so this script also drives code from before the option existed
    attention: dict[str, Any] = {}
    if args.packed_attention is not None:
        attention["packed_attention"] = args.packed_attention
    if args.torch_compile is not None:
        attention["torch_compile"] = args.torch_compile
    opts = TrainOptions(
        data=data, name=f"bench-{shape}", base=base, output=work / f"adapter-{shape}",
        max_steps=args.steps, grad_accum=1, max_seq_len=args.seq_len, save_steps=10**6,
        batch_size=args.batch_size, gradient_checkpointing=args.checkpointing,
        force=True, show_progress=False, callbacks=[timer, *extra], **attention,
    )  # fmt: skip
    graphs = _compiled_graphs()
    result = train(opts)
    graphs = _compiled_graphs() - graphs
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    gc.collect()  # free this run's model before the next run's peak is measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hyper = result.manifest["hyperparameters"]
    steps = args.steps - args.warmup
    seconds = timer.marks[-1] - timer.marks[0]
    # real (non-pad) tokens per row on average: packed rows or single examples alike
    per_row = args.real_tokens / hyper.get("rows", args.examples)
    tokens = steps * hyper["batch_size"] * per_row
    return {
        "batch_size": hyper["batch_size"],
        "gradient_checkpointing": hyper["gradient_checkpointing"],
        "packing": hyper.get("packing", False),
        "rows": hyper.get("rows", args.examples),
        "fused_kernels": hyper.get("fused_kernels", False),
        "compiled": hyper.get("compiled", False),
        "packed_attention": args.packed_attention or "auto",
        "precision": hyper["precision"],
        "compiled_graphs": graphs,  # one forward graph per distinct layer shape if all goes well
        "timed_steps": steps,
        "tokens_per_second": round(tokens / seconds, 1),
        "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
        "manifest_peak_memory_gib": round(
            result.manifest["results"]["peak_memory_bytes"] / 2**30, 2
        ),
    }


def padded_batches(
    examples: list[tuple[list[int], list[int]]], batch: int, steps: int, device: str
) -> list[dict]:
    """``steps`` batches of ``batch`` examples in random order, each padded to its longest,
    labels masked to answers."""
    import torch

    rng = random.Random(1)
    order: list[int] = []
    while len(order) < batch * steps:
        order += rng.sample(range(len(examples)), len(examples))
    out = []
    for step in range(steps):
        chosen = [examples[i] for i in order[step * batch : (step + 1) * batch]]
        width = max(len(p) + len(a) for p, a in chosen)
        ids, mask, labels = [], [], []
        for prompt, answer in chosen:
            pad = width - len(prompt) - len(answer)
            ids.append(prompt + answer + [0] * pad)
            mask.append([1] * (len(prompt) + len(answer)) + [0] * pad)
            labels.append([-100] * len(prompt) + answer + [-100] * pad)
        fields = (("input_ids", ids), ("attention_mask", mask), ("labels", labels))
        out.append({k: torch.tensor(v, device=device) for k, v in fields})
    return out


def reference_run(base: Path, batch: int, ckpt: bool, args: argparse.Namespace) -> dict:
    """A plain PEFT loop: AdamW, bf16 weights, same batch; fixed lengths: loss on every token
    of full rows; realistic: random order, padded per batch, loss on answers."""
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
    fixed = {"input_ids": ids, "labels": ids}
    batches = padded_batches(args.data, batch, args.steps, device) if args.realistic else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    marks, real = [], 0  # the device is waited for at the first and last mark only
    for step in range(args.steps):
        inputs = batches[step] if batches else fixed
        if step + 1 > args.warmup:
            real += int(inputs["attention_mask"].sum()) if batches else ids.numel()
        profiled = args.profile and step == args.warmup
        with Profiled(RESULTS / "profile-plain.txt") if profiled else contextlib.nullcontext():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(**inputs).loss
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        if step + 1 in (args.warmup, args.steps):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
    out = {
        "batch_size": batch,
        "gradient_checkpointing": ckpt,
        "tokens_per_second": round(real / (marks[-1] - marks[0]), 1),
        "real_token_share": round(
            sum(int(b["attention_mask"].sum()) for b in batches)
            / sum(b["input_ids"].numel() for b in batches),
            3,
        )
        if batches
        else 1.0,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device == "cuda"
        else None,
    }
    del model, optim
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def variants(
    cli: argparse.Namespace, shape: str
) -> list[tuple[str, int | None, bool | None, bool | None]]:
    """(label, batch size, checkpointing, compile) runs for one shape; None = loraplex
    chooses. ``eager``: like ``auto`` with the decoder layers not compiled."""
    runs: list[tuple[str, int | None, bool | None, bool | None]] = []
    for name in cli.variants.split(","):
        if name == "auto":
            runs.append(("auto", cli.batch_size, cli.checkpointing, cli.torch_compile))
        elif name == "eager":
            runs.append(("eager", cli.batch_size, cli.checkpointing, False))
        elif name == "checkpointed":
            runs.append(("checkpointed", CHECKPOINTED_BATCH.get(shape, 2), True, cli.torch_compile))
        else:
            raise SystemExit(f"unknown variant {name!r}; use auto, eager, checkpointed")
    return runs


def run_shape(shape: str, cli: argparse.Namespace, done: list[dict]) -> None:
    """Build one shape's base once; for the first ``--lengths`` run each variant (and its
    reference), for the others the first variant only, compared with its first-lengths run.
    Each finished run is appended to ``done`` and saved."""
    args = argparse.Namespace(**vars(cli))
    args.seq_len = cli.seq_len or DEFAULT_SEQ[shape]
    with tempfile.TemporaryDirectory(prefix=f"train-speed-{shape}-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        build_base(shape, work / "base", args.seq_len)
        built = round(time.perf_counter() - started, 1)
        first: dict | None = None
        for lengths in cli.lengths.split(","):
            args.lengths = lengths
            runs = variants(cli, shape)
            if first is not None:
                runs = runs[:1]
            one_lengths(shape, work, built, runs, args, done, first)
            first = first or done[-len(runs)]


def one_lengths(
    shape: str, work: Path, built: float, runs: list, args: argparse.Namespace,
    done: list[dict], first: dict | None,
) -> None:  # fmt: skip
    """Write this lengths' data and run ``runs`` on it (references: first lengths only)."""
    lines = 64 * args.steps if shape != "8b" else 8 * args.steps
    args.realistic = args.lengths == "realistic"
    lines *= 4 if args.realistic else 1
    vocab = SHAPES[shape]["vocab_size"]
    args.data = write_data(work / "data.jsonl", lines, args.seq_len, vocab, args.realistic)
    args.examples = len(args.data)
    args.real_tokens = sum(len(p) + len(a) for p, a in args.data)
    refs: dict[tuple[int, bool], dict] = {}
    for label, batch, ckpt, compiled in runs:
        args.batch_size, args.checkpointing, args.torch_compile = batch, ckpt, compiled
        run = {"shape": shape, "variant": label, "seq_len": args.seq_len,
               "lengths": args.lengths, "build_seconds": built}  # fmt: skip
        mine = run["loraplex"] = loraplex_run(shape, work / "base", work / "data.jsonl",
                                              work, args)  # fmt: skip
        key = (shape, args.seq_len, mine["batch_size"], mine["gradient_checkpointing"])
        known = REFERENCE_TOKS.get(key) if not args.realistic else None
        run["given_reference_tokens_per_second"] = known
        run["target_tokens_per_second"] = TARGETS.get(shape) if label == "auto" else None
        if args.reference and first is None:
            same = (mine["batch_size"], mine["gradient_checkpointing"])
            if same not in refs:  # one plain loop per batch and checkpointing
                refs[same] = reference_run(work / "base", *same, args)
            ref = run["reference"] = refs[same]
            run["ratio_vs_reference"] = round(
                mine["tokens_per_second"] / ref["tokens_per_second"], 3
            )
            run["memory_vs_reference"] = round(
                mine["peak_memory_gib"] / ref["peak_memory_gib"], 3
            ) if ref["peak_memory_gib"] else None  # fmt: skip
        if first is not None:
            run[f"ratio_vs_{first['lengths']}"] = round(
                mine["tokens_per_second"] / first["loraplex"]["tokens_per_second"], 3
            )
        print(json.dumps(run), flush=True)
        done.append(run)
        args.save(done)


def print_table(runs: list[dict]) -> None:
    """One line per run: what loraplex chose, its speed and memory, the plain loop's."""
    print(f"{'shape':<6} {'lengths':<9} {'variant':<12} {'seq':>5} {'batch':>5} {'ckpt':>5} "
          f"{'pack':>5} {'fused':>5} {'comp':>5} {'tok/s':>9} "
          f"{'peak GiB':>9} {'target':>7} {'given ref':>9} {'plain PEFT':>10} {'ref GiB':>8} "
          f"{'ratio':>6}")  # fmt: skip
    for run in runs:
        mine, ref = run["loraplex"], run.get("reference") or {}
        print(f"{run['shape']:<6} {run.get('lengths', 'fixed'):<9} {run['variant']:<12} "
              f"{run['seq_len']:>5} "
              f"{mine['batch_size']:>5} {str(mine['gradient_checkpointing']):>5} "
              f"{str(mine.get('packing', '-')):>5} {str(mine.get('fused_kernels', '-')):>5} "
              f"{str(mine.get('compiled', '-')):>5} "
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
    parser.add_argument("--lengths", default="fixed",
                        help="comma list of fixed (examples of exactly --seq-len tokens) and "
                        "realistic (log-uniform 32..seq-len, answers 20-60%%); tok/s counts "
                        "real (non-pad) tokens; lengths after the first run the first variant "
                        "only, without reference")  # fmt: skip
    parser.add_argument(
        "--compile",
        choices=["on", "off"],
        default=None,
        help="compile the decoder layers (default: loraplex's auto)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=None, help="auto variant's batch size")
    parser.add_argument("--checkpointing", choices=["on", "off"], default=None)
    parser.add_argument("--reference", action="store_true", help="also run a plain PEFT loop")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the first timed step of each run (slows that run)",
    )
    parser.add_argument("--packed-attention", choices=["flex", "sdpa", "varlen"], default=None,
                        help="attention for packed rows: flex BlockMask or SDPA with a dense "
                        "mask (CUDA), or FlashAttention varlen; default: loraplex's auto "
                        "(varlen on CUDA where torch has it)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    cli = parser.parse_args()
    cli.checkpointing = None if cli.checkpointing is None else cli.checkpointing == "on"
    cli.torch_compile = None if cli.compile is None else cli.compile == "on"
    for lengths in cli.lengths.split(","):
        if lengths not in ("fixed", "realistic"):
            raise SystemExit(f"unknown lengths {lengths!r}; use fixed, realistic")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    head = {"device": device, "torch": torch.__version__, "steps": cli.steps,
            "warmup": cli.warmup, "command": " ".join(sys.argv[1:])}  # fmt: skip
    cli.out.parent.mkdir(parents=True, exist_ok=True)

    def save(runs: list[dict]) -> None:
        cli.out.write_text(json.dumps({**head, "runs": runs}, indent=2) + "\n")

    cli.save = save
    runs: list[dict] = []
    for shape in cli.shapes.split(","):
        run_shape(shape, cli, runs)
    print_table(runs)


if __name__ == "__main__":
    main()
