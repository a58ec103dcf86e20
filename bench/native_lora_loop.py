"""Would a native op per LoRA layer pay? The fast-LoRA Python loop vs the same loop in C++.

One qkv_proj of the bundled model (q 576, k 192, v 192 output columns), rank 8 on q and v,
``--segments`` distinct adapters: a prefill of ``--rows`` tokens each, and a decode of one
token each. Both loops do what ``PreparedSlice.run`` does for direct segments: per segment
and slice, ``y[rows, cols].addmm_(mm(x[rows], A), B)``. The C++ loop (built with
``torch.utils.cpp_extension``: needs g++ and ninja) calls the same ATen ops, so it saves
only Python's dispatch. ``--cold`` reads a 64 MiB buffer before each timed call, as the
model's matmuls evict the adapters between two layers of a step. Rounds alternate the two
loops; reports medians per layer and the saving over the model's 30 layers.

    .venv/bin/python -m bench.native_lora_loop
    .venv/bin/python -m bench.native_lora_loop --cold
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.cpp_extension import load_inline

from bench._common import write_result

NATIVE_LOOP = r"""
#include <torch/extension.h>
#include <vector>
// y[starts[i]:stops[i], offsets[j]:offsets[j]+sizes[j]] += scale * x[rows] @ A[i][j] @ B[i][j]
void lora_segments(torch::Tensor y, torch::Tensor x, std::vector<int64_t> starts,
                   std::vector<int64_t> stops, std::vector<int64_t> offsets,
                   std::vector<int64_t> sizes, std::vector<torch::Tensor> as,
                   std::vector<torch::Tensor> bs, double scale) {
  size_t n_slices = offsets.size();
  for (size_t i = 0; i < starts.size(); ++i) {
    auto xs = x.narrow(0, starts[i], stops[i] - starts[i]);
    auto ys = y.narrow(0, starts[i], stops[i] - starts[i]);
    for (size_t j = 0; j < n_slices; ++j) {
      auto h = at::mm(xs, as[i * n_slices + j]);
      ys.narrow(1, offsets[j], sizes[j]).addmm_(h, bs[i * n_slices + j], 1.0, scale);
    }
  }
}
"""
HIDDEN, QKV_COLUMNS, LAYERS = 576, 960, 30
ADAPTED = ((0, 576), (768, 192))  # (offset, size) of q and v in the qkv output
SCALE = 2.0


def loops(segments: int, rows_each: int) -> tuple[Callable[[], None], Callable[[], None], bool]:
    """The Python loop, the C++ loop over the same tensors, and whether they agree."""
    native = load_inline(
        "loraplex_native_lora_loop", NATIVE_LOOP, functions=["lora_segments"], extra_cflags=["-O3"]
    )
    rank = 8
    x = torch.randn(segments * rows_each, HIDDEN)
    y = torch.zeros(segments * rows_each, QKV_COLUMNS)
    a = [torch.randn(HIDDEN, rank) for _ in range(segments) for _ in ADAPTED]
    b = [torch.randn(rank, size) for _ in range(segments) for _, size in ADAPTED]
    rows = [slice(i * rows_each, (i + 1) * rows_each) for i in range(segments)]
    columns = [y.narrow(1, offset, size) for offset, size in ADAPTED]

    def python_loop() -> None:
        for j, y_cols in enumerate(columns):
            for i, r in enumerate(rows):
                k = i * len(ADAPTED) + j
                y_cols[r].addmm_(torch.mm(x[r], a[k]), b[k], alpha=SCALE)

    starts, stops = [r.start for r in rows], [r.stop for r in rows]
    offsets, sizes = [o for o, _ in ADAPTED], [s for _, s in ADAPTED]

    def native_loop() -> None:
        native.lora_segments(y, x, starts, stops, offsets, sizes, a, b, SCALE)

    y.zero_()
    python_loop()
    expected = y.clone()
    y.zero_()
    native_loop()
    return python_loop, native_loop, torch.allclose(expected, y, rtol=1e-4, atol=1e-4)


def median_us(run: Callable[[], None], calls: int, evict: torch.Tensor | None) -> float:
    """Median microseconds of ``run``, reading ``evict`` (untimed) before each call if given."""
    samples = []
    for _ in range(calls):
        if evict is not None:
            evict.sum()
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=8, help="distinct adapters in the batch")
    parser.add_argument("--rows", type=int, default=40, help="prefill tokens per adapter")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per loop and round")
    parser.add_argument("--cold", action="store_true", help="evict the caches before each call")
    args = parser.parse_args()
    torch.manual_seed(0)
    evict = torch.ones(16 * 1024 * 1024) if args.cold else None
    result: dict[str, object] = {"settings": vars(args), "threads": torch.get_num_threads()}
    for step, rows_each in (("prefill", args.rows), ("decode", 1)):
        python_loop, native_loop, agree = loops(args.segments, rows_each)
        if not agree:
            raise SystemExit(f"{step}: the C++ loop's output differs from the Python loop's")
        for run in (python_loop, native_loop):
            median_us(run, 30, None)  # warm up
        python_us, native_us = [], []
        for _ in range(args.rounds):
            python_us.append(median_us(python_loop, args.calls, evict))
            native_us.append(median_us(native_loop, args.calls, evict))
        py, nat = statistics.median(python_us), statistics.median(native_us)
        result[step] = {
            "python_us_per_layer": round(py, 1),
            "native_us_per_layer": round(nat, 1),
            "ratio": round(nat / py, 3),
            "saved_ms_per_step": round((py - nat) * LAYERS / 1000, 2),
        }
        print(
            f"{step} ({args.segments} adapters x {rows_each} rows, "
            f"{'cold' if args.cold else 'warm'} caches): Python {py:.0f} us, C++ {nat:.0f} us "
            f"a layer ({nat / py:.2f}x); {LAYERS} layers: {(py - nat) * LAYERS / 1000:.2f} ms "
            "less a step"
        )
    name = "native_lora_loop_cold" if args.cold else "native_lora_loop"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
