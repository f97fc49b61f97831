"""What fits in Z_2^b: the chance that a round's integer sum wraps, and the largest scale that keeps it rare.

The encoder (``algorithms.rotation``) bounds each of K updates by c in L2 norm, rotates it
with random signs D and the orthonormal DCT-IV C (entries at most sqrt(2/d)), scales it by s,
rounds it at random to integers and, under distributed DP, adds N_Z(0, sigma_l^2) noise to each
value with K sigma_l^2 = (z c s)^2. A coordinate of the integer sum is then the sum of three
independent parts, each with a subgaussian tail:

- the rotated sum s (C D X)_i, ||X|| <= K c: by Hoeffding's inequality over the signs,
  P(|.| >= t) <= 2 exp(-t^2 d / (4 s^2 K^2 c^2));
- K rounding errors, each in (-1, 1): their sum is below K in magnitude, always (conditional
  rounding, which redraws until a norm bound holds, makes them neither independent nor zero-mean,
  so no concentration is claimed for them);
- K discrete Gaussians, each sigma_l^2-subgaussian (Canonne, Kamath and Steinke 2020):
  P(|.| >= t) <= 2 exp(-t^2 / (2 (z c s)^2)).

The sum reaches 2^(b-1) only if the signal passes t1 or the noise t3 with t1 + t3 = 2^(b-1) - K,
so with a union bound over the d coordinates
    P(wrap) <= d min_{t1+t3 = 2^(b-1) - K} [the signal's tail at t1 + the noise's at t3].
``choose_scale`` takes the largest power of two s that keeps this at most OVERFLOW_TARGET and
whose rounding moves an update by less than its own bound (sqrt(d) / s < c).
"""

from __future__ import annotations

import functools
import math

import numpy as np

OVERFLOW_TARGET = 1e-6  # the most a round's sum may wrap, by the bound above
_SCALE_EXPONENTS = range(40, -41, -1)  # s = 2^40 ... 2^-40
_SPLITS = np.linspace(0.0, 1.0, 1025)[1:-1]  # the noise's shares of the room tried


@functools.lru_cache(maxsize=256)
def choose_scale(bits: int, clients: int, l2_bound: float, dim: int, noise_multiplier: float = 0.0) -> float:
    """The largest power of two s whose wrap probability is at most OVERFLOW_TARGET, among the scales whose
    rounding moves an update by less than its own bound (sqrt(d) / s < c); ValueError if there is none."""
    smallest_useful = math.sqrt(dim) / l2_bound
    for exponent in _SCALE_EXPONENTS:
        if 2.0**exponent < smallest_useful:
            break
        if overflow_probability(2.0**exponent, bits, clients, l2_bound, dim, noise_multiplier) <= OVERFLOW_TARGET:
            return 2.0**exponent
    noise = f" and noise multiplier {noise_multiplier:g}" if noise_multiplier else ""
    raise ValueError(
        f"secagg.modulus_bits={bits} cannot hold the sum of {clients} updates of norm up to {l2_bound:g}{noise} over "
        f"{dim} values: at any scale that keeps the sum from wrapping, rounding would move an update by more than "
        "its own norm; use more bits"
    )


def overflow_probability(
    scale: float, bits: int, clients: int, l2_bound: float, dim: int, noise_multiplier: float = 0.0
) -> float:
    """The union bound (module docstring) on the chance that one round's integer sum wraps, at most 1."""
    room = float(1 << (bits - 1)) - clients  # what the signal and the noise may use: the rounding takes < K
    if room <= 0:
        return 1.0
    signal_spread = 4.0 * scale**2 * clients**2 * l2_bound**2 / dim
    if noise_multiplier == 0:
        return min(1.0, dim * float(_tail(np.array(room), signal_spread)))
    noise = _SPLITS * room  # t3; the signal gets the rest
    noise_spread = 2.0 * (noise_multiplier * l2_bound * scale) ** 2
    tails = _tail(room - noise, signal_spread) + _tail(noise, noise_spread)
    return float(min(1.0, dim * tails.min()))


def share_std(noise_multiplier: float, l2_bound: float, scale: float, clients: int) -> float:
    """sigma_l: one client's discrete Gaussian std in the field's integers, K of which make z c s on the sum."""
    return noise_multiplier * l2_bound * scale / math.sqrt(clients)


def _tail(t: np.ndarray, spread: float) -> np.ndarray:
    """2 exp(-t^2 / spread): a subgaussian tail."""
    return 2.0 * np.exp(-(t**2) / spread)
