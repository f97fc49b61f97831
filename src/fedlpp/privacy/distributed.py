"""Client-level DP with no trusted server: each client adds its discrete Gaussian share under SecAgg in Z_2^b.

What one round costs (``DistributedNoise.round_sigma``): the server sees only the sum of the
m surviving clients' rounded, noised integers. Replacing one client changes that sum by at
most twice the rounded norm bound (in the field's integers, c s before rounding), and the
sum of m discrete Gaussian shares N_Z(0, sigma_l^2) gives rho-zCDP by Kairouz, Liu and
Steinke 2021, Proposition 14 (``discrete_gaussian.sum_rho``). The ledger keeps each round as
one step of the Gaussian mechanism with the same rho, z_eq = 1 / sqrt(2 rho), at sampling
rate 1 — no amplification by sampling is claimed (each client is charged for each round it
took part in, which is sound and conservative) — so the RDP accountant composes exactly the
rounds' rho. A round is charged with its real survivors (fewer shares: less noise, more
epsilon); the calibration and the budget check before each round assume the fewest the
protocol can unmask with, so no pattern of dropouts takes epsilon past the target
(``secagg.threshold = 1`` makes that every sampled client: no dropout tolerated, no extra noise).

As z c s grows (more bits, so a finer scale) rho tends to the continuous Gaussian's
2 / z^2, the central client-level DP's rho for the same noise multiplier under replace-one
neighbours (sensitivity 2S).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fedlpp.privacy.discrete_gaussian import gaussian_equivalent, rounded_norm_bound, sum_rho
from fedlpp.secagg.field import choose_scale, share_std


@dataclass(frozen=True)
class DistributedNoise:
    """The field and the updates the run sends, for pricing a round of distributed DP."""

    bits: int  # secagg.modulus_bits
    clients: int  # K: the shares that make the whole noise
    clip_norm: float  # c = privacy.clip_norm
    dims: tuple[int, ...]  # every size of update a round sends (RoLoRA alternates two)
    fewest_survivors: int  # the fewest inputs the protocol can unmask: the budget check's worst case

    def round_sigma(self, noise_multiplier: float, survivors: int) -> float:
        """The Gaussian noise multiplier with the zCDP of one round of ``survivors`` shares (the worst size)."""
        return _round_sigma(self, noise_multiplier, survivors)

    def local_std(self, noise_multiplier: float, dim: int) -> float:
        return share_std(noise_multiplier, self.clip_norm, self.scale(noise_multiplier, dim), self.clients)

    def scale(self, noise_multiplier: float, dim: int) -> float:
        return choose_scale(self.bits, self.clients, self.clip_norm, dim, noise_multiplier)


@functools.lru_cache(maxsize=4096)
def _round_sigma(noise: DistributedNoise, noise_multiplier: float, survivors: int) -> float:
    if survivors < 1:
        raise ValueError("a round with no surviving client releases nothing and costs nothing")
    rho = 0.0
    for dim in noise.dims:
        sensitivity = 2.0 * rounded_norm_bound(noise.clip_norm * noise.scale(noise_multiplier, dim), dim)  # replace-one
        rho = max(rho, sum_rho(sensitivity, noise.local_std(noise_multiplier, dim), survivors, dim))
    return gaussian_equivalent(rho)
