"""One engine slot reused by adapters of different modules gives each its own output (fp32).

With ``max_loras=1`` every switch writes the adapter into the same slot. An adapter of
q_proj/v_proj ("narrow", rank 8) leaves o/gate/up/down zero in its slot, and the fast-LoRA
plugin's one-pass activation (``fastlora/activation.py``) resets only the modules the slot's
last adapter adapted: when an adapter of every projection ("wide", rank 16) was written in
between, those modules must be zeroed again, or narrow's later requests would carry wide's
o/gate/up/down deltas. Writing narrow over wide in q/k/v, it zeroes only what narrow does not
overwrite: wide's k slice and its q/v rows from rank 8 on (the ops read only the rows up to the
rank written, so this checks the outputs; tests/unit/test_fastlora_activation.py checks the
tensors against vLLM's own activation).

Run as a script, this file is the engine side: ``python THIS MODEL ADAPTERS_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from engine_script import run_engine_script

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
ORDER = ["narrow", "wide", "narrow", "wide", "narrow", None]


def engine_main(model: str, adapters_json: str, out_json: str) -> None:
    """Generate PROMPTS for each adapter of ORDER in turn; write the token ids per turn."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = json.loads(adapters_json)
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=256,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=16,
        max_num_seqs=4,
        enforce_eager=True,
        seed=0,
    )
    requests = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())
    }
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    turns = []
    for name in ORDER:
        outputs = llm.generate(
            PROMPTS, params, lora_request=requests[name] if name else None, use_tqdm=False
        )
        turns.append({"adapter": name, "tokens": [list(o.outputs[0].token_ids) for o in outputs]})
    Path(out_json).write_text(json.dumps(turns))


@pytest.mark.integration
def test_a_reused_slot_carries_nothing_of_its_last_adapter(base_model_dir, tmp_path):
    from loraplex.testing.random_adapters import LINEAR_PROJECTIONS, make_random_adapters

    # wide has the higher rank: writing narrow over it must zero wide's q/v rows from 8 on
    targets = {"narrow": (8, ["q_proj", "v_proj"]), "wide": (16, list(LINEAR_PROJECTIONS))}
    adapters = {
        name: str(
            make_random_adapters(
                base_model_dir, [tmp_path / name], seed=seed, rank=rank, std=0.04, targets=modules
            )[0]
        )
        for seed, (name, (rank, modules)) in enumerate(targets.items(), start=3)
    }
    args = [str(base_model_dir), json.dumps(adapters)]
    turns, log = run_engine_script(__file__, args, tmp_path)
    assert "Using FastPunicaWrapperCPU" in log
    by_adapter: dict[str | None, list] = {}
    for turn in turns:
        by_adapter.setdefault(turn["adapter"], []).append(turn["tokens"])
    narrow, wide, (base,) = by_adapter["narrow"], by_adapter["wide"], by_adapter[None]
    assert narrow[0] == narrow[1] == narrow[2]
    assert wide[0] == wide[1]
    # the equalities above could not fail if the adapters changed nothing
    assert narrow[0] != base and wide[0] != base and narrow[0] != wide[0]


if __name__ == "__main__":
    engine_main(*sys.argv[1:4])
