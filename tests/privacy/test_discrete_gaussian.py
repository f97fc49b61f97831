"""The discrete Gaussian sampler draws what it should, and the distributed-DP bound behaves as its paper says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from fedlpp.privacy import discrete_gaussian as dg
from fedlpp.privacy.randomness import SeededRandomness, SystemRandomness


def pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    wide = np.arange(-60 * math.ceil(sigma) - 60, 60 * math.ceil(sigma) + 61)
    norm = np.exp(-(wide**2) / (2 * sigma**2)).sum()
    return np.exp(-(support**2) / (2 * sigma**2)) / norm


@pytest.mark.parametrize("sigma", [0.6, 1.5, 4.0])
def test_the_draws_follow_the_discrete_gaussian(sigma):
    draws = dg.sample(60_000, sigma, SeededRandomness(1))
    assert draws.dtype == np.int64
    edge = math.ceil(3 * sigma)
    support = np.arange(-edge, edge + 1)
    observed = np.array([np.count_nonzero(draws == k) for k in support] + [np.count_nonzero(np.abs(draws) > edge)])
    expected = np.append(pmf(sigma, support), 1 - pmf(sigma, support).sum()) * draws.size
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("sigma", [100.0, 1295.27, 2341.0, 3.3e5])
def test_wide_bins_with_rejection_still_give_the_discrete_gaussian(sigma):
    """Above sigma = 2340 a try draws a bin of 2^k values, a value in it, and a rejection test: the draws still follow
    the pmf (counted in 66 bins of sigma / 8 and the two tails) and their parity is fair."""
    draws = dg.sample(200_000, sigma, SeededRandomness(7))
    edges = np.round(np.linspace(-4 * sigma, 4 * sigma, 65)).astype(np.int64)
    support = np.arange(-int(5 * sigma), int(5 * sigma) + 1)
    expected = np.bincount(np.searchsorted(edges, support, side="right"), weights=pmf(sigma, support), minlength=66)
    observed = np.bincount(np.searchsorted(edges, draws, side="right"), minlength=66)
    assert chisquare(observed, expected / expected.sum() * draws.size).pvalue > 1e-3
    assert abs(np.mean(draws % 2) - 0.5) < 0.01


def sampler_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's output distribution, computed from its tables: a slot keeps itself with probability
    threshold / 2^64, else gives its alias; a value is uniform in its bin and kept with p(x) / p(nearest)."""
    env = dg._envelope(sigma)
    n = env.keep_below.size
    keep = env.keep_below.astype(np.float64) / 2.0**64
    bins = keep / n
    np.add.at(bins, env.alias, (1 - keep) / n)
    values = env.first[:, None] + np.arange(1 << env.width_bits)[None, :]
    near = env.nearest[:, None]
    mass = bins[:, None] * np.exp(-((values - near) * (values + near)) / (2 * sigma**2))
    support, where = np.unique(values, return_inverse=True)  # the padding slots (never drawn) repeat 0 .. w-1
    return support, np.bincount(where.ravel(), weights=mass.ravel()) / mass.sum()


@pytest.mark.parametrize("sigma", [0.01, 0.5, 1.0, 63.9, 1295.27, 2340.0, 2341.0, 3.3e5])
def test_the_samplers_tables_give_the_discrete_gaussian_to_float_precision(sigma):
    """Exact, not statistical: within 1e-12 in total variation, within 1e-9 relative wherever the mass is above
    1e-12, and never more often than the pmf anywhere in the tail (an over-drawn tail value costs delta)."""
    values, drawn = sampler_pmf(sigma)
    exact = pmf(sigma, values)
    exact /= exact.sum()
    assert 0.5 * np.abs(drawn - exact).sum() < 1e-12
    large = exact > 1e-12
    assert np.max(np.abs(drawn[large] / exact[large] - 1)) < 1e-9
    assert np.all(drawn[~large] <= exact[~large] * (1 + 1e-9))
    assert drawn[np.abs(values) > TAIL_CUT * sigma].sum() == 0


TAIL_CUT = dg.TAIL_SIGMAS + 1


class Words:
    """Randomness that hands out the given words, in order, and checks that all were asked for."""

    def __init__(self, *words: int) -> None:
        self.words_ = list(words)

    def words(self, n: int) -> np.ndarray:
        assert n <= len(self.words_)
        out, self.words_ = self.words_[:n], self.words_[n:]
        return np.array(out, dtype="<u8")


def drawn(env, tries: int, *words: int) -> list[int]:
    """What ``tries`` tries give from exactly these words (each one used)."""
    source = Words(*words)
    out = env.draw(tries, source).tolist()
    assert not source.words_, "every word was used"
    return out


def test_a_tries_words_pick_the_slot_the_value_and_the_acceptance_as_documented():
    env = dg._envelope(3.3e5)  # bins of 256 values, 2^16 slots
    assert (env.width_bits, env.index_bits) == (8, 16)
    top = 64 - env.index_bits
    slot = int(np.argmax(env.keep_below))  # a slot that keeps itself when its coin is 0
    near_offset = int(env.nearest[slot] - env.first[slot])
    ones = 2**64 - 1
    # Word A: slot in the top bits, offset in the low 8; word B: the coin; word C: acceptance (0 keeps anything).
    assert drawn(env, 1, (slot << top) | 5, 0, 0) == [env.first[slot] + 5]
    assert drawn(env, 1, (slot << top) | 5, ones, 0) == [env.first[env.alias[slot]] + 5]
    # The largest acceptance draw keeps only the bin's value nearest 0, whose ratio is exactly 1.
    assert drawn(env, 1, (slot << top) | near_offset, 0, ones) == [env.nearest[slot]]
    far_offset = 255 - near_offset
    assert drawn(env, 1, (slot << top) | far_offset, 0, ones) == []
    exact = dg._envelope(1295.27)  # up to sigma = 2340 a slot per integer: a coin and a 16-bit slot, nothing rejected
    assert (exact.width_bits, exact.index_bits) == (0, 16)
    slot = int(np.argmax(exact.keep_below))
    assert drawn(exact, 1, 0, slot) == [exact.first[slot]]
    assert drawn(exact, 1, ones, slot) == [exact.first[exact.alias[slot]]]
    assert drawn(exact, 2, 0, ones, slot | (slot << 16)) == [exact.first[slot], exact.first[exact.alias[slot]]]
    small = dg._envelope(4.0)  # fewer slots: the top index_bits of each 16-bit value
    slot = int(np.argmax(small.keep_below))
    assert drawn(small, 1, 0, slot << (16 - small.index_bits)) == [small.first[slot]]
    assert dg._envelope(2340.0).width_bits == 0 and dg._envelope(2341.0).width_bits == 1


def test_most_tries_are_kept():
    tries = 100_000
    assert dg._envelope(2341.0).draw(tries, SeededRandomness(0)).size > 0.98 * tries
    assert dg._envelope(3.3e5).draw(tries, SeededRandomness(0)).size > 0.98 * tries
    with pytest.raises(ValueError, match="sigma must be in"):
        dg.sample(3, 2.0**49, SeededRandomness(0))


def test_large_sigma_has_the_continuous_variance_and_the_os_generator_works():
    draws = dg.sample(200_000, 300.0, SystemRandomness())
    assert abs(draws.mean()) < 5 * 300 / math.sqrt(draws.size)
    assert draws.std() == pytest.approx(300.0, rel=0.01)


def test_the_sum_bound_tends_to_the_gaussians_and_tau_vanishes_with_sigma():
    assert dg.tau(0.5, 10) > 0.05 and dg.tau(3.0, 10) < 1e-30
    # Large sigma: rho -> Delta^2 / (2 n sigma^2), the continuous Gaussian's.
    assert dg.sum_rho(2.0 * 1000, 1000.0 / math.sqrt(4), 4, 460_800) == pytest.approx(2.0, rel=1e-9)
    assert dg.gaussian_equivalent(2.0) == pytest.approx(0.5)
    # Small sigma: the tau term makes it strictly worse than the continuous bound.
    assert dg.sum_rho(2.0, 0.6, 4, 1000) > 0.5 * (2.0 / (2 * 0.6)) ** 2


def test_rounding_keeps_a_norm_within_the_conditional_bound():
    assert dg.rounded_norm_bound(1000.0, 100) < 1000.0 + math.sqrt(100)
    assert dg.rounded_norm_bound(0.0, 100) == pytest.approx(min(10.0, math.sqrt(25 + math.sqrt(1.0) * 5)))
    with pytest.raises(ValueError, match="sigma must be in"):
        dg.sample(3, 0.0, SeededRandomness(0))
