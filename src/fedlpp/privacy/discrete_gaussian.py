"""The discrete Gaussian N_Z(0, sigma^2) and what the sum of K of them guarantees (distributed DP under SecAgg).

**Sampling**: the alias method over the integers from -14 sigma to 14 sigma (at least 12 sigma;
the mass beyond is below 10^-30). Up to sigma = 2340 the table has a slot for every integer
(at most 2^16 slots), so a draw is one table lookup and one coin, and nothing is rejected. Above,
the integers are cut into bins of w = 2^k consecutive values (the fewest that fit 2^16 slots,
so w < sigma / 1170): a try picks a bin with probability proportional to w times the density at
the bin's value nearest 0, a value x uniformly inside it, and keeps x with probability
p(x) / p(nearest) >= 0.98; what is kept is distributed exactly as P(x) ~ exp(-x^2 / (2 sigma^2))
on the cut support. Exactly up to float64: the tables carry a relative error of about 2^-52
(which moves epsilon by as much); the coins are 64-bit integers compared with integer
thresholds, so no bin is drawn more often than its own share, however small (a 52-bit float
coin would draw each far-tail bin with probability 2^-52 / n, a total-variation error that
counts against delta). Being float arithmetic, it does not guard against floating-point side
channels the way exact rational arithmetic (Canonne, Kamath and Steinke, NeurIPS 2020) does.
Ten random bytes a value up to sigma = 2340 (a 64-bit coin, a 16-bit slot), three 64-bit words
a try above: 300,000 values take 3.0 to 7.3 MB of randomness.

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

import functools
import math

import numpy as np

from fedlpp.privacy.randomness import Randomness

ROUNDING_BETA = math.exp(-0.5)  # conditional rounding: a try fails with probability at most this (Kairouz et al.)


def sample(count: int, sigma: float, rng: Randomness) -> np.ndarray:
    """``count`` independent draws of N_Z(0, sigma^2) as int64 (0 < sigma <= 2^48)."""
    if not 0 < sigma <= MAX_SIGMA:
        raise ValueError(f"sigma must be in (0, 2^48], got {sigma}")
    table = _envelope(float(sigma))
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        left = count - filled
        kept = table.draw(left if not table.width_bits else math.ceil(left * 1.02) + 16, rng)[:left]  # one-value bins keep all
        out[filled : filled + kept.size] = kept
        filled += kept.size
    return out


TAIL_SIGMAS = 14  # the support is cut at about 14 sigma (at least 12 sigma): the mass beyond is below 10^-30
MAX_INDEX_BITS = 16  # at most 2^16 slots: a slot per integer up to sigma = 2340, and more than 98% of tries kept above
MAX_SIGMA = 2.0**48  # beyond, 14 sigma squared loses the float64 precision the acceptance test needs
_ONE_AS_BITS = np.uint64(0x3FF0000000000000)  # float64 1.0: 52 random bits as its mantissa give [1, 2)


class _Envelope:
    """The alias table of the bins' envelope masses and what a try needs to place and test its value.

    A try's randomness, one value a bin: a 64-bit word is the slot's coin, compared as an integer with the slot's
    threshold floor(keep 2^64) (so a slot is never drawn more often than its own float64 share, however small: a
    float coin would give every slot at least 2^-52 / n), and the top ``index_bits`` (<= 16) bits of a 16-bit value
    (four to a word, little-endian, drawn after the coins) pick the slot. Wider bins: word A's top ``index_bits``
    bits pick the slot and its low ``width_bits`` bits the value within the bin, word B is the coin, and word C's
    top 52 bits test acceptance, whose probability is at least 0.98, so 52 bits leave only a relative error."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma
        self.width_bits = _width_bits(sigma)
        width = 1 << self.width_bits
        half = math.ceil(TAIL_SIGMAS * sigma / width)  # bins -half .. half-1; bin j holds j w .. j w + w - 1
        self.index_bits = max(1, math.ceil(math.log2(2 * half)))  # <= MAX_INDEX_BITS
        first = np.arange(-half, half) * width
        nearest = np.where(first >= 0, first, first + width - 1).astype(np.float64)  # the value closest to 0
        masses = np.zeros(1 << self.index_bits)  # padded to a power of two with empty bins
        masses[: 2 * half] = np.exp(-(nearest**2) / (2 * sigma**2))
        keep, self.alias = _alias_table(masses / masses.sum())
        self.keep_below = np.minimum(np.floor(keep * 2.0**64), 2.0**64 - 2048).astype(np.uint64)  # a word < it: keep
        self.first = np.zeros(masses.size, dtype=np.int64)
        self.first[: 2 * half] = first
        self.nearest = np.pad(nearest, (0, masses.size - 2 * half))
        # A try's bin by its outcome index (``_outcome_index``): slot s's own at 2 s, its alias at 2 s + 1.
        self._bin_of = np.stack([np.arange(masses.size), self.alias], axis=1).reshape(-1)
        self._first_of = self.first[self._bin_of]

    def draw(self, tries: int, rng: Randomness) -> np.ndarray:
        """The values kept out of ``tries`` tries."""
        if not self.width_bits:  # one value a bin: its envelope is its own mass, so every try is kept
            coin = rng.words(tries)
            slot = rng.words(-(-tries // 4)).view("<u2")[:tries] >> np.uint16(16 - self.index_bits)
            return self._first_of.take(self._outcome_index(slot, coin))
        place, coin, accept = rng.words(3 * tries).reshape(3, tries)
        bin_ = self._bin_of.take(self._outcome_index(place >> np.uint64(64 - self.index_bits), coin))
        x = self.first.take(bin_) + (place & np.uint64((1 << self.width_bits) - 1)).astype(np.int64)
        near, xf = self.nearest.take(bin_), x.astype(np.float64)
        keep = _unit(accept) < np.exp(-((xf - near) * (xf + near)) / (2 * self.sigma**2))
        return x[keep]

    def _outcome_index(self, slot: np.ndarray, coin: np.ndarray) -> np.ndarray:
        """2 s for a try that keeps its slot s, 2 s + 1 for one that takes the slot's alias."""
        slot = slot.astype(np.intp)
        index = slot << 1
        index += coin >= self.keep_below.take(slot)
        return index


def _width_bits(sigma: float) -> int:
    """log2 of the bin width: 0 while a slot for each integer of the +-14 sigma support fits 2^16 slots."""
    bits = 0
    while 2 * math.ceil(TAIL_SIGMAS * sigma / (1 << bits)) > 1 << MAX_INDEX_BITS:
        bits += 1
    return bits


def _unit(words: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) from each word's top 52 bits."""
    return ((words >> np.uint64(12)) | _ONE_AS_BITS).view(np.float64) - 1.0


def _alias_table(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias method (Vose's construction): slot i keeps itself with probability ``keep[i]``, else gives
    ``alias[i]``; a uniform slot then follows ``probabilities``."""
    n = probabilities.size
    scaled = probabilities * n
    keep, alias = np.ones(n), np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        keep[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    # What is left keeps itself (its mass is 1 up to rounding). Empty slots are the first taken from ``small``, so
    # none is left to keep itself; if one were, a try could land in an empty bin.
    if np.any((probabilities == 0) & (keep > 0)):
        raise RuntimeError("alias table: an empty slot was left without an alias")
    return keep, alias


@functools.lru_cache(maxsize=8)
def _envelope(sigma: float) -> _Envelope:
    return _Envelope(sigma)


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
