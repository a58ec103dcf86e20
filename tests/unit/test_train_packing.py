"""Unit tests: padding-free packing gives every example the loss it has alone (tiny Llama)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from loraplex.train.encode import IGNORE_INDEX, Encoded
from loraplex.train.loss import answer_loss, collate
from loraplex.train.packing import pack, packed_attention, should_pack


def _examples(count: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for line in range(count):
        size = rng.randint(3, 40)
        prompt = rng.randint(1, size - 1)
        ids = [rng.randrange(2, 97) for _ in range(size)]
        out.append(Encoded(line, ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         attn_implementation="sdpa")  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False  # as training sets it: packed rows need no cache
    return model


def test_pack_keeps_every_example_once_within_rows() -> None:
    items = _examples(50)
    rows = pack(items, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(i.input_ids) for i in items)
    assert len(rows) < len(items) / 2  # 3-40 tokens into rows of 64: at least two per row
    starts = sum(r["position_ids"].count(0) for r in rows)
    assert starts == len(items)
    for row in rows:
        for k, pos in enumerate(row["position_ids"]):
            if pos == 0:
                assert row["labels"][k] == IGNORE_INDEX  # no loss across a boundary
            else:
                assert row["position_ids"][k - 1] == pos - 1
    with pytest.raises(ValueError):
        pack(items, 10)


def test_should_pack_rule() -> None:
    assert should_pack(None, "cuda", 100, 50) and not should_pack(None, "cuda", 100, 90)
    assert not should_pack(None, "cpu", 100, 50)
    assert should_pack(True, "cpu", 100, 100) and not should_pack(False, "cuda", 100, 10)


def test_packed_attention_auto_is_varlen_on_cuda_where_torch_has_it() -> None:
    assert packed_attention("auto", "cuda", has_varlen=True) == "varlen"
    assert packed_attention("auto", "cuda", has_varlen=False) == "flex"
    assert packed_attention("auto", "cpu", has_varlen=True) == "sdpa"
    assert packed_attention("flex", "cuda", has_varlen=True) == "flex"
    assert packed_attention("varlen", "cpu", has_varlen=False) == "varlen"


def _token_losses(logits: torch.Tensor, ids: list[int], labels: list[int]) -> torch.Tensor:
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:-1][keep], targets[keep], reduction="none")


def test_packed_losses_equal_unpacked(tiny_llama) -> None:
    items = _examples(24, seed=1)
    rows = pack(items, 80)
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        alone = {}
        for item in items:
            logits = tiny_llama(input_ids=torch.tensor([item.input_ids])).logits[0]
            alone[tuple(item.input_ids)] = _token_losses(logits, item.input_ids, item.labels)
        logits = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        packed_mean = answer_loss(tiny_llama, batch, None)
    seen = 0
    for r, row in enumerate(rows):
        bounds = [k for k, p in enumerate(row["position_ids"]) if p == 0] + [len(row["labels"])]
        for start, end in zip(bounds, bounds[1:], strict=False):
            ids = row["input_ids"][start:end]
            got = _token_losses(logits[r, start:end], ids, row["labels"][start:end])
            torch.testing.assert_close(got, alone[tuple(ids)], atol=1e-4, rtol=0)
            seen += 1
    assert seen == len(items)
    every = torch.cat(list(alone.values()))
    torch.testing.assert_close(packed_mean, every.mean(), atol=1e-4, rtol=0)


def test_packed_training_follows_the_padded_loss_curve() -> None:
    """50 LoRA steps on the same examples per step, packed vs padded: losses within 1%."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(2)
    items = []  # learnable: each token is the previous one plus one
    for line in range(200):
        start, size = rng.randrange(95), rng.randint(4, 40)
        ids = [(start + k) % 95 + 2 for k in range(size)]
        items.append(Encoded(line, ids, [IGNORE_INDEX] * 2 + ids[2:]))
    steps = [items[i * 4 : i * 4 + 4] for i in range(50)]
    curves = []
    for packed in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                             use_cache=False)  # fmt: skip
        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        )
        model = get_peft_model(LlamaForCausalLM(config), lora)
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for group in steps:
            rows = pack(group, 80) if packed else [
                {"input_ids": i.input_ids, "labels": i.labels} for i in group
            ]  # fmt: skip
            loss = answer_loss(model.get_base_model(), collate(rows, pad_id=0), None)
            loss.backward()
            optim.step()
            optim.zero_grad()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    padded, packed_curve = curves
    assert padded[-5:].mean() < 0.97 * padded[:5].mean()  # it learns
    torch.testing.assert_close(packed_curve, padded, rtol=1e-2, atol=0)


def test_cu_seq_lens_mark_every_example_and_pad_tail() -> None:
    from loraplex.train.varlen import cu_seq_lens

    rows = [{"input_ids": [5] * 5, "labels": [5] * 5, "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [5] * 3, "labels": [5] * 3, "position_ids": [0, 1, 2]}]  # fmt: skip
    batch = collate(rows, pad_id=0, width=6, varlen=True)
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 6, 9, 12]  # row 0: 3+2+pad 1; row 1: 3+3
    assert batch["cu_seq_lens"].dtype == torch.int32
    unpacked = collate([{"input_ids": [5] * 2, "labels": [5] * 2}], pad_id=0, width=4, varlen=True)
    assert unpacked["cu_seq_lens"].tolist() == [0, 2, 4]
    assert cu_seq_lens(torch.tensor([[0, 1, 2, 3]])).tolist() == [0, 4]


def test_varlen_attention_gives_every_example_its_unpacked_loss() -> None:
    """Packed rows and padded (eval) batches through ``loraplex_varlen`` attention (its CPU
    path: SDPA per sequence) give each example the loss it has alone with plain SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.train import varlen

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         attn_implementation="sdpa", use_cache=False)  # fmt: skip
    plain = LlamaForCausalLM(config).eval()
    model = LlamaForCausalLM(copy.deepcopy(config)).eval()  # use() changes the config
    model.load_state_dict(plain.state_dict())
    varlen.use(model)
    assert model.config._attn_implementation == varlen.NAME
    items = _examples(24, seed=3)
    with torch.no_grad():
        alone = torch.stack([answer_loss(plain, collate(
            [{"input_ids": i.input_ids, "labels": i.labels}], pad_id=0), None) for i in items
        ])  # fmt: skip
        counts = torch.tensor([sum(t != IGNORE_INDEX for t in i.labels[1:]) for i in items])
        expected = (alone * counts).sum() / counts.sum()
        packed = collate(pack(items, 80), pad_id=0, width=96, varlen=True)
        torch.testing.assert_close(answer_loss(model, packed, None), expected, atol=1e-4, rtol=0)
        padded = collate([{"input_ids": i.input_ids, "labels": i.labels} for i in items],
                         pad_id=0, varlen=True)  # fmt: skip
        torch.testing.assert_close(answer_loss(model, padded, None), expected, atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="cu_seq_lens_q"):
            answer_loss(model, collate(pack(items, 80), pad_id=0), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention varlen needs CUDA")
def test_varlen_cuda_kernel_matches_sdpa_per_example() -> None:
    """torch's varlen kernel (GQA, causal, scale as ``use`` found them) gives the outputs and
    gradients of causal SDPA over each example alone."""
    from loraplex.train import varlen

    if not varlen.available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    varlen._CUDA_ARGS.update(varlen._cuda_args())
    torch.manual_seed(0)
    positions = torch.tensor([[*range(5), *range(9), *range(2)], list(range(16))])
    bounds = varlen.cu_seq_lens(positions)
    shapes = ((2, 6, 16, 64), (2, 2, 16, 64), (2, 2, 16, 64))  # (B, H, S, D), 3 heads per kv
    leaves = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    weight = torch.randn(2, 16, 6, 64, device="cuda")
    results = []
    for fast in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        if fast:
            out, _ = varlen.varlen_attention(None, q, k, v, None, scaling=0.1,
                                             cu_seq_lens_q=bounds.cuda())  # fmt: skip
        else:
            flat = [varlen._flat(t.float()) for t in (q, k, v)]
            out = varlen._reference(*flat, bounds, 16, 0.1).reshape(2, 16, 6, 64)
        (out.float() * weight).sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
