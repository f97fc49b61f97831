"""Secure aggregation in a small field: rotate, scale, round at random, wrap — and the chance that the sum wraps.

With ``secagg.modulus_bits`` = b < 32 each client sends b bits a value instead of 32. A LoRA
delta's coordinates are heavy-tailed, so a fixed-point range wide enough for its largest
value wastes most of a small field. The distributed discrete mechanism (Kairouz, Liu and
Steinke, ICML 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", section 4) instead:

1. bounds the update's L2 norm by c (``secagg.l2_bound``): a longer update is scaled down;
2. rotates it at random, y = C D x: D flips signs at random (public: the server sends the
   seed), C is the orthonormal DCT-II — the paper uses a randomized Hadamard transform, whose
   length must be a power of two; padding SmolLM2-135M's 460,800 adapter values to 524,288
   would cost 14% of the uplink, and the DCT's entries are at most sqrt(2/d), which gives the
   same subgaussian bound with twice the variance (below);
3. scales by s and rounds each value up or down at random (unbiased), to an integer;
4. wraps it into [-2^(b-1), 2^(b-1)) ("modular clipping"): SecAgg sums in Z_{2^b}, so a
   client's own wrap cancels in the sum; only the sum itself must not wrap.

The server decodes the sum (signed b-bit), divides by s and rotates back: C is orthogonal,
so the rounding error of the mean has L2 norm at most sqrt(d) / s (each of a client's d
rounded values moves by less than 1/s).

**The chance that the sum wraps** (``overflow_probability``). For K clients, X = sum x_k has
||X|| <= K c. Coordinate i of C D X is a sum of independent zero-mean terms C_ij D_j X_j, so
by Hoeffding's inequality P(|(C D X)_i| >= t) <= 2 exp(-t^2 / (2 sum_j C_ij^2 X_j^2))
<= 2 exp(-t^2 d / (4 K^2 c^2)) (C_ij^2 <= 2/d). The K rounding errors of coordinate i are
independent, zero-mean and within (-1, 1): P(|sum| >= u) <= 2 exp(-u^2 / (2K)). The integer
sum s (C D X)_i + errors reaches 2^(b-1) only if one of the two passes its share, so with a
union bound over the d coordinates
    P(wrap) <= d min_u [2 exp(-(2^(b-1) - u)^2 d / (4 s^2 K^2 c^2)) + 2 exp(-u^2 / (2K))].
``choose_scale`` takes the largest power of two s that keeps this at most OVERFLOW_TARGET per
round; the run says at start which s, which probability, and what rounding costs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from fedlpp.privacy.randomness import Randomness
from fedlpp.seeding import derive_seed

OVERFLOW_TARGET = 1e-6  # the most a round's sum may wrap, by the bound above
_SCALE_EXPONENTS = range(40, -41, -1)  # s = 2^40 ... 2^-40


@dataclass(frozen=True)
class Rotation:
    """What both ends agree on for a b-bit field: the field, the clients, the norm bound, the public rotation seed."""

    bits: int  # b
    clients: int  # K: the most inputs one sum adds
    l2_bound: float  # c
    seed: int  # each round's signs derive from it (public)

    @property
    def half_field(self) -> int:
        return 1 << (self.bits - 1)

    def scale(self, dim: int) -> float:
        return choose_scale(self.bits, self.clients, self.l2_bound, dim)

    def signs(self, round_: int, dim: int) -> np.ndarray:
        """D for ``round_``: +-1 per coordinate, the same at every client and at the server."""
        rng = np.random.default_rng(derive_seed(self.seed, "rotation signs", round_))
        return rng.integers(0, 2, dim).astype(np.float64) * 2.0 - 1.0

    def encode(self, x: np.ndarray, round_: int, rng: Randomness) -> np.ndarray:
        """A client's integers in [-2^(b-1), 2^(b-1)) (as float64) for its update ``x`` (float64, shape (d,))."""
        norm = float(np.linalg.norm(x))
        if norm > self.l2_bound:
            x = x * (self.l2_bound / norm)
        scaled = rotate(x, self.signs(round_, x.size)) * self.scale(x.size)
        below = np.floor(scaled)
        rounded = below + (rng.uniform(x.size) < scaled - below)
        return np.mod(rounded + self.half_field, 2 * self.half_field) - self.half_field

    def decode(self, total: np.ndarray, round_: int) -> np.ndarray:
        """The sum of the clients' updates from the signed integer sum of their encodings."""
        return unrotate(total / self.scale(total.size), self.signs(round_, total.size))

    def rounding_bound(self, dim: int) -> float:
        """The most rounding moves one client's update, or the mean, in L2 norm: sqrt(d) / s."""
        return math.sqrt(dim) / self.scale(dim)

    def sum_bound(self, dim: int, clients: int) -> float:
        """The largest norm the decoded sum of ``clients`` updates within the bound can have (rounding included)."""
        return clients * (self.l2_bound + self.rounding_bound(dim))


def describe(rotation: Rotation, dim: int) -> str:
    """What the run says at start: the field, its scale for ``dim`` values, the wrap bound and what rounding costs
    (ValueError when no scale can hold the sum)."""
    scale = rotation.scale(dim)
    chance = overflow_probability(scale, rotation.bits, rotation.clients, rotation.l2_bound, dim)
    return (
        f"secure aggregation in Z_2^{rotation.bits}: {dim:,} values scaled by 2^{math.log2(scale):g} after a random "
        f"rotation; a round's sum of {rotation.clients} updates of norm <= {rotation.l2_bound:g} wraps with probability "
        f"<= {chance:.1e} (Hoeffding and a union bound); rounding moves the mean by <= {rotation.rounding_bound(dim):.3g} "
        f"in L2 ({rotation.rounding_bound(dim) / rotation.l2_bound:.2%} of secagg.l2_bound)"
    )


def rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """C D x: signs, then the orthonormal DCT-II."""
    return scipy.fft.dct(x * signs, type=2, norm="ortho")


def unrotate(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """D^T C^T y = D C^-1 y: the inverse DCT-II, then the same signs."""
    return scipy.fft.idct(y, type=2, norm="ortho") * signs


@functools.lru_cache(maxsize=64)
def choose_scale(bits: int, clients: int, l2_bound: float, dim: int) -> float:
    """The largest power of two s whose wrap probability is at most OVERFLOW_TARGET, among the scales whose
    rounding moves an update by less than its own bound (sqrt(d) / s < c); ValueError if there is none."""
    smallest_useful = math.sqrt(dim) / l2_bound
    for exponent in _SCALE_EXPONENTS:
        if 2.0**exponent < smallest_useful:
            break
        if overflow_probability(2.0**exponent, bits, clients, l2_bound, dim) <= OVERFLOW_TARGET:
            return 2.0**exponent
    raise ValueError(
        f"secagg.modulus_bits={bits} cannot hold the sum of {clients} updates of norm up to {l2_bound:g} over "
        f"{dim} values: at any scale that keeps the sum from wrapping, rounding would move an update by more than "
        "its own norm; use more bits"
    )


def overflow_probability(scale: float, bits: int, clients: int, l2_bound: float, dim: int) -> float:
    """The union bound (module docstring) on the chance that one round's integer sum wraps, at most 1."""
    half = float(1 << (bits - 1))
    spread = 4.0 * scale**2 * clients**2 * l2_bound**2 / dim  # t^2 / spread is the rotated sum's exponent
    best = 1.0
    for u in np.linspace(0.0, half, 257)[1:-1]:
        tail = 2.0 * math.exp(-((half - u) ** 2) / spread) + 2.0 * math.exp(-(u**2) / (2.0 * clients))
        best = min(best, dim * tail)
    return best
