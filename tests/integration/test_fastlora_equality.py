"""Fast CPU LoRA in a real vLLM engine equals transformers + PEFT token for token (fp32).

One engine (in a subprocess: vLLM spawns workers) gets a mixed batch: three prompts, each
with no adapter, adapter a0 (rank 16) and adapter a1 (rank 8), in slots of rank 32 (the ops
then multiply by the first 16 rows of each slot only: ``layer_jobs.LiveSlice.rank``).
``max_loras=2`` so every slot is taken: base tokens sit next to tokens of the last slot,
which is where vLLM's stock CPU ops go wrong (they read slot -1 as the last slot). The long
prompt is prefilled in direct segments, the short ones and every decode step go through the
packed path. Every request also asks for its prompt's logprobs (what echo scoring and
lm-evaluation-harness use): vLLM computes those logits per request chunk, a row count that is
neither the step's tokens nor its requests, and they must equal PEFT's too. A second engine
with ``LORAPLEX_FAST_LORA=off`` must start on vLLM's stock ops.

Run as a script, this file is the engine side: ``python THIS MODEL ADAPTERS_JSON OUT_JSON``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from engine_script import run_engine_script

NEW_TOKENS = 20
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "The history of the printing press is long. " * 8 + "Summarise it in one sentence:",
]
ADAPTERS = {"a0": 16, "a1": 8}


def engine_main(model: str, adapters_json: str, out_json: str) -> None:
    """Generate every (prompt, adapter) pair in one batch with vLLM; write token ids."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = json.loads(adapters_json)
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=512,
        enable_lora=True,
        max_loras=len(adapters),
        max_lora_rank=32,
        max_num_seqs=16,
        seed=0,
    )
    tokenizer = llm.get_tokenizer()
    # vLLM's stock CPU LoRA ops fail prompt logprobs in a mixed batch (an einsum over rows
    # of two sizes kills the engine), so they are asked of the fast ops only.
    scored = os.environ.get("LORAPLEX_FAST_LORA") != "off"
    jobs = [(p, name) for p in PROMPTS for name in [None, *adapters]]
    requests = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())
    }
    outputs = llm.generate(
        [{"prompt_token_ids": tokenizer(p).input_ids} for p, _ in jobs],
        SamplingParams(
            max_tokens=NEW_TOKENS,
            temperature=0,
            ignore_eos=True,
            prompt_logprobs=0 if scored else None,
        ),
        lora_request=[requests[name] if name else None for _, name in jobs],
        use_tqdm=False,
    )
    result = [
        {
            "prompt": p,
            "adapter": name,
            "tokens": list(out.outputs[0].token_ids),
            "prompt_logprobs": [
                entry[token].logprob
                for token, entry in zip(
                    out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True
                )
            ]
            if scored
            else [],
        }
        for (p, name), out in zip(jobs, outputs, strict=True)
    ]
    Path(out_json).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_model_dir) -> dict[str, str]:
    from loraplex.testing.random_adapters import make_random_adapters

    out = tmp_path_factory.mktemp("fastlora-adapters")
    paths = {}
    for seed, (name, rank) in enumerate(ADAPTERS.items(), start=1):
        (path,) = make_random_adapters(base_model_dir, [out / name], seed=seed, rank=rank, std=0.04)
        paths[name] = str(path)
    return paths


def peft_reference(
    base_model_dir: Path, adapters: dict[str, str]
) -> dict[tuple, tuple[list[int], list[float]]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    expected = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        for name in [None, *names]:
            if name is None:
                with model.disable_adapter():
                    expected[(prompt, name)] = greedy(model, ids), prompt_logprobs(model, ids)
            else:
                model.set_adapter(name)
                expected[(prompt, name)] = greedy(model, ids), prompt_logprobs(model, ids)
    return expected


def prompt_logprobs(model, ids: list[int]) -> list[float]:
    """The logprob of each prompt token after the first, given the tokens before it."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def greedy(model, ids: list[int]) -> list[int]:
    """NEW_TOKENS greedy tokens, EOS included like vLLM's ``ignore_eos`` (no min-length rule)."""
    import torch

    new: list[int] = []
    inputs, past = torch.tensor([ids]), None
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            new.append(int(out.logits[0, -1].argmax()))
            inputs, past = torch.tensor([[new[-1]]]), out.past_key_values
    return new


def run_engine(base_model_dir, adapters, tmp_path, fast: str) -> tuple[list[dict], str]:
    args = [str(base_model_dir), json.dumps(adapters)]
    return run_engine_script(__file__, args, tmp_path, LORAPLEX_FAST_LORA=fast)


@pytest.mark.integration
def test_fast_lora_equals_peft_in_a_mixed_batch(base_model_dir, adapters, tmp_path):
    got, log = run_engine(base_model_dir, adapters, tmp_path, "on")
    assert "Using FastPunicaWrapperCPU" in log
    expected = peft_reference(base_model_dir, adapters)
    for row in got:
        key = (row["prompt"], row["adapter"])
        tokens, logprobs = expected[key]
        assert row["tokens"] == tokens, key
        assert row["prompt_logprobs"] == pytest.approx(logprobs, abs=1e-3), key
    changed = [expected[(p, "a0")][0] != expected[(p, None)][0] for p in PROMPTS]
    assert any(changed), "adapter a0 changes no output: the equality above proves nothing"


@pytest.mark.integration
def test_engine_starts_with_fast_lora_off(base_model_dir, adapters, tmp_path):
    got, log = run_engine(base_model_dir, adapters, tmp_path, "off")
    assert "Using PunicaWrapperCPU" in log
    assert "FastPunicaWrapperCPU" not in log
    assert len(got) == len(PROMPTS) * (1 + len(ADAPTERS))


if __name__ == "__main__":
    engine_main(*sys.argv[1:4])
