"""Sample-level DP-SGD on one client (DESIGN 3.1): Opacus per-example clipping and noise.

Each step draws a Poisson batch (every example joins with probability q = batch / n_k),
computes per-example gradients of the per-sequence loss for the trained adapter tensors
only, clips each to norm C, sums, adds N(0, (sigma C)^2) and divides by the *expected*
batch size. An empty batch is still a step: noise only, counted by the accountant.

``DpSgdSteps`` is a step rule for the one local trainer (``algorithms.client.train_client``):
the loop is the same as without DP; the rule supplies per-example backward passes and the
noisy optimizer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fedlpp.data import collate, length_chunks
from fedlpp.models.machine import CPU, Machine, recomputing
from fedlpp.models.objective import example_losses
from fedlpp.privacy.randomness import Randomness

Batch = Mapping[str, torch.Tensor] | None  # None: an empty Poisson batch


@dataclass(frozen=True)
class DpSgd:
    noise_multiplier: float  # sigma
    clip_norm: float  # C
    expected_batch: int  # the batch size the sampling rate was derived from


def sampling_rate(batch_size: int, num_examples: int) -> float:
    return min(1.0, batch_size / num_examples)


def poisson_batches(features: Sequence[dict], steps: int, rate: float, pad_id: int, rng: Randomness) -> Iterator[Batch]:
    """``steps`` Poisson-sampled batches of ``features`` (None when no example was drawn)."""
    for _ in range(steps):
        chosen = (rng.uniform(len(features)) < rate).nonzero()[0]
        yield collate([features[int(i)] for i in chosen], pad_id) if len(chosen) else None


class NoisyOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with the Gaussian noise drawn from our ``Randomness``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: Randomness, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self._noise = noise

    def clip_and_accumulate(self) -> None:
        # Per-example gradients of LoRA layers fed by a bf16 base come out in bf16; their norms and the
        # clip factors must be float32, or a clipped gradient can exceed C (by ~0.5% in bf16) and the
        # accountant's sensitivity no longer holds.
        for p in self.params:
            samples = getattr(p, "grad_sample", None)
            if isinstance(samples, list):  # one tensor per length chunk of the batch
                p.grad_sample = [g.to(p.dtype) for g in samples]
            elif samples is not None:
                p.grad_sample = samples.to(p.dtype)
        super().clip_and_accumulate()

    def scale_grad(self) -> None:
        # One Poisson batch, however many chunks its backward passes took: divide by the expected
        # batch alone (Opacus would also divide by the number of passes, its logical-batch case).
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            # Drawn on the CPU in float32 whatever the device: the same seed gives the same noise everywhere.
            noise = self._noise.normal(tuple(p.summed_grad.shape), std).to(p.summed_grad.device)
            p.grad = (p.summed_grad.float() + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class PerExampleGradients(GradSampleModule):
    """Opacus's per-example gradient hooks, which also hold under gradient checkpointing.

    A checkpointed block runs its forward again inside backward; Opacus's forward hook would then
    record the block's inputs twice and never see the batch end (its per-parameter counter stays
    above zero, so no ``grad_sample`` is made). The recompute is marked
    (``models.machine.checkpoint_contexts``) and its forward is not recorded: the backward hook
    pairs each backprop with the first forward's inputs, which the recompute reproduces exactly.
    """

    def capture_activations_hook(
        self, module: nn.Module, forward_input: list[torch.Tensor], _forward_output: torch.Tensor
    ) -> None:
        if recomputing():
            return
        super().capture_activations_hook(module, forward_input, _forward_output)


class DpSgdSteps:
    """The ``StepRule`` of DP-SGD for one client's steps: Opacus per-example gradients, clip, noise.

    ``attach`` wraps the model in a ``GradSampleModule`` after the trainer has marked this
    round's trainable tensors, and unwraps it on exit: the hooks always sit on the live
    parameters (the peft + Opacus stale-hook failure leaves LoRA unchanged).
    """

    def __init__(self, dp: DpSgd, noise: Randomness, machine: Machine = CPU) -> None:
        if machine.precision == "fp16":
            raise ValueError("DP-SGD with fp16: loss scaling would scale each example's gradient before it is clipped")
        self.dp = dp
        self.noise = noise
        self.machine = machine

    @contextlib.contextmanager
    def attach(
        self, model: nn.Module, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> Iterator[torch.optim.Optimizer]:
        wrapped = PerExampleGradients(model, batch_first=True, loss_reduction="mean", strict=False)
        try:
            yield NoisyOptimizer(
                optimizer,
                noise=self.noise,
                noise_multiplier=self.dp.noise_multiplier,
                max_grad_norm=self.dp.clip_norm,
                expected_batch_size=self.dp.expected_batch,
                loss_reduction="mean",
            )
        finally:
            wrapped.to_standard_module()  # removes every hook and per-sample attribute

    def backward(self, model: nn.Module, kind: str, batch: Batch, params: Sequence[nn.Parameter]) -> float:
        return per_example_backward(model, kind, batch, params, self.machine)


def per_example_backward(
    model: nn.Module, kind: str, batch: Batch, params: Sequence[nn.Parameter], machine: Machine = CPU
) -> float:
    """Per-example gradients into ``p.grad_sample``; the batch's mean loss."""
    if batch is None:
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]  # Opacus' attribute
        return float("nan")
    # The hooks sit on the wrapped modules, so calling the peft model itself records them
    # (and keeps its logits_to_keep fast path, which the wrapper would hide). Opacus stacks
    # the per-example gradients of every chunk; NoisyOptimizer treats them as one batch.
    size, total = len(batch["input_ids"]), 0.0
    for chunk in length_chunks(batch):
        with machine.autocast():
            loss = example_losses(model, chunk, kind).mean()
        with warnings.catch_warnings():
            # Frozen inputs of the first LoRA layer: torch notes that the hook sees outputs only, which is all it needs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        total += float(loss.detach()) * len(chunk["input_ids"]) / size
    return total
