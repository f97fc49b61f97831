"""The local trainer: E optimizer steps on the shared model's adapter from a start point.

There is one training loop. What differs between plain training and DP-SGD — how a batch
becomes gradients and which optimizer applies them — is a ``StepRule`` the loop is given
(``PlainSteps`` here; ``privacy.dp_sgd.DpSgdSteps`` wraps the same loop with Opacus). Both
compute their forward passes under the ``Machine``'s autocast; fp16's loss scaling is
``PlainSteps``' own (DP-SGD refuses fp16: the config says why).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from fedlpp.algorithms.fedprox import ProximalTerm
from fedlpp.data import collate, length_chunks
from fedlpp.models.lora import Adapter, adapter_parameters, get_adapter, inputs_as_computed, set_adapter, set_trainable
from fedlpp.models.machine import CPU, Machine
from fedlpp.models.objective import example_losses

if TYPE_CHECKING:
    from fedlpp.config import TrainConfig

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor] | None  # None: an empty (Poisson-sampled) batch


@dataclass(frozen=True)
class LocalTraining:
    lr: float
    weight_decay: float
    max_grad_norm: float  # 0 = off (plain steps only: DP-SGD clips each example's gradient instead)
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.0  # sgd only
    proximal_mu: float = 0.0  # FedProx's mu (plain steps only); 0 = off

    @classmethod
    def of(cls, train: TrainConfig) -> LocalTraining:
        """From the config's ``[train]`` section."""
        return cls(train.lr, train.weight_decay, train.max_grad_norm, train.optimizer, train.momentum, train.proximal_mu)

    def penalty(self) -> Penalty | None:
        """What the plain steps add to each batch's loss: FedProx's proximal term when mu > 0."""
        return ProximalTerm(self.proximal_mu) if self.proximal_mu > 0 else None

    def new_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer over ``params`` (every round: clients keep no state between rounds)."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class LocalResult:
    delta: Adapter  # trained tensors only: theta_k - start
    losses: tuple[float, ...]  # training loss of every local step (nan for an empty batch)


class StepRule(Protocol):
    """How a batch becomes gradients, and the optimizer that applies them."""

    def attach(
        self, model: nn.Module, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> AbstractContextManager[torch.optim.Optimizer]:
        """The optimizer to step with while the context is open (hooks are removed on exit)."""
        ...

    def backward(self, model: nn.Module, kind: str, batch: Batch, params: Sequence[nn.Parameter]) -> float:
        """Gradients of one batch into the parameters; the batch's mean loss."""
        ...


class Penalty(Protocol):
    """A term added to every step's loss that depends only on the trained tensors (FedProx's proximal term)."""

    def anchor(self, params: Sequence[nn.Parameter]) -> None:
        """Called once before the round's first step."""
        ...

    def __call__(self, params: Sequence[nn.Parameter]) -> torch.Tensor: ...


class PlainSteps:
    """Mean loss over the batch (plus ``penalty``), one backward pass (gradient clipped to ``max_grad_norm`` if > 0),
    the optimizer as it is.

    Under fp16 the loss is scaled before backward and the optimizer steps through the scaler
    (``torch.amp.GradScaler``: a step whose gradients overflowed is skipped and the scale lowered).
    """

    def __init__(self, max_grad_norm: float = 0.0, machine: Machine = CPU, penalty: Penalty | None = None) -> None:
        self.max_grad_norm = max_grad_norm
        self.machine = machine
        self.penalty = penalty
        self.scaler: torch.amp.GradScaler | None = None

    def attach(
        self, model: nn.Module, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> AbstractContextManager[torch.optim.Optimizer]:
        if self.penalty is not None:
            self.penalty.anchor(params)
        self.scaler = self.machine.grad_scaler()
        if self.scaler is None:
            return contextlib.nullcontext(optimizer)
        return contextlib.nullcontext(ScaledOptimizer(optimizer, self.scaler, params, self.max_grad_norm))  # type: ignore[arg-type]

    def backward(self, model: nn.Module, kind: str, batch: Batch, params: Sequence[nn.Parameter]) -> float:
        if batch is None:
            raise ValueError("an empty batch has no gradient without DP-SGD's noise")
        size, total = len(batch["input_ids"]), 0.0
        with inputs_as_computed(model, self.machine):  # also while backward recomputes checkpointed blocks
            for chunk in length_chunks(batch):  # the gradient of the batch's mean loss, a chunk at a time
                with self.machine.autocast():
                    loss = example_losses(model, chunk, kind).sum() / size
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                total += float(loss.detach())
        if self.penalty is not None:  # not part of the reported loss: that stays the data's
            term = self.penalty(params)
            (term if self.scaler is None else self.scaler.scale(term)).backward()
        if self.max_grad_norm > 0 and self.scaler is None:  # scaled gradients are clipped by ScaledOptimizer
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return total


class ScaledOptimizer:
    """fp16's optimizer step: unscale the gradients, clip them if asked, step through the scaler."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: Sequence[nn.Parameter], max_grad_norm: float
    ) -> None:
        self.optimizer, self.scaler, self.params, self.max_grad_norm = optimizer, scaler, params, max_grad_norm

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:  # the gradients overflowed in fp16: this step was skipped
            log.warning(
                "fp16: a local step's gradients overflowed; the step was skipped and the loss scale lowered to %g",
                self.scaler.get_scale(),
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def train_client(
    model: nn.Module,
    kind: str,
    start: Mapping[str, torch.Tensor],
    trained: Sequence[str],
    batches: Iterable[Batch],
    opts: LocalTraining,
    seed: int,
    steps: StepRule | None = None,
    machine: Machine = CPU,
) -> LocalResult:
    """Load ``start`` into the model, take one optimizer step per batch, return the delta.

    A fresh optimizer every round (DESIGN 2.2) keeps clients stateless between rounds;
    ``seed`` fixes dropout so a client step is reproducible. ``steps`` defaults to
    ``PlainSteps(opts.max_grad_norm, machine, opts.penalty())``. The delta comes back as float32 CPU tensors.
    """
    steps = steps or PlainSteps(opts.max_grad_norm, machine, opts.penalty())
    set_adapter(model, start)
    set_trainable(model, trained)
    params = [adapter_parameters(model)[n] for n in trained]
    base = opts.new_optimizer(params)
    losses = []
    model.train()
    try:
        with steps.attach(model, params, base) as optimizer, forked_rng(machine):
            torch.manual_seed(seed)
            for batch in batches:
                losses.append(steps.backward(model, kind, batch, params))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        model.eval()
    after = get_adapter(model)
    return LocalResult({n: after[n] - start[n] for n in trained}, tuple(losses))


def forked_rng(machine: Machine) -> AbstractContextManager[None]:
    """The seeded steps leave the global generators as they were (the device's too: dropout runs there)."""
    device = machine.torch_device
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def shuffled_batches(
    features: Sequence[dict], steps: int, batch_size: int, pad_id: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches drawn by reshuffled passes over the client's data (seeded)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.permutation(len(features)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([features[i] for i in chosen], pad_id)
