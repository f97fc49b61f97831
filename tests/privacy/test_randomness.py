from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from fedlpp.privacy.randomness import SeededRandomness, SystemRandomness


def test_system_gaussian_has_the_right_moments_and_is_not_reproducible():
    rng = SystemRandomness()
    z = rng.normal((200_000,), 2.5)
    assert abs(float(z.mean())) < 0.03
    assert abs(float(z.std()) - 2.5) < 0.03
    assert not torch.equal(rng.normal((8,), 1.0), rng.normal((8,), 1.0))
    u = rng.uniform(100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert chisquare(np.bincount((u * 16).astype(int), minlength=16)).pvalue > 1e-3


def test_every_system_draw_has_a_fresh_key():
    rng = SystemRandomness()
    first, second = rng.words(4), rng.words(4)
    assert first.dtype == np.uint64 and not np.array_equal(first, second)
    bits = np.unpackbits(rng.words(50_000).view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.005


def test_seeded_randomness_reproduces():
    a, b = SeededRandomness(3), SeededRandomness(3)
    assert torch.equal(a.normal((5,), 1.0), b.normal((5,), 1.0))
    assert (a.uniform(4) == b.uniform(4)).all()
