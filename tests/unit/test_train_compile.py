"""Compiled decoder layers (``--compile``) learn what eager layers learn: on CPU with inductor,
a tiny LoRA model's loss curve on packed rows matches the eager one within 1%."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from loraplex.train import compiling, memory, runtime
from loraplex.train.encode import IGNORE_INDEX, Encoded
from loraplex.train.loss import answer_loss, collate
from loraplex.train.options import TrainOptions
from loraplex.train.packing import pack


def test_auto_compiles_on_cuda_without_checkpointing_only(tmp_path) -> None:
    assert compiling.should_compile(None, "cuda")
    assert not compiling.should_compile(None, "cpu")
    assert compiling.should_compile(True, "cpu")
    assert not compiling.should_compile(False, "cuda")
    cuda = SimpleNamespace(device="cuda")
    plans = {ckpt: memory.Plan(8, ckpt, 0, 0) for ckpt in (False, True)}
    auto = TrainOptions(data=tmp_path, name="x")
    assert runtime.use_compile(cuda, auto, plans[False])  # type: ignore[arg-type]
    assert not runtime.use_compile(cuda, auto, plans[True])  # type: ignore[arg-type]
    forced = TrainOptions(data=tmp_path, name="x", torch_compile=True)
    assert runtime.use_compile(SimpleNamespace(device="cpu"), forced, plans[True])  # type: ignore[arg-type]


def test_compiled_layers_follow_the_eager_loss_curve() -> None:
    """30 LoRA steps on packed rows of one shape, compiled vs eager layers: losses within 1%
    (one shape, so inductor compiles once)."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    rng = random.Random(3)
    items = []  # learnable: each token is the previous one plus one
    for line in range(120):
        start, size = rng.randrange(95), rng.randint(4, 40)
        ids = [(start + k) % 95 + 2 for k in range(size)]
        items.append(Encoded(line, ids, [IGNORE_INDEX] * 2 + ids[2:]))
    steps = [items[i * 4 : i * 4 + 4] for i in range(30)]
    curves = []
    for compiled in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                             use_cache=False)  # fmt: skip
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])  # fmt: skip
        model = get_peft_model(LlamaForCausalLM(config), lora)
        if compiled:
            assert compiling.compile_layers(model) == 2
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for group in steps:
            batch = collate(pack(group, 160), pad_id=0, width=160)  # one row: one shape
            loss = answer_loss(model.get_base_model(), batch, None)
            loss.backward()
            optim.step()
            optim.zero_grad()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    eager, compiled_curve = curves
    assert eager[-5:].mean() < 0.97 * eager[:5].mean()  # it learns
    assert counters["stats"]["unique_graphs"] > graphs  # the layers really ran compiled
    torch.testing.assert_close(compiled_curve, eager, rtol=1e-2, atol=0)


@pytest.mark.parametrize("wrapped", [False, True])
def test_decoder_layers_found_with_and_without_peft(wrapped: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50)  # fmt: skip
    model = LlamaForCausalLM(config)
    if wrapped:
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(compiling.decoder_layers(model)) == 3
