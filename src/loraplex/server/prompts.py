"""Turning request text into token ids with the base model's tokenizer and chat template.

The server tokenizes itself (rather than letting the engine do it) so that it can check the
length against the context window and answer 400 before anything reaches the engine.
"""

from __future__ import annotations

from pathlib import Path

from loraplex.errors import InvalidRequest


class PromptBuilder:
    """The base model's tokenizer, with length checks."""

    def __init__(self, model_dir: Path, max_model_len: int, default_max_tokens: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens

    def completion(self, prompt: str) -> list[int]:
        """Token ids of a plain completion prompt (with the model's BOS handling)."""
        if not prompt:
            raise InvalidRequest("prompt must not be empty.")
        return list(self.tokenizer.encode(prompt))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, rendered with the base model's chat template."""
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja errors from templates that reject a message order
            raise InvalidRequest(f"The chat could not be rendered by the template: {exc}") from exc
        return list(ids)

    def budget(self, prompt_ids: list[int], requested: int | None) -> int:
        """The completion length to use; 400 if the prompt leaves no room for it.

        Without a request, as much as the context leaves, up to ``default_max_tokens``.
        """
        room = self.max_model_len - len(prompt_ids)
        if requested is None:
            if room < 1:
                raise InvalidRequest(self._too_long(len(prompt_ids), 1))
            return min(room, self.default_max_tokens)
        if requested > room:
            raise InvalidRequest(self._too_long(len(prompt_ids), requested))
        return requested

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> str:
        return (
            f"This model's context is {self.max_model_len} tokens; the prompt has "
            f"{prompt_tokens} and max_tokens asks for {max_tokens}. Shorten the prompt or "
            "lower max_tokens."
        )
