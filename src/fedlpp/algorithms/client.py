"""The client step: train the shared model's adapter for E local steps from a start point."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedlpp.models.lora import Adapter, adapter_parameters, get_adapter, set_adapter, set_trainable
from fedlpp.models.objective import example_losses


@dataclass(frozen=True)
class LocalTraining:
    lr: float
    weight_decay: float
    max_grad_norm: float  # 0 = off


@dataclass(frozen=True)
class LocalResult:
    delta: Adapter  # trained tensors only: theta_k - start
    losses: tuple[float, ...]  # training loss of every local step


def train_client(
    model: nn.Module,
    kind: str,
    start: Mapping[str, torch.Tensor],
    trained: Sequence[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    opts: LocalTraining,
    seed: int,
) -> LocalResult:
    """Load ``start`` into the model, take one AdamW step per batch, return the delta.

    A fresh optimizer every round (DESIGN 2.2) keeps clients stateless between rounds;
    ``seed`` fixes dropout so a client step is reproducible.
    """
    set_adapter(model, start)
    set_trainable(model, trained)
    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW([params[n] for n in trained], lr=opts.lr, weight_decay=opts.weight_decay)
    losses = []
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in batches:
            loss = example_losses(model, batch, kind).mean()
            loss.backward()
            if opts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([params[n] for n in trained], opts.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    after = get_adapter(model)
    return LocalResult({n: after[n] - start[n] for n in trained}, tuple(losses))
