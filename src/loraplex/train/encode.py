"""Turning checked examples into token ids and labels, the way the server will prompt.

The prompt is tokenized exactly as vLLM does for the matching request, so the adapter is
trained on what it will be served. The prompt format is one per run (``resolve_format``):

- completion: ``tokenizer(input, add_special_tokens=True)`` (as ``/v1/completions``), then
  the output's tokens and EOS; ``{"messages"}`` rows cannot be trained this way;
- chat: the base model's chat template over all messages but the last, with the generation
  prompt, encoded without special tokens (as ``/v1/chat/completions``); then the last
  assistant message as the template renders it, cut after its first stop token. An
  ``{"input", "output"}`` row is the user turn ``input`` and the assistant answer ``output``.

Labels equal the input ids with every prompt position set to -100, so the loss counts only
the answer (including its stop token). Over-long examples are reported by line number.
This module needs a tokenizer object but not torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraplex.errors import InvalidRequest
from loraplex.train import data
from loraplex.train.data import Dataset, Example, LineError

IGNORE_INDEX = -100
Format = Literal["chat", "completion"]


def resolve_format(requested: str, tokenizer: Any) -> Format:
    """``auto`` -> chat if the base has a chat template (what most clients call), else
    completion; ``chat`` on a base without a template is refused."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "auto":
        return "chat" if has_template else "completion"
    if requested == "chat" and not has_template:
        raise InvalidRequest(
            "--format chat: the base model's tokenizer has no chat template; "
            "use --format completion."
        )
    return "chat" if requested == "chat" else "completion"


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels of one example (same length; prompt labels are -100)."""

    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        """How many positions count in the loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class Encoder:
    """Encodes examples with one tokenizer; ``stop_ids`` end an answer (EOS, end of turn)."""

    def __init__(
        self, tokenizer: Any, stop_ids: Iterable[int] = (), prompt_format: Format = "completion"
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        eos = tokenizer.eos_token_id
        if eos is None:
            raise InvalidRequest("The base model's tokenizer has no EOS token; it cannot be used.")
        self.eos_id = int(eos)
        self.stop_ids = {self.eos_id, *(int(i) for i in stop_ids)}

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, example: Example) -> Encoded:
        """Ids and masked labels of one example."""
        if example.kind == "chat":
            prompt, answer = self._chat(example.messages)
        elif self.prompt_format == "chat":
            turns = ({"role": "user", "content": example.prompt},
                     {"role": "assistant", "content": example.answer})  # fmt: skip
            prompt, answer = self._chat(turns)
        else:
            prompt = self._ids(example.prompt, special=True)
            answer = [*self._ids(example.answer, special=False), self.eos_id]
        return Encoded(example.line, prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)

    def _chat(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                "The base model's tokenizer has no chat template, so chat data cannot be "
                'trained on it; write {"input", "output"} lines instead.'
            )
        template = self.tokenizer.apply_chat_template
        prompt_text = template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full_text = template(list(messages), tokenize=False)
        prompt = self._ids(prompt_text, special=False)
        full = self._ids(full_text, special=False)
        if full_text.startswith(prompt_text) and full[: len(prompt)] == prompt:
            answer = full[len(prompt) :]
        else:
            answer = self._ids(messages[-1]["content"], special=False)
        cut = next((i for i, t in enumerate(answer) if t in self.stop_ids), None)
        answer = answer[: cut + 1] if cut is not None else [*answer, self.eos_id]
        return prompt, answer


def encode_file(encoder: Encoder, path: Path, max_seq_len: int) -> tuple[Dataset, list[Encoded]]:
    """Read, check and encode a whole file; one ``DataError`` lists every bad line.

    Shape errors and "too long" errors are collected together, so one run reports all of
    them; nothing is returned unless every line is good.
    """
    dataset, errors = data.read(path)
    encoded = []
    for example in dataset.examples:
        if example.kind == "chat" and encoder.prompt_format == "completion":
            errors.append(
                LineError(example.line, '"messages" rows train as chat; drop --format completion')
            )
            continue
        item = encoder.encode(example)
        if len(item.input_ids) > max_seq_len:
            errors.append(
                LineError(
                    example.line,
                    f"too long: {len(item.input_ids)} tokens after tokenization "
                    f"(prompt + answer), more than --max-seq-len {max_seq_len}",
                )
            )
        encoded.append(item)
    data.raise_if_bad(dataset, errors)
    return dataset, encoded


def pad_batch(
    items: Sequence[dict[str, list[int]]], pad_id: int, width: int | None = None
) -> dict[str, list[list[int]]]:
    """Right-pad ``input_ids``/``labels`` of a batch (to ``width``, else to its longest);
    padding is masked in labels and attention."""
    width = max([len(item["input_ids"]) for item in items] + [width or 0])
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for item in items:
        pad = width - len(item["input_ids"])
        batch["input_ids"].append(list(item["input_ids"]) + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
        batch["labels"].append(list(item["labels"]) + [IGNORE_INDEX] * pad)
    return batch
