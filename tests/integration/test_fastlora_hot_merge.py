"""A hot adapter merged into the base weights gives the same tokens as unmerged (fp32, compiled).

One engine with ``merge_hot`` on runs the same workload twice: first with merging switched
off (the reference), then on. The workload is a batch of the hot adapter alone (an adapter of
every projection, so every kind of linear layer is merged), long enough for the policy to
merge it mid-generation, then a mixed batch (hot adapter, a q/v adapter, base) that starts
merged, so the other rows get the hot adapter subtracted, until the policy unmerges it
mid-generation. Every request's greedy tokens must equal the reference's, across both
switches. The model is compiled (the server's default): the merge swaps the pointer inside
vLLM's oneDNN handle, which a compiled graph must read at every step. A second test does
the same through ``loraplex serve --merge-hot on``.

Run as a script, this file is the engine side: ``python THIS MODEL ADAPTERS_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from engine_script import run_engine_script

from loraplex.testing.launcher import TEST_BASE_NAME, loraplex_server, server_env

pytestmark = pytest.mark.integration

HOT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colours.",
    "Why is the sky blue?",
    "Name a large animal.",
    "How do bees make honey?",
]
MIXED_PROMPTS = ["Tell me about Paris.", "What is two plus two?", "Describe a forest."]


def _wrapper_state(worker, merging: bool | None = None) -> dict:
    """In the engine's worker: switch merging (when given) and report steps and switches."""
    from loraplex.fastlora.punica import wrappers

    (wrapper,) = wrappers()
    if merging is not None:
        wrapper.hot_merge.set_enabled(merging)
    return {"steps": wrapper.hot_merge.steps, "events": list(wrapper.hot_merge.events)}


def engine_main(model: str, adapters_json: str, out_json: str) -> None:
    """Run the workload with merging off, then on; write tokens, steps and switches."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = json.loads(adapters_json)
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=256,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=16,
        max_num_seqs=8,
        seed=0,
    )
    hot = LoRARequest("hot", 1, adapters["hot"])
    other = LoRARequest("other", 2, adapters["other"])
    # the hot batch outlasts the policy's decision (~10 steps in) and the packing (~30 steps)
    hot_params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    phases = {}
    for merging in (False, True):
        marks = [llm.collective_rpc(_wrapper_state, args=(merging,))[0]["steps"]]
        hot_out = llm.generate(HOT_PROMPTS, hot_params, lora_request=hot, use_tqdm=False)
        marks.append(llm.collective_rpc(_wrapper_state)[0]["steps"])
        mixed_out = llm.generate(
            MIXED_PROMPTS, params, lora_request=[hot, other, None], use_tqdm=False
        )
        state = llm.collective_rpc(_wrapper_state)[0]
        phases["on" if merging else "off"] = {
            "hot": [list(o.outputs[0].token_ids) for o in hot_out],
            "mixed": [list(o.outputs[0].token_ids) for o in mixed_out],
            "marks": [*marks, state["steps"]],
            "events": state["events"],
        }
    base = llm.generate(MIXED_PROMPTS, params, use_tqdm=False)
    phases["base"] = [list(o.outputs[0].token_ids) for o in base]
    Path(out_json).write_text(json.dumps(phases))


def test_a_merged_hot_adapter_gives_the_unmerged_tokens(base_model_dir, tmp_path):
    from loraplex.testing.random_adapters import LINEAR_PROJECTIONS, make_random_adapters

    targets = {"hot": list(LINEAR_PROJECTIONS), "other": ["q_proj", "v_proj"]}
    adapters = {
        name: str(
            make_random_adapters(
                base_model_dir, [tmp_path / name], seed=seed, rank=8, std=0.04, targets=modules
            )[0]
        )
        for seed, (name, modules) in enumerate(targets.items(), start=5)
    }
    phases, _ = run_engine_script(
        __file__,
        [str(base_model_dir), json.dumps(adapters)],
        tmp_path,
        LORAPLEX_MERGE_HOT="on",
        LORAPLEX_MERGE_HOT_TOKENS="64",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc of a function
    )
    off, on, base = phases["off"], phases["on"], phases["base"]

    assert off["events"] == []  # merging off: nothing merged
    start, hot_done, mixed_done = on["marks"]
    (merge, unmerge) = on["events"]
    assert merge[:2] == ["merge", 1] and start < merge[2] < hot_done  # mid hot batch
    assert unmerge[:2] == ["unmerge", 1] and hot_done + 1 < unmerge[2] <= mixed_done
    # the same tokens across both switches, for the hot adapter, another one and the base
    assert on["hot"] == off["hot"]
    assert on["mixed"] == off["mixed"]
    # ... which would not be worth much if the adapters changed nothing
    assert off["mixed"][0] != base[0] and off["mixed"][1] != base[1]
    assert off["mixed"][2] == base[2]


def test_a_served_hot_adapter_is_merged_and_answers_as_before(
    tmp_path, base_model_dir, adapters_dir
):
    """Through ``loraplex serve --merge-hot on``: the setting reaches the engine's process,
    no request fails, and the adapter and the base answer as they did before the merge."""
    env = server_env(
        tmp_path, base_model_dir, adapters_dir=adapters_dir, merge_hot="on", merge_hot_tokens=100
    )
    prompt = "Tell me about the sea."
    log = tmp_path / "server.log"
    with (
        loraplex_server(log, env=env) as server,
        httpx.Client(base_url=server.url, timeout=300) as client,
    ):

        def complete(model: str, text: str = prompt, max_tokens: int = 16) -> str:
            response = client.post(
                "/v1/completions",
                json={
                    "model": model,
                    "prompt": text,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        def hot_metrics() -> list[str]:
            lines = client.get("/metrics").text.splitlines()
            return [line for line in lines if line.startswith("loraplex_hot_")]

        before = {model: complete(model) for model in ("pirate", TEST_BASE_NAME)}
        assert "into the base weights" not in server.log_path.read_text()
        assert hot_metrics() == ["loraplex_hot_merges_total 0.0", "loraplex_hot_unmerges_total 0.0"]
        # the pirate's traffic alone, ~800 tokens: decided after ~30 steps, packed in ~30 more
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: complete("pirate", f"Story {i}:", 96), range(8)))
        assert "into the base weights" in server.log_path.read_text()
        after = {model: complete(model) for model in ("pirate", TEST_BASE_NAME)}
        assert "unmerged LoRA" not in server.log_path.read_text()  # still merged
        merged, *counts = hot_metrics()
        assert re.fullmatch(r'loraplex_hot_merged\{version="pirate@[\w-]+"\} 1\.0', merged)
        assert counts == ["loraplex_hot_merges_total 1.0", "loraplex_hot_unmerges_total 0.0"]
    assert after == before
    assert before["pirate"] != before[TEST_BASE_NAME]


if __name__ == "__main__":
    engine_main(*sys.argv[1:4])
