"""Unit tests of label masking with a character-level fake tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.errors import InvalidRequest
from loraplex.train.data import DataError, Example
from loraplex.train.encode import IGNORE_INDEX, Encoder, encode_file, pad_batch, resolve_format

EOS, BOS = 1, 2


class CharTokenizer:
    """One id per character (ord + 10); ``<e>`` is EOS, ``<s>`` BOS, added to prompts."""

    eos_token_id = EOS
    chat_template = "fake"

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = []
        while text:
            if text.startswith("<e>"):
                ids.append(EOS)
                text = text[3:]
            else:
                ids.append(ord(text[0]) + 10)
                text = text[1:]
        return {"input_ids": ([BOS] if add_special_tokens and self.add_bos else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}<e>\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")

    def decode(self, ids: list[int]) -> str:
        return "".join("<e>" if i == EOS else chr(i - 10) for i in ids if i != BOS)


def test_completion_masks_prompt_and_ends_with_eos() -> None:
    enc = Encoder(CharTokenizer()).encode(Example(3, "completion", prompt="Q:", answer=" ok"))
    assert enc.input_ids == [BOS, ord("Q") + 10, ord(":") + 10, ord(" ") + 10, ord("o") + 10,
                             ord("k") + 10, EOS]  # fmt: skip
    assert enc.labels[:3] == [IGNORE_INDEX] * 3
    assert enc.labels[3:] == enc.input_ids[3:]
    assert len(enc.labels) == len(enc.input_ids)
    assert enc.answer_tokens == 4 and enc.line == 3


def test_chat_uses_template_prompt_and_cuts_after_stop() -> None:
    tok = CharTokenizer()
    messages = (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    )
    enc = Encoder(tok).encode(Example(1, "chat", messages=messages))
    prompt = tok.apply_chat_template(list(messages[:-1]), add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert tok.decode(enc.input_ids[:n]) == prompt
    assert enc.labels[:n] == [IGNORE_INDEX] * n
    # the answer as the template renders it, through the end-of-turn token, not the newline
    assert tok.decode(enc.labels[n:]) == "yo<e>"
    assert enc.input_ids[-1] == EOS


def test_multi_turn_trains_only_the_last_answer() -> None:
    messages = (
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    )
    tok = CharTokenizer()
    enc = Encoder(tok).encode(Example(1, "chat", messages=messages))
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "second<e>"


def test_chat_needs_a_template() -> None:
    tok = CharTokenizer()
    tok.chat_template = None
    messages = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
    with pytest.raises(InvalidRequest, match="no chat template"):
        Encoder(tok).encode(Example(1, "chat", messages=messages))


def test_input_output_rows_train_as_one_chat_turn() -> None:
    tok = CharTokenizer()
    row = Encoder(tok, prompt_format="chat").encode(Example(1, "completion", prompt="hi",
                                                           answer="yo"))  # fmt: skip
    turns = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    assert row == Encoder(tok).encode(Example(1, "chat", messages=turns))


def test_format_auto_is_chat_only_with_a_template() -> None:
    tok = CharTokenizer()
    assert resolve_format("auto", tok) == "chat"
    assert resolve_format("completion", tok) == "completion"
    tok.chat_template = None
    assert resolve_format("auto", tok) == "completion"
    with pytest.raises(InvalidRequest, match="--format completion"):
        resolve_format("chat", tok)


def test_messages_rows_refused_for_completion_format(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path.write_text(json.dumps({"input": "q", "output": "a"}) + "\n"
                    + json.dumps({"messages": turns}) + "\n")  # fmt: skip
    with pytest.raises(DataError) as info:
        encode_file(Encoder(CharTokenizer(), prompt_format="completion"), path, max_seq_len=99)
    assert [e.line for e in info.value.errors] == [2]
    assert "--format completion" in info.value.errors[0].problem


def test_too_long_lines_reported_with_shape_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [
        json.dumps({"input": "short", "output": "x"}),
        json.dumps({"input": "a" * 50, "output": "x"}),
        "not json",
        json.dumps({"input": "b", "output": "c" * 40}),
    ]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as info:
        encode_file(Encoder(CharTokenizer()), path, max_seq_len=20)
    assert [e.line for e in info.value.errors] == [2, 3, 4]
    assert "too long: 53 tokens" in info.value.errors[0].problem
    assert "--max-seq-len 20" in info.value.errors[0].problem


def test_encode_file_good(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"input": "q", "output": "a"}) + "\n")
    dataset, items = encode_file(Encoder(CharTokenizer()), path, max_seq_len=20)
    assert len(items) == 1 and dataset.sha256


def test_pad_batch_masks_padding() -> None:
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    batch = pad_batch(items, pad_id=0)
    assert batch["input_ids"] == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"] == [[-100, 6, 7], [5, -100, -100]]


def test_tokenizer_without_eos_is_refused() -> None:
    tok = CharTokenizer()
    tok.eos_token_id = None
    with pytest.raises(InvalidRequest, match="no EOS"):
        Encoder(tok)
