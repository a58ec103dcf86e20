"""OpenAI's two ``logprobs`` shapes, built from the engine's ``TokenLogprob`` values.

Completions: ``{tokens, token_logprobs, top_logprobs, text_offset}``, where ``top_logprobs``
maps each alternative to its logprob and includes the chosen token (vLLM's and OpenAI's
legacy shape), and an echoed prompt's first token has ``null`` for both. Chat:
``{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal}``
with exactly ``top_logprobs`` alternatives, most likely first. Nothing here touches HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraplex.engine.types import TokenLogprob


class ChoiceLogprobs:
    """Completions logprobs of one choice, chunk by chunk; ``text_offset`` runs on across
    chunks (each token's offset into the choice's text, echoed prompt included)."""

    def __init__(self) -> None:
        self.offset = 0

    def shape(self, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The logprobs object for ``tokens``, the next tokens of this choice."""
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
            "text_offset": offsets,
        }


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: Sequence[TokenLogprob], top: int) -> dict[str, Any]:
    """The chat ``logprobs`` object: each token with its ``top`` most likely alternatives."""
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": _bytes(t.token),
            "top_logprobs": [
                {"token": alt, "logprob": logprob, "bytes": _bytes(alt)}
                for alt, logprob in t.top[:top]
            ],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}
