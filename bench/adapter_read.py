"""vLLM's read of an adapter in its CPU worker: stock vs loraplex's ``engine.adapter_read``.

One process, vLLM's ``LLM`` on the hot_swap bench's engine settings (the general plugin has
patched the read). Rounds alternate vLLM's own read (``safe_open``, a tensor at a time) and
the patched one (the file in one call, names parsed once), each adding every adapter with
``add_lora`` and timing ``LRUCacheWorkerLoRAManager._load_adapter``, so that both see the
same machine. Prints each one's median and their ratio; writes
``bench/results/adapter_read.json``.

    .venv/bin/python -m bench.adapter_read        # ~1 min on 2 cores (quiet)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any

from bench._common import Engine, adapter_paths, base_model_dir, make_adapters, ratio, write_result
from bench.cold_load import Spent, phases, timed


def read_times(llm: Any, paths: list[str], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each ``_load_adapter`` call, per read, rounds alternated."""
    import safetensors
    from vllm.lora import lora_model, utils
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from loraplex.engine.adapter_read import WHOLE_FILE_SAFETENSORS

    if lora_model.safetensors is not WHOLE_FILE_SAFETENSORS:
        raise SystemExit("the general plugin did not patch vLLM's read: is loraplex installed?")
    reads = {
        "stock": (safetensors, utils.parse_fine_tuned_lora_name),
        "loraplex": (lora_model.safetensors, lora_model.parse_fine_tuned_lora_name),
    }
    spent: Spent = defaultdict(float)
    timed(LRUCacheWorkerLoRAManager, "_load_adapter", "read", spent)
    out: dict[str, list[float]] = {name: [] for name in reads}
    lora_id = 0
    for _ in range(rounds):
        for name, (module, parse) in reads.items():
            lora_model.safetensors, lora_model.parse_fine_tuned_lora_name = module, parse
            for path in paths:
                lora_id += 1
                with phases(spent) as took:
                    llm.llm_engine.add_lora(LoRARequest(f"read-{lora_id}", lora_id, path))
                out[name].append(took["read"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    engine = Engine(base_model_dir(), dtype=args.dtype, max_lora_rank=16, max_loras=2)
    folder = make_adapters(engine.base, args.adapters, 16, ["q_proj", "v_proj"])
    paths = [str(path) for _, path in adapter_paths(folder, args.adapters)]
    llm = engine.in_process_llm()
    before = os.getloadavg()
    times = read_times(llm, paths, args.rounds)
    medians = {name: round(statistics.median(ms), 2) for name, ms in times.items()}
    result = {
        "settings": {**vars(args), "engine": engine.describe(), "adapter": "rank 16, q/v, bf16"},
        "read_ms_median": medians,
        "loraplex_over_stock": ratio(medians["loraplex"], medians["stock"]),
        "samples_ms": times,
        "load_average": {"before": before, "after": os.getloadavg()},
    }
    path = write_result("adapter_read", result)
    print(json.dumps({k: v for k, v in result.items() if k != "samples_ms"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
