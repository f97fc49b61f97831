"""A round as two byte-to-byte steps that every engine calls.

Client: ``client_step(model, broadcast bytes, the client's own data, recipe)`` decodes the
broadcast, trains (``SgdTraining``, or ``DpSgdTraining``, which wraps the same trainer with
Opacus), applies the delta transforms in order (client-level DP's clip), and encodes the
upload (``UpdateBytes``, ``CompressedUpdateBytes``, or SecAgg's ``algorithms.secure.SecureInput``, whose vector the
protocol then masks). Server: ``round.server_step(spec, adapter, inputs, round, combiner)``.

Privacy and secure aggregation enter as these steps, chosen once when a run is set up
(``engine.setup.client_recipe`` / ``make_aggregation``); the transports only move messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.client import LocalResult, LocalTraining, shuffled_batches, train_client
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.models.lora import Adapter
from fedlpp.models.machine import CPU, Machine
from fedlpp.privacy.client_dp import clip_delta
from fedlpp.privacy.dp_sgd import DpSgd, DpSgdSteps, poisson_batches, sampling_rate
from fedlpp.privacy.randomness import randomness
from fedlpp.quant.stochastic import UplinkSpec
from fedlpp.seeding import derive_seed

T = TypeVar("T")
OnStep = Callable[[], None]  # called after every local step (progress bars)


@dataclass(frozen=True)
class ClientData:
    """What one client holds: its own tokenised training examples. They never leave it."""

    client_id: int
    features: Sequence[dict]
    pad_id: int

    @property
    def num_examples(self) -> int:
        return len(self.features)


class LocalTrainingPlan(Protocol):
    """How a client trains in a round: which batches, which step rule, on which machine."""

    @property
    def machine(self) -> Machine: ...

    def train(
        self,
        model: nn.Module,
        kind: str,
        start: Adapter,
        trained: Sequence[str],
        data: ClientData,
        round_: int,
        on_step: OnStep | None,
    ) -> LocalResult: ...


@dataclass(frozen=True)
class SgdTraining:
    """E optimizer steps on reshuffled batches, all seeded by (seed, round, client)."""

    local_steps: int
    batch_size: int
    opts: LocalTraining
    seed: int
    machine: Machine = CPU  # where the client's model runs, in what precision

    def train(
        self,
        model: nn.Module,
        kind: str,
        start: Adapter,
        trained: Sequence[str],
        data: ClientData,
        round_: int,
        on_step: OnStep | None,
    ) -> LocalResult:
        seed = derive_seed(self.seed, "batches", round_, data.client_id)
        batches = shuffled_batches(data.features, self.local_steps, self.batch_size, data.pad_id, seed)
        dropout = derive_seed(self.seed, "dropout", round_, data.client_id)
        return train_client(model, kind, start, trained, _ticking(batches, on_step), self.opts, dropout, machine=self.machine)


@dataclass(frozen=True)
class DpSgdTraining:
    """Sample-level DP-SGD (DESIGN 3.1): Poisson batches at q = batch / n_k, the same trainer with Opacus's step rule."""

    local_steps: int
    batch_size: int  # the expected Poisson batch
    opts: LocalTraining
    seed: int
    noise_multiplier: float  # sigma, from the server's privacy plan (sent with the broadcast)
    clip_norm: float  # C
    secure_noise: bool  # noise and samples from the OS CSPRNG instead of the seed
    machine: Machine = CPU  # where the client's model runs, in what precision

    def train(
        self,
        model: nn.Module,
        kind: str,
        start: Adapter,
        trained: Sequence[str],
        data: ClientData,
        round_: int,
        on_step: OnStep | None,
    ) -> LocalResult:
        sampler = randomness(self.secure_noise, derive_seed(self.seed, "poisson", round_, data.client_id))
        noise = randomness(self.secure_noise, derive_seed(self.seed, "dp_noise", round_, data.client_id))
        rate = sampling_rate(self.batch_size, data.num_examples)
        batches = poisson_batches(data.features, self.local_steps, rate, data.pad_id, sampler)
        expected_batch = min(self.batch_size, data.num_examples)  # q * n_k: a client smaller than the batch is all of it
        steps = DpSgdSteps(DpSgd(self.noise_multiplier, self.clip_norm, expected_batch), noise, self.machine)
        dropout = derive_seed(self.seed, "dropout", round_, data.client_id)
        return train_client(model, kind, start, trained, _ticking(batches, on_step), self.opts, dropout, steps, self.machine)


def _ticking(batches: Iterator[T], on_step: OnStep | None) -> Iterator[T]:
    for batch in batches:
        yield batch
        if on_step is not None:
            on_step()


@dataclass(frozen=True)
class ClipToNorm:
    """Client-level DP: the delta scaled to norm at most S before anything leaves the client."""

    clip_norm: float

    def __call__(self, delta: Adapter) -> Adapter:
        return clip_delta(delta, self.clip_norm)


class UpdateBytes:
    """The plain encoder: the delta as one float32 vector in an update message."""

    def __call__(self, delta: Mapping[str, torch.Tensor], num_examples: int, round_: int, client_id: int) -> bytes:
        return rnd.make_update(delta, num_examples, round_)


@dataclass(frozen=True)
class CompressedUpdateBytes:
    """The compressed encoder (``uplink.bits`` < 32): b-bit stochastic rounding, its draws seeded by
    (seed, round, client), or from the OS CSPRNG with ``privacy.secure_noise``."""

    spec: UplinkSpec
    seed: int
    secure: bool

    def __call__(self, delta: Mapping[str, torch.Tensor], num_examples: int, round_: int, client_id: int) -> bytes:
        rng = randomness(self.secure, derive_seed(self.seed, "uplink_rounding", round_, client_id))
        try:
            return rnd.make_update(delta, num_examples, round_, self.spec, rng)
        except ValueError as e:  # NaN, inf or beyond float16: there is nothing to round
            raise UploadError(f"client {client_id}'s update cannot be sent with uplink.bits={self.spec.bits}: {e}") from None


class UploadError(ValueError):
    """A client's update cannot be encoded for the wire (not finite, or beyond what the encoding carries): that
    client fails the round, as a node's error reply does."""


DeltaTransform = Callable[[Adapter], Adapter]
Encoder = Callable[[Mapping[str, torch.Tensor], int, int, int], Any]  # (delta, n_k, round, client id) -> the upload


@dataclass(frozen=True)
class ClientRecipe:
    """Everything a client does with a broadcast besides holding its data, in order."""

    kind: str  # generation | classification
    shapes: dict[str, tuple[int, ...]]  # the client's own adapter shapes (it knows its model)
    spec: AlgorithmSpec  # the algorithm: which adapter tensors it trains and sends in each round
    training: LocalTrainingPlan
    transforms: tuple[DeltaTransform, ...]
    encode: Encoder
    uniform_weight: bool = False  # the update weighs 1 in the mean, not its example count (fl.weighting)

    def trained(self, round_: int) -> list[str]:
        """The adapter tensors it trains and sends in ``round_``."""
        return self.spec.trained_names(self.shapes, round_)


@dataclass(frozen=True)
class ClientOutput:
    upload: Any  # what ``recipe.encode`` made: update bytes, or SecAgg's input vector (None: drops out)
    num_examples: int
    loss: float | None  # mean training loss of the finite steps (None when there is none)
    round_: int  # the round the broadcast was made for
    peak_memory: int = 0  # bytes: CUDA's peak allocation during the step, or the process's peak RSS on the CPU


def client_step(
    model: nn.Module, payload: bytes, data: ClientData, recipe: ClientRecipe, on_step: OnStep | None = None
) -> ClientOutput:
    """One client's side of a round: broadcast bytes in, its upload out."""
    start, round_ = rnd.read_broadcast(payload, recipe.shapes)
    machine = recipe.training.machine  # where the client's model runs: its peak memory is measured there
    machine.reset_peak_memory()
    result = recipe.training.train(model, recipe.kind, start, recipe.trained(round_), data, round_, on_step)
    delta = result.delta
    for transform in recipe.transforms:
        delta = transform(delta)
    upload = recipe.encode(delta, 1 if recipe.uniform_weight else data.num_examples, round_, data.client_id)
    return ClientOutput(upload, data.num_examples, mean_finite(result.losses), round_, machine.peak_memory()["bytes"])


def mean_finite(values: Sequence[float]) -> float | None:
    """Mean of the finite values (an empty DP-SGD batch has no loss), or None."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
