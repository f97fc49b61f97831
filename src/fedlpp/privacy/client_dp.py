"""Client-level DP (DP-FedAvg, DESIGN 3.2): clip each client's delta, noise the sum.

Every participating client's delta (the trained tensors, as one vector) is scaled to norm
at most S. The server adds N(0, (sigma S)^2) to the sum — or, under secure aggregation,
each of the K clients adds N(0, (sigma S)^2 / K) before masking, so only the noised sum
is ever visible — and divides by the expected number of clients (K, or q N with Poisson
client sampling), a public constant, so one client changes the mean by at most S / K.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlpp.models.lora import Adapter
from fedlpp.privacy.randomness import Randomness

# Updates are checked against S with this slack: float32 rounding of an exactly clipped delta.
NORM_SLACK = 1e-4


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def clip_delta(delta: Mapping[str, torch.Tensor], clip_norm: float) -> Adapter:
    """``delta`` scaled down to norm ``clip_norm`` when it is longer (never scaled up)."""
    factor = min(1.0, clip_norm / max(delta_norm(delta), 1e-12))
    return {n: t * factor for n, t in delta.items()}


def within_norm(delta: Mapping[str, torch.Tensor], clip_norm: float) -> bool:
    return delta_norm(delta) <= clip_norm * (1 + NORM_SLACK)


def noise_like(delta: Mapping[str, torch.Tensor], std: float, rng: Randomness) -> Adapter:
    return {n: rng.normal(tuple(t.shape), std) for n, t in sorted(delta.items())}


@dataclass(frozen=True)
class NoisedSum:
    """The server's side of DP-FedAvg for one round."""

    clip_norm: float  # S
    noise_multiplier: float  # sigma: the sum gets N(0, (sigma S)^2)
    denominator: float  # the expected number of clients (public)
    rng: Randomness

    def mean(self, clipped: Sequence[Mapping[str, torch.Tensor]], shapes: Mapping[str, tuple[int, ...]]) -> Adapter:
        """(sum of the clipped deltas + noise) / denominator; pure noise when no client took part."""
        total = {n: torch.zeros(s) for n, s in sorted(shapes.items())}
        for delta in clipped:
            for n in total:
                total[n] += delta[n]
        noise = noise_like(total, self.noise_multiplier * self.clip_norm, self.rng)
        return {n: (total[n] + noise[n]) / self.denominator for n in total}
