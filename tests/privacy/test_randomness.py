from __future__ import annotations

import torch

from fedlpp.privacy.randomness import SeededRandomness, SystemRandomness


def test_system_gaussian_has_the_right_moments_and_is_not_reproducible():
    rng = SystemRandomness()
    z = rng.normal((200_000,), 2.5)
    assert abs(float(z.mean())) < 0.03
    assert abs(float(z.std()) - 2.5) < 0.03
    assert not torch.equal(rng.normal((8,), 1.0), rng.normal((8,), 1.0))
    u = rng.uniform(100_000)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_seeded_randomness_reproduces():
    a, b = SeededRandomness(3), SeededRandomness(3)
    assert torch.equal(a.normal((5,), 1.0), b.normal((5,), 1.0))
    assert (a.uniform(4) == b.uniform(4)).all()
