"""``row_invariance``: a 16-bit linear layer's row has the same bits alone and in a batch,
through vLLM's real CPU linear dispatch (oneDNN; ``torch`` on a CPU without AVX-512)."""

from __future__ import annotations

import pytest
import torch

from loraplex.fastlora.row_invariance import pad_16_bit_linears

K, N = 1536, 576  # the bundled model's down projection: oneDNN computes one row differently


def dispatched_layer(weight: torch.Tensor) -> torch.nn.Module:
    from vllm.model_executor.layers import utils

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def first_row(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.cpu_linear(x.contiguous(), layer.weight, None)[0]


@pytest.fixture
def original_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's dispatch as it is, restored after the test (the patch is process-wide)."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    while getattr(original, "__wrapped__", None) is not None:
        original = original.__wrapped__
    monkeypatch.setattr(utils, "dispatch_cpu_unquantized_gemm", original)


def test_one_row_alone_equals_that_row_in_a_batch_in_bf16(original_dispatch) -> None:
    torch.manual_seed(0)
    trials = [
        (torch.randn(N, K, dtype=torch.bfloat16), torch.randn(8, K, dtype=torch.bfloat16))
        for _ in range(40)
    ]
    plain = [first_row(dispatched_layer(w), x[:1]) for w, x in trials]
    plain_batched = [first_row(dispatched_layer(w), x) for w, x in trials]

    pad_16_bit_linears()
    pad_16_bit_linears()  # idempotent: wrapped once
    for w, x in trials:
        layer = dispatched_layer(w)
        alone = first_row(layer, x[:1])
        for rows in (2, 3, 8):
            assert torch.equal(alone, first_row(layer, x[:rows]))
        assert layer.cpu_linear(x, layer.weight, None).shape == (8, N)
    if all(torch.equal(a, b) for a, b in zip(plain, plain_batched, strict=True)):
        pytest.skip("this CPU's linear computes one row as it does in a batch: nothing to fix")


def test_fp32_layers_are_left_as_vllm_built_them(original_dispatch) -> None:
    pad_16_bit_linears()
    layer = dispatched_layer(torch.randn(N, K))
    x = torch.randn(3, K)
    assert layer.cpu_linear.__qualname__.startswith("dispatch_cpu_unquantized_gemm")
    assert layer.cpu_linear(x, layer.weight, None).shape == (3, N)
