"""How a classifier turns token states into one sentence vector: CLS (BERT's pooler) or the masked mean.

Sentence-transformers checkpoints such as all-MiniLM-L6-v2 are trained to be read by the
mean of their token states (their ``1_Pooling/config.json`` says so); their BERT pooler
(dense + tanh on the CLS token) was never trained for it. On SST-2 the CLS pooler's output
varies ~7x less across sentences than the mean does, and a linear probe on it scores lower
(README, "DP that learns"), which matters most under DP-SGD, where the head must learn from
few noisy steps. ``model.pooling = "auto"`` uses what the checkpoint declares.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import cached_file

POOLING_FILE = "1_Pooling/config.json"  # sentence-transformers' record of how its checkpoint pools


class MaskedMeanPooler(nn.Module):
    """The mean of the token states the attention mask keeps (sentence-transformers' mean pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None  # set by the encoder's pre-hook before every forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(1)
        keep = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def declared_pooling(checkpoint: str | Path) -> str:
    """ "mean" when the checkpoint's sentence-transformers pooling file says mean, else "cls".

    A local folder is read directly; a hub id's file comes with the model the user asked for.
    """
    path = Path(checkpoint) / POOLING_FILE
    if not Path(checkpoint).exists():
        found = cached_file(
            str(checkpoint),
            POOLING_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        path = Path(found) if found else path
    if not path.is_file():
        return "cls"
    modes = json.loads(path.read_text(encoding="utf-8"))
    return "mean" if modes.get("pooling_mode_mean_tokens") else "cls"


def use_mean_pooling(model: PreTrainedModel) -> None:
    """Replace a BERT-style classifier's CLS pooler by the masked mean of its token states."""
    encoder = getattr(model, model.base_model_prefix, None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ValueError(f"model.pooling='mean' needs a BERT-style encoder with a pooler; {type(model).__name__} has none")
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def remember_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask = mask

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
