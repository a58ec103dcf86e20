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

from loraplex.train.encode import IGNORE_INDEX

# Decoders whose logits are exactly lm_head(hidden): the loss may skip masked positions.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi3"}

LOSS_KEYS = ("loss_index", "loss_targets")


def collate(
    items: list[dict[str, list[int]]], pad_id: int, width: int | None = None, varlen: bool = False
) -> dict[str, Any]:
    """Tensors of a padded batch, plus where the loss counts (computed here, on the CPU).

    Rows may hold lists or tensors (the training dataset keeps tensors: building a batch
    from Python lists cost tens of milliseconds per step on the training process).

    ``loss_index`` holds the flat positions (row * length + column) whose next token is a
    label, ``loss_targets`` those labels; the attention mask is left out when nothing is
    padded, so attention runs as plain causal attention. Packed rows (``position_ids``,
    ``loraplex.train.packing``) never carry an attention mask: their padding is one more
    sequence of restarting positions, which the packed-sequence mask keeps apart. ``width``
    pads every batch to one length (one shape, so compiled attention compiles once).
    ``varlen``: the batch also carries ``cu_seq_lens``, where each sequence (example or pad
    tail) of the flattened batch starts (``loraplex.train.varlen``), so attention needs no
    mask; packed rows or not (evaluation batches are not packed).
    """
    import torch

    rows = [{k: torch.as_tensor(v) for k, v in item.items()} for item in items]
    sizes = [len(row["input_ids"]) for row in rows]
    width = max(max(sizes), width or 0)
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
    }
    packed = "position_ids" in rows[0]
    positions = torch.arange(width).repeat(len(rows), 1)  # each pad tail restarts at 0
    for i, (row, size) in enumerate(zip(rows, sizes, strict=True)):
        batch["input_ids"][i, :size] = row["input_ids"]
        batch["attention_mask"][i, :size] = 1
        batch["labels"][i, :size] = row["labels"]
        if packed:
            positions[i, :size] = row["position_ids"]
        positions[i, size:] = torch.arange(width - size)
    if packed:
        batch["position_ids"] = positions
        del batch["attention_mask"]
    if varlen:
        from loraplex.train.varlen import cu_seq_lens

        batch["cu_seq_lens"] = cu_seq_lens(positions)
    labels = batch["labels"]
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    batch["loss_index"] = rows * labels.shape[1] + cols
    batch["loss_targets"] = labels[rows, cols + 1]
    if "attention_mask" in batch and bool(batch["attention_mask"].all()):
        del batch["attention_mask"]
    return batch


def answer_loss(causal_lm: Any, inputs: dict[str, Any], num_items: Any, fused: bool = False) -> Any:
    """Cross-entropy over answer positions only; ``lm_head`` never sees prompt positions.

    Equal to the model's own shifted loss (sum over labelled tokens / ``num_items``), but
    the vocabulary projection and softmax run only where a label counts: cheaper in time,
    and in memory where the vocabulary is large. Needs ``collate``'s ``loss_*`` tensors.
    ``fused``: Liger's fused linear + cross-entropy (``loraplex.train.kernels``), which never
    stores those logits either.
    """
    import torch.nn.functional as F

    bounds = inputs.get("cu_seq_lens")  # varlen attention reads them from the layer kwargs
    varlen = {} if bounds is None else {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}
    hidden = causal_lm.get_decoder()(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        position_ids=inputs.get("position_ids"),
        use_cache=False,  # with a cache, transformers would not read packed position ids
        **varlen,
    ).last_hidden_state
    picked = hidden.flatten(0, 1).index_select(0, inputs["loss_index"])
    head = causal_lm.get_output_embeddings()
    if fused:
        from loraplex.train.kernels import fused_answer_loss

        total = fused_answer_loss(head, picked, inputs["loss_targets"])
    else:
        total = F.cross_entropy(head(picked).float(), inputs["loss_targets"], reduction="sum")
    count = num_items if num_items is not None else max(len(inputs["loss_targets"]), 1)
    return total / count


def trainer_class(fused: bool = False) -> Any:
    """``Trainer`` whose loss skips prompt positions for plain-head decoders (``fused``: with
    the fused linear + cross-entropy)."""
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
                plain = {k: v for k, v in inputs.items() if k not in (*LOSS_KEYS, "cu_seq_lens")}
                if "cu_seq_lens" in inputs:  # varlen attention reads them from the kwargs
                    plain["cu_seq_lens_q"] = plain["cu_seq_lens_k"] = inputs["cu_seq_lens"]
                return super().compute_loss(model, plain, return_outputs, num_items_in_batch)
            with self.accelerator.autocast():  # the Trainer autocasts only model.forward
                loss = answer_loss(causal, inputs, num_items_in_batch, fused)
            return (loss, {"loss": loss}) if return_outputs else loss

    return AnswerLossTrainer
