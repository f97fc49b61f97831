"""The discrete Gaussian N_Z(0, sigma^2) and what the sum of K of them guarantees (distributed DP under SecAgg).

**Sampling** (Canonne, Kamath and Steinke, NeurIPS 2020, "The Discrete Gaussian for
Differential Privacy", Algorithm 3): with t = floor(sigma) + 1, draw Y from the discrete
Laplace distribution P(Y = y) ~ exp(-|y| / t) (the difference of two geometric variables)
and keep it with probability exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)); what is kept is
distributed exactly as P(y) ~ exp(-y^2 / (2 sigma^2)). Here in float64 arithmetic from the
given uniform draws (the OS CSPRNG in a run), vectorised; the paper's exact rational
arithmetic guards against floating-point side channels this does not.

**Privacy of a sum** (Kairouz, Liu and Steinke, ICML 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", Proposition 14): if each of n
clients adds N_Z(0, sigma^2) to an integer vector of d values and the sum changes by at most
Delta_2 in L2 norm between neighbouring inputs, the sum satisfies (alpha, eps(alpha))-RDP with
eps(alpha) <= (alpha / 2) (Delta_2 / (sqrt(n) sigma) + tau sqrt(d))^2, where
tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)) — that is rho-zCDP with
rho = (Delta_2 / (sqrt(n) sigma) + tau sqrt(d))^2 / 2 (the proposition's third bound; its other
two help only where tau is not negligible, i.e. sigma below about 1). As sigma grows tau
vanishes and rho tends to the continuous Gaussian's Delta_2^2 / (2 n sigma^2).

**Sensitivity after rounding** (ibid., conditional randomized rounding): a vector of L2 norm
at most c, rounded to integers at random, is rounded again until its norm is at most
sqrt(c^2 + d / 4 + sqrt(2 ln(1 / beta)) (c + sqrt(d) / 2)) (each try succeeds with
probability at least 1 - beta), and never exceeds c + sqrt(d) anyway.
"""

from __future__ import annotations

import math

import numpy as np

from fedlpp.privacy.randomness import Randomness

ROUNDING_BETA = math.exp(-0.5)  # conditional rounding: a try fails with probability at most this (Kairouz et al.)


def sample(count: int, sigma: float, rng: Randomness) -> np.ndarray:
    """``count`` independent draws of N_Z(0, sigma^2) as int64 (sigma > 0)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    t = math.floor(sigma) + 1
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        want = count - filled
        tries = math.ceil(want / 0.6) + 16  # a try is kept with probability 0.63 to 0.76 (measured, sigma 0.7 to 1300)
        u = rng.uniform(3 * tries).reshape(3, tries)
        laplace = np.floor(-t * np.log1p(-u[0])) - np.floor(-t * np.log1p(-u[1]))
        keep = u[2] < np.exp(-((np.abs(laplace) - sigma**2 / t) ** 2) / (2 * sigma**2))
        kept = laplace[keep][:want].astype(np.int64)
        out[filled : filled + kept.size] = kept
        filled += kept.size
    return out


def rounded_norm_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """The L2 norm a vector of norm <= ``norm`` keeps after conditional randomized rounding to integers."""
    tight = math.sqrt(norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2))
    return min(norm + math.sqrt(dim), tight)


def tau(sigma: float, clients: int) -> float:
    """How far the sum of ``clients`` N_Z(0, sigma^2) is from a discrete Gaussian (Proposition 14)."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, clients))


class NoiseTooSmall(ValueError):
    """sigma below 1/2: Proposition 14 does not apply, so no guarantee is claimed."""


def sum_rho(sensitivity: float, sigma: float, clients: int, dim: int) -> float:
    """rho of the zCDP the sum of ``clients`` N_Z(0, sigma^2) vectors of ``dim`` values gives a change of
    L2 norm ``sensitivity`` (integer units; Proposition 14's third bound, which needs sigma >= 1/2)."""
    if sigma < 0.5:
        raise NoiseTooSmall(f"a discrete Gaussian share of std {sigma:.3g} is below 1/2: Proposition 14 does not apply")
    return 0.5 * (sensitivity / (math.sqrt(clients) * sigma) + tau(sigma, clients) * math.sqrt(dim)) ** 2


def gaussian_equivalent(rho: float) -> float:
    """The noise multiplier of the Gaussian mechanism with the same zCDP: rho = 1 / (2 z^2)."""
    return 1.0 / math.sqrt(2.0 * rho)
