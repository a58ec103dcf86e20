"""The training loss: cross-entropy over answer tokens only, and the batches that feed it.

``collate`` pads a batch and records, on the CPU, which positions count in the loss;
``answer_loss`` runs the decoder and applies ``lm_head`` only at those positions, so prompt
positions cost no vocabulary projection (the value equals the model's own shifted loss).
``trainer_class`` is the transformers ``Trainer`` that uses it (under the Trainer's
autocast) for decoders whose logits are plain ``lm_head(hidden)``; others keep the model's
own loss. This module does not choose devices or hyperparameters.
"""

from __future__ import annotations

from typing import Any

from loraplex.train.encode import IGNORE_INDEX, pad_batch

# Decoders whose logits are exactly lm_head(hidden): the loss may skip masked positions.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi3"}

LOSS_KEYS = ("loss_index", "loss_targets")


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Tensors of a padded batch, plus where the loss counts (computed here, on the CPU).

    ``loss_index`` holds the flat positions (row * length + column) whose next token is a
    label, ``loss_targets`` those labels; the attention mask is left out when nothing is
    padded, so attention runs as plain causal attention.
    """
    import torch

    batch = {k: torch.tensor(v) for k, v in pad_batch(items, pad_id).items()}
    labels = batch["labels"]
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    batch["loss_index"] = rows * labels.shape[1] + cols
    batch["loss_targets"] = labels[rows, cols + 1]
    if bool(batch["attention_mask"].all()):
        del batch["attention_mask"]
    return batch


def answer_loss(causal_lm: Any, inputs: dict[str, Any], num_items: Any) -> Any:
    """Cross-entropy over answer positions only; ``lm_head`` never sees prompt positions.

    Equal to the model's own shifted loss (sum over labelled tokens / ``num_items``), but
    the vocabulary projection and softmax run only where a label counts: cheaper in time,
    and in memory where the vocabulary is large. Needs ``collate``'s ``loss_*`` tensors.
    """
    import torch.nn.functional as F

    hidden = causal_lm.get_decoder()(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
    ).last_hidden_state
    picked = hidden.flatten(0, 1).index_select(0, inputs["loss_index"])
    logits = causal_lm.get_output_embeddings()(picked).float()
    total = F.cross_entropy(logits, inputs["loss_targets"], reduction="sum")
    count = num_items if num_items is not None else max(len(inputs["loss_targets"]), 1)
    return total / count


def trainer_class() -> Any:
    """``Trainer`` whose loss skips prompt positions for plain-head decoders."""
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        def compute_loss(  # type: ignore[override]
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:  # fmt: skip
            unwrapped = self.accelerator.unwrap_model(model)
            causal = (
                unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            )
            if causal.config.model_type not in PLAIN_HEAD_MODELS:
                plain = {k: v for k, v in inputs.items() if k not in LOSS_KEYS}
                return super().compute_loss(model, plain, return_outputs, num_items_in_batch)
            with self.accelerator.autocast():  # the Trainer autocasts only model.forward
                loss = answer_loss(causal, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return AnswerLossTrainer
