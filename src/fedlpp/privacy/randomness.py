"""Where DP randomness comes from: a seeded generator (reproducible) or the OS CSPRNG.

Research runs use ``SeededRandomness`` so that ``--resume`` and a rerun reproduce a run
bit for bit. ``privacy.secure_noise`` (and any noise added before secure aggregation)
uses ``SystemRandomness``: an observer who knows the seed learns nothing about the noise.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch


class Randomness(Protocol):
    def uniform(self, n: int) -> np.ndarray:
        """``n`` independent U[0, 1) draws (float64)."""

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """N(0, std²) float32 noise of the given shape."""


class SeededRandomness:
    """Reproducible from ``seed``: for experiments, never for deployments."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._gen = torch.Generator().manual_seed(seed % (2**63))

    def uniform(self, n: int) -> np.ndarray:
        return self._rng.random(n)

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.normal(0.0, std, size=shape, generator=self._gen)


class SystemRandomness:
    """Every draw from ``os.urandom``; Gaussians by the Box–Muller transform in float64."""

    def uniform(self, n: int) -> np.ndarray:
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits each

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u1 = 1.0 - self.uniform(pairs)  # (0, 1]: log is finite
        u2 = self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
        return torch.from_numpy(z * std).to(torch.float32).reshape(shape)


def randomness(secure: bool, seed: int) -> Randomness:
    return SystemRandomness() if secure else SeededRandomness(seed)
