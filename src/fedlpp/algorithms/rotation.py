"""Secure aggregation in a small field: rotate, scale, round at random, wrap — and the chance that the sum wraps.

With ``secagg.modulus_bits`` = b < 32 each client sends b bits a value instead of 32. A LoRA
delta's coordinates are heavy-tailed, so a fixed-point range wide enough for its largest
value wastes most of a small field. The distributed discrete mechanism (Kairouz, Liu and
Steinke, ICML 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", section 4) instead:

1. bounds the update's L2 norm by c (``secagg.l2_bound``): a longer update is scaled down;
2. rotates it at random, y = C D x: D flips signs at random (public: the server sends the
   seed), C is the orthonormal DCT-IV — the paper uses a randomized Hadamard transform, whose
   length must be a power of two; padding SmolLM2-135M's 460,800 adapter values to 524,288
   would cost 14% of the uplink, and the DCT's entries are at most sqrt(2/d), which gives the
   same subgaussian bound with twice the variance (below);
3. scales by s and rounds each value up or down at random (unbiased), to an integer;
4. wraps it into [-2^(b-1), 2^(b-1)) ("modular clipping"): SecAgg sums in Z_{2^b}, so a
   client's own wrap cancels in the sum; only the sum itself must not wrap.

The server decodes the sum (signed b-bit), divides by s and rotates back: C is orthogonal,
so the rounding error of the mean has L2 norm at most sqrt(d) / s (each of a client's d
rounded values moves by less than 1/s).

**The chance that the sum wraps** is bounded in ``secagg.field`` (Hoeffding's inequality on each
rotated coordinate, on the K rounding errors and on the noise, and a union bound over the d
coordinates); ``choose_scale`` takes the largest power of two s that keeps it at most 10^-6 per
round, and the run says at start which s, which bound, and what rounding costs.

**Distributed DP** (``noise_multiplier`` z > 0, client-level DP under SecAgg): the rounding
is conditional (redrawn until the rounded vector's norm is within the bound the accounting
uses, ``privacy.discrete_gaussian.rounded_norm_bound``) and each client adds
N_Z(0, sigma_l^2) to each value, K sigma_l^2 = (z c s)^2, from the OS CSPRNG (step 5 of the
paper's mechanism, before the wrap): a sum of m survivors carries m shares, and the server
(honest-but-curious, trusted for sigma, K and the survivor list) sees no less noise than that;
the accounting charges for m, and the protocol refuses sums of fewer than it was priced for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from fedlpp.privacy import discrete_gaussian
from fedlpp.privacy.randomness import Randomness
from fedlpp.secagg.field import OVERFLOW_TARGET, choose_scale, overflow_probability, share_std
from fedlpp.seeding import derive_seed

__all__ = ["OVERFLOW_TARGET", "Rotation", "choose_scale", "describe", "overflow_probability", "rotate", "unrotate"]


MAX_ROUNDING_TRIES = 100  # conditional rounding fails this often with probability <= e^-50
FLOAT32_ROOM = 0.01  # the rotation runs in float32 while its error is at most this share of rounding's


@dataclass(frozen=True)
class Rotation:
    """What both ends agree on for a b-bit field: the field, the clients, the norm bound, the public rotation seed."""

    bits: int  # b
    clients: int  # K: the most inputs one sum adds
    l2_bound: float  # c
    seed: int  # each round's signs derive from it (public)
    noise_multiplier: float = 0.0  # z: distributed DP's noise on the sum, std z c per value (0: none)

    @property
    def half_field(self) -> int:
        return 1 << (self.bits - 1)

    def scale(self, dim: int) -> float:
        return choose_scale(self.bits, self.clients, self.l2_bound, dim, self.noise_multiplier)

    def local_std(self, dim: int) -> float:
        """sigma_l: one client's discrete Gaussian std in the field's integers (K of them make z c s)."""
        return share_std(self.noise_multiplier, self.l2_bound, self.scale(dim), self.clients)

    def signs(self, round_: int, dim: int, dtype: type[np.floating] | None = None) -> np.ndarray:
        """D for ``round_``: +-1 per coordinate (in ``dtype``, by default a client's ``transform_dtype``), the same at
        every client and at the server."""
        rng = np.random.default_rng(derive_seed(self.seed, "rotation signs", round_))
        flips = np.unpackbits(np.frombuffer(rng.bytes(-(-dim // 8)), dtype=np.uint8), count=dim, bitorder="little")
        signs = np.multiply(flips, -2, dtype=dtype or self.transform_dtype(dim))
        signs += 1
        return signs

    def transform_dtype(self, dim: int, sum_of: int = 0) -> type[np.floating]:
        """float32 where the rotation's float32 error is at most 1% of what rounding may move what it transforms, else
        float64. A DCT's error in L2 grows as log2(d) times its input's norm (Higham, "Accuracy and Stability of
        Numerical Algorithms", ch. 24); 2^-24 log2(d) times the norm is taken for it (3 to 6 times the error measured
        here). A client transforms one update of norm at most c s, which rounding moves by at most sqrt(d); the server
        (``sum_of`` = K) a sum of K of them with distributed DP's noise (allowed 2 z c s sqrt(d)), which rounding
        moves by at most K sqrt(d). At d = 460,800, c = 1 and 10 clients: float32 up to b = 21 at both ends without
        noise; with z = 1 (a smaller scale), up to b = 26 at a client and b = 19 at the server."""
        scale = self.scale(dim)
        if sum_of:
            noise = 2.0 * self.noise_multiplier * self.l2_bound * scale * math.sqrt(dim)
            norm, rounding = sum_of * (self.l2_bound * scale + math.sqrt(dim)) + noise, sum_of * math.sqrt(dim)
        else:
            norm, rounding = self.l2_bound * scale, math.sqrt(dim)
        float32_error = 2.0**-24 * math.log2(max(dim, 2)) * norm
        return np.float32 if float32_error <= FLOAT32_ROOM * rounding else np.float64

    def encode(self, x: np.ndarray, round_: int, rng: Randomness, noise: Randomness | None = None) -> np.ndarray:
        """A client's integers (int64) for its update ``x`` (float32 or float64, shape (d,)): rotated, scaled, rounded
        at random and, with distributed DP, given its discrete Gaussian share drawn from ``noise`` (the OS CSPRNG in a
        run). The field takes them mod 2^b (``secagg.field_elements``): a client's own wrap cancels in the sum."""
        norm = l2_norm(x)
        if norm > self.l2_bound:
            x = x * (self.l2_bound / norm)
        scaled = rotate(x, self.signs(round_, x.size))  # in transform_dtype
        scaled *= self.scale(x.size)
        integers = self._round(scaled, rng).astype(np.int64)
        if self.noise_multiplier > 0:
            if noise is None:
                raise ValueError("distributed DP needs the randomness its noise is drawn from")
            integers += discrete_gaussian.sample(x.size, self.local_std(x.size), noise)
        return integers

    def _round(self, scaled: np.ndarray, rng: Randomness) -> np.ndarray:
        """Unbiased randomized rounding, floor(y + u) with u uniform on the multiples of 2^-32 in [0, 1): up with
        probability y - floor(y) to within 2^-32; under DP redrawn until within the norm the accounting assumes (which
        the integers are checked against, so neither u's 32 bits nor float64's rounding of y + u can move it)."""
        bound = discrete_gaussian.rounded_norm_bound(self.l2_bound * self.scale(scaled.size), scaled.size)
        for _ in range(MAX_ROUNDING_TRIES):  # each try succeeds with probability >= 1 - e^-1/2
            rounded = np.multiply(rng.words(-(-scaled.size // 2)).view("<u4")[: scaled.size], 2.0**-32, dtype=np.float64)
            rounded += scaled
            np.floor(rounded, out=rounded)
            if self.noise_multiplier == 0 or float(np.linalg.norm(rounded)) <= bound:
                return rounded
        raise RuntimeError(f"conditional rounding failed {MAX_ROUNDING_TRIES} times: the norm bound {bound:.6g} is wrong")

    def decode(self, total: np.ndarray, round_: int) -> np.ndarray:
        """The sum of the clients' updates from the signed integer sum of their encodings."""
        signs = self.signs(round_, total.size, self.transform_dtype(total.size, sum_of=self.clients))
        return unrotate(np.multiply(total, 1.0 / self.scale(total.size), dtype=signs.dtype), signs)

    def rounding_bound(self, dim: int) -> float:
        """The most rounding moves one client's update, or the mean, in L2 norm: sqrt(d) / s."""
        return math.sqrt(dim) / self.scale(dim)

    def sum_bound(self, dim: int, clients: int) -> float:
        """The largest norm the decoded sum of ``clients`` updates within the bound can have (rounding included)."""
        return clients * (self.l2_bound + self.rounding_bound(dim))


def describe(rotation: Rotation, dim: int) -> str:
    """What the run says at start: the field, its scale for ``dim`` values, the wrap bound and what rounding costs
    (ValueError when no scale can hold the sum)."""
    scale, rounding = rotation.scale(dim), rotation.rounding_bound(dim)
    chance = overflow_probability(scale, rotation.bits, rotation.clients, rotation.l2_bound, dim, rotation.noise_multiplier)
    noise = (
        f", each client's discrete Gaussian noise share of std {rotation.local_std(dim):.4g} included"
        if rotation.noise_multiplier
        else ""
    )
    return (
        f"secure aggregation in Z_2^{rotation.bits}: {dim:,} values scaled by 2^{math.log2(scale):g} after a random "
        f"rotation; a round's sum of {rotation.clients} updates of norm <= {rotation.l2_bound:g} wraps with probability "
        f"<= {chance:.1e} (Hoeffding and a union bound{noise}); rounding moves the mean by <= {rounding:.3g} "
        f"in L2 ({rounding / rotation.l2_bound:.2%} of its norm bound)"
    )


def l2_norm(x: np.ndarray) -> float:
    """x's L2 norm, in float64 where float32's sum of squares overflows (a finite update of norm beyond 1.8e19)."""
    with np.errstate(over="ignore"):  # an overflow is caught below
        norm = float(np.linalg.norm(x))
    if not math.isfinite(norm) and x.dtype != np.float64:
        norm = float(np.linalg.norm(x.astype(np.float64)))
    return norm


def rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """C D x: signs, then the orthonormal DCT-IV, in the signs' dtype."""
    return scipy.fft.dct(np.multiply(x, signs, dtype=signs.dtype), type=4, norm="ortho", overwrite_x=True)


def unrotate(y: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """D^T C^T y = D C y: the orthonormal DCT-IV is symmetric and its own inverse (and as fast as the DCT-II, whose
    inverse, the DCT-III, took 40% longer here), then the same signs, in the signs' dtype."""
    out = scipy.fft.dct(np.asarray(y, dtype=signs.dtype), type=4, norm="ortho", overwrite_x=y.dtype != signs.dtype)
    out *= signs
    return out
