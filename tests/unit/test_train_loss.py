"""Unit test: the answer-only loss equals the model's own shifted loss (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from loraplex.train.loss import answer_loss, collate


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97)  # fmt: skip
    return LlamaForCausalLM(config).eval()


ITEMS = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
    {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
    {"input_ids": [13, 14, 15, 16, 17, 18], "labels": [-100, -100, -100, -100, 17, 18]},
]


@pytest.mark.parametrize("items", [ITEMS, [ITEMS[0], ITEMS[0]]], ids=["padded", "unpadded"])
def test_answer_loss_equals_model_loss(tiny_llama, items) -> None:
    batch = collate(items, pad_id=0)
    assert ("attention_mask" in batch) == (len({len(i["input_ids"]) for i in items}) > 1)
    with torch.no_grad():
        expected = tiny_llama(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
        ).loss
        got = answer_loss(tiny_llama, batch, None)
        count = (batch["labels"][:, 1:] != -100).sum()
        scaled = answer_loss(tiny_llama, batch, count * 2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(scaled, expected / 2)


def test_collate_marks_exactly_the_answer_positions() -> None:
    batch = collate(ITEMS, pad_id=0)
    width = batch["input_ids"].shape[1]
    positions = [(int(i) // width, int(i) % width) for i in batch["loss_index"]]
    assert positions == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 3), (2, 4)]
    assert batch["loss_targets"].tolist() == [7, 8, 9, 11, 12, 17, 18]
