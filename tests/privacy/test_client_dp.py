from __future__ import annotations

import math

import pytest
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.privacy.client_dp import NoisedSum, clip_delta, delta_norm
from fedlpp.privacy.randomness import SeededRandomness

SHAPES = {"a.lora_A.weight": (2, 8), "a.lora_B.weight": (8, 2)}


def _delta(scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}


def test_clip_scales_long_deltas_to_the_norm_and_leaves_short_ones():
    long, short = _delta(10.0), _delta(0.001)
    assert delta_norm(clip_delta(long, 1.0)) == pytest.approx(1.0, rel=1e-6)
    assert all(torch.equal(clip_delta(short, 1.0)[n], short[n]) for n in short)


def test_noised_mean_without_noise_is_the_sum_over_the_public_count():
    deltas = [clip_delta(_delta(s), 1.0) for s in (1.0, 2.0)]
    mean = NoisedSum(1.0, 0.0, 4.0, SeededRandomness(0)).mean(deltas, SHAPES)
    for n in SHAPES:
        assert torch.allclose(mean[n], (deltas[0][n] + deltas[1][n]) / 4.0)


def test_noise_on_the_sum_has_std_sigma_times_s():
    shapes = {"x": (100_000,)}
    mean = NoisedSum(0.5, 2.0, 1.0, SeededRandomness(1)).mean([], shapes)
    assert float(mean["x"].std()) == pytest.approx(1.0, rel=0.02)


def test_private_aggregate_refuses_an_unclipped_update():
    spec = get_algorithm("fedavg_lora", None, "mean", 1.0)
    adapter = {n: torch.zeros(s) for n, s in SHAPES.items()}
    ok, too_long = clip_delta(_delta(5.0), 1.0), _delta(5.0)
    payloads = [(0, rnd.make_update(ok, 10, 1)), (1, rnd.make_update(too_long, 10, 1))]
    result = rnd.aggregate_private(spec, adapter, payloads, 1, NoisedSum(1.0, 0.0, 2.0, SeededRandomness(0)))
    assert result.accepted == (0,)
    assert "privacy.clip_norm" in result.rejected[1]
    for n in SHAPES:  # the refused client's slot still counts in the public denominator
        assert torch.allclose(result.adapter[n], ok[n] / 2.0)
    assert math.isfinite(delta_norm(result.adapter))


def test_secagg_noise_shares_add_up_to_the_accounted_noise():
    from fedlpp.algorithms.secure import NoiseShares

    shares = NoiseShares(clip_norm=0.5, noise_multiplier=2.0, denominator=4.0)
    assert shares.share_std**2 * 4 == pytest.approx((2.0 * 0.5) ** 2)
    assert shares.top_up_std(4) == 0.0
    # one of four clients missing: the server adds the missing quarter of the variance
    assert shares.top_up_std(3) ** 2 + 3 * shares.share_std**2 == pytest.approx((2.0 * 0.5) ** 2)
