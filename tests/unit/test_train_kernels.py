"""Fused kernels (Liger) against the plain path: same loss and gradients (CUDA only, skipped
elsewhere); on CPU, ``available`` is False so training stays on the plain path."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.train import kernels
from loraplex.train.loss import answer_loss, collate

GPU = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def test_not_available_on_cpu() -> None:
    assert not kernels.available("cpu", "llama")
    assert not kernels.available("cuda", "gpt2")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                         use_cache=False)  # fmt: skip
    return LlamaForCausalLM(config).cuda().to(torch.bfloat16)


@pytest.mark.skipif(not GPU, reason="needs CUDA and liger-kernel")
def test_fused_path_matches_plain() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for size in (200, 131, 77):
        ids = torch.randint(2, 4096, (size,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (size // 3) + ids[size // 3 :]})
    batch = {k: v.cuda() for k, v in collate(rows, pad_id=0).items()}
    results = []
    for fused in (False, True):
        model = _llama()
        if fused:
            kernels.apply(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = answer_loss(model, batch, None, fused=fused)
        loss.backward()
        grad = model.model.layers[0].mlp.gate_proj.weight.grad.float()
        results.append((loss.float(), grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=1e-2)
    assert ((grad_b - grad_a).norm() / grad_a.norm()) < 3e-2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_apply_patches_that_model_only() -> None:
    """Liger swaps transformers' RMSNorm/MLP classes too; ``apply`` puts them back, so a
    model built afterwards (the plain reference, compiled layers) stays plain."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    before = (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97)  # fmt: skip
    patched = LlamaForCausalLM(config)
    kernels.apply(patched)
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP) == before
    assert "LigerSwiGLUMLP" in repr(patched) and "LigerRMSNorm" in repr(patched)
    assert "Liger" not in repr(LlamaForCausalLM(config))
