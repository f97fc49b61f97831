"""Per-example losses: one number per sequence, so one example's weight never depends on the others.

Generation: mean token cross-entropy over the completion tokens of each sequence (labels
are -100 on prompt and padding). Classification: cross-entropy of each example. Summing
or averaging these per-example values is what DP-SGD needs too (DESIGN 3.1).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fedlpp.models.machine import model_device

IGNORE = -100


def example_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
    """[B] losses for a collated batch (input_ids, attention_mask, labels)."""
    logits, labels = forward_logits(model, batch, kind)
    return losses_from_logits(logits, labels, kind)


def forward_logits(model: nn.Module, batch: Mapping[str, torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the labels aligned with them.

    For causal LMs only the positions from the earliest completion token on are projected
    onto the vocabulary (``logits_to_keep``): prompt positions carry no loss, and the LM
    head over a 49k vocabulary is most of a small model's cost.
    """
    device = model_device(model)  # batches are collated on the CPU; the model may be elsewhere
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    labels = batch["labels"].to(device)
    keep = _positions_to_keep(labels) if kind == "generation" and _accepts_logits_to_keep(model) else 0
    if keep:
        inputs["logits_to_keep"] = keep
        labels = labels[:, -keep:]
    return model(**inputs).logits, labels


def _positions_to_keep(labels: torch.Tensor) -> int:
    scored = (labels != IGNORE).any(0).nonzero()
    if len(scored) == 0:
        return 0
    # Position t predicts label t+1, so keep one position before the first scored label.
    return int(labels.shape[1] - max(int(scored[0]) - 1, 0))


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    get_base_model = getattr(model, "get_base_model", None)  # a peft model: the transformers model inside
    base: Any = get_base_model() if get_base_model is not None else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def losses_from_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """[B] losses from logits ([B, C] or [B, T, V]) and labels ([B] or [B, T])."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")  # logits [B, C]
    # Causal LM: position t predicts token t+1; the last position predicts nothing.
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)  # [B, T]
    token_loss = token_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
    mask = (targets != IGNORE).float()
    return (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)


CE_CHUNK = 2**24  # logits per cross-entropy chunk (64 MB in float32)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] float32 cross-entropies of [N, V] logits (any dtype), IGNORE targets giving 0, in chunks of rows.

    Each chunk is upcast to float32 for the softmax and, when gradients are needed, checkpointed: only
    the logits themselves are kept for backward, not a float32 log-softmax of them (at a 128k
    vocabulary that copy is the largest tensor of a LoRA step: DESIGN 5.1, bench/scale.py).
    """
    rows = max(1, CE_CHUNK // max(1, logits.shape[-1]))
    if len(logits) <= rows:
        return _cross_entropy_rows(logits, targets)
    keep_for_backward = logits.requires_grad and torch.is_grad_enabled()  # evaluation: chunks alone bound the copies

    def chunk(i: int) -> torch.Tensor:
        part, wanted = logits[i : i + rows], targets[i : i + rows]
        if keep_for_backward:
            return checkpoint(_cross_entropy_rows, part, wanted, use_reentrant=False)
        return _cross_entropy_rows(part, wanted)

    return torch.cat([chunk(i) for i in range(0, len(logits), rows)])


def _cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
