"""The small field's encoding: rotation is exact to invert, the decoded mean is within the stated rounding bound,
nothing wraps at the chosen scale, and the server refuses a sum that honest clients could not have made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlpp.algorithms import rotation as rot
from fedlpp.algorithms.secure import RotatedInput, RotatedMean, SecureEncoding
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.config import SecAggConfig
from fedlpp.engine.setup import secagg_params
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.quant import QuantSpec
from fedlpp.secagg import AggregateResult, append_weight

D = 3000


def field(bits: int = 16, clients: int = 5, bound: float = 1.0) -> rot.Rotation:
    return rot.Rotation(bits, clients, bound, seed=7)


def updates(n: int, norm: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_t(2, D)  # heavy-tailed, as a LoRA delta's coordinates are
        out.append(x / np.linalg.norm(x) * norm * rng.uniform(0.3, 1.0))
    return out


@pytest.mark.parametrize(("bits", "dtype", "tolerance"), [(16, np.float32, 1e-6), (30, np.float64, 1e-12)])
def test_the_rotation_is_orthogonal_and_the_same_for_everyone_in_a_round(bits, dtype, tolerance):
    r, x = field(bits), updates(1)[0]
    signs = r.signs(3, D)
    assert signs.dtype == dtype == r.transform_dtype(D)
    assert np.array_equal(signs, r.signs(3, D)) and not np.array_equal(signs, r.signs(4, D))
    y = rot.rotate(x, signs)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=tolerance)
    assert np.linalg.norm(rot.unrotate(y, signs) - x) <= tolerance * np.linalg.norm(x)
    assert np.abs(y).max() < 0.2 * np.abs(x).max(), "rotation spreads a heavy-tailed vector's mass"


def test_float32_moves_an_encoding_by_far_less_than_rounding_does():
    """Where the rotation runs in float32 its error, in the field's integers, is below 1% of rounding's bound sqrt(d):
    checked at the largest field that still runs in float32 here (b = 20), where that error is largest."""
    r, x = field(20), updates(1)[0]
    assert r.transform_dtype(D) == np.float32 and field(21).transform_dtype(D) == np.float64
    signs = r.signs(1, D)
    exact = rot.rotate(x, signs.astype(np.float64)) * r.scale(D)
    assert np.linalg.norm(rot.rotate(x, signs) * r.scale(D) - exact) < 0.01 * np.sqrt(D)


@pytest.mark.parametrize("bits", [12, 16, 24])
def test_the_decoded_mean_is_within_sqrt_d_over_s_of_the_float_mean(bits):
    r, xs = field(bits), updates(5)
    total = sum(r.encode(x, 3, SeededRandomness(k)) for k, x in enumerate(xs))
    signed = np.mod(total + r.half_field, 2 * r.half_field) - r.half_field  # what the field's sum decodes to
    mean = r.decode(signed, 3) / 5
    error = float(np.linalg.norm(mean - sum(xs) / 5))
    assert error <= r.rounding_bound(D)
    assert error > 0, "rounding at random moved something"


def test_each_client_sends_integers_within_the_field_and_a_long_update_is_scaled_to_the_bound():
    r = field(12, bound=1.0)
    long = updates(1, norm=50.0)[0]
    encoded = r.encode(long, 1, SeededRandomness(0))
    assert np.array_equal(encoded, np.round(encoded)) and encoded.min() >= -r.half_field and encoded.max() < r.half_field
    back = r.decode(encoded, 1)  # one client, its integers as the sum
    assert np.linalg.norm(back) == pytest.approx(1.0, abs=r.rounding_bound(D) * 1.01)


def test_at_the_chosen_scale_no_sum_wraps_and_at_sixteen_times_it_sums_do():
    """Five aligned updates at the bound, 200 rounds (each its own signs): none wraps at the chosen scale; at 16x the
    scale the bound is far above 1e-6 and wraps happen — the bound is not vacuous in the direction it must hold."""
    r = field(12, clients=5)
    x = updates(1, norm=1.0)[0]
    x /= np.linalg.norm(x)
    s = r.scale(D)
    assert rot.overflow_probability(s, 12, 5, 1.0, D) <= rot.OVERFLOW_TARGET < rot.overflow_probability(16 * s, 12, 5, 1.0, D)
    wraps, peak = 0, 0.0
    for round_ in range(200):
        total = sum(r.encode(x, round_, SeededRandomness(100 * round_ + k)) for k in range(5))  # five wrapped encodings
        exact = rot.rotate(5 * x, r.signs(round_, D)) * s  # what they add up to before the field
        peak = max(peak, float(np.abs(exact).max()))
        wraps += int(np.abs(exact).max() + 5 >= r.half_field)
        signed = np.mod(total + r.half_field, 2 * r.half_field) - r.half_field
        assert np.abs(signed - exact).max() < 5, "the field's sum is the true integer sum: nothing wrapped"
    assert wraps == 0 and peak < r.half_field / 2, "the bound is conservative: the largest value stays in half the field"
    assert 16 * peak > r.half_field, "and at 16 times the scale sums would have wrapped"


def test_a_field_too_small_for_the_clients_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="secagg.modulus_bits=12 cannot hold the sum of 1000 updates"):
        rot.choose_scale(12, 1000, 1.0, 10)


def mean_of(values: np.ndarray, survivors=(0, 1, 2), bits=16):
    cfg = SecAggConfig(modulus_bits=bits, l2_bound=1.0)
    encoding = SecureEncoding(secagg_params(cfg, 3), 1, rot.Rotation(bits, 3, 1.0, seed=7))
    spec = get_algorithm("fedavg_lora", QuantSpec(2))
    adapter = {"layer.lora_A.weight": torch.zeros(10, 30), "layer.lora_B.weight": torch.zeros(30, 10)}
    notes: dict = {}
    out = RotatedMean(encoding)(spec, adapter, AggregateResult(np.zeros(values.size, np.uint32), values, survivors, ()), 1, notes)
    return out, notes, encoding


def test_the_server_refuses_a_forged_weight_or_a_sum_longer_than_the_survivors_can_make():
    _, _, encoding = mean_of(np.zeros(601))
    r = encoding.rotation
    honest = [r.encode(x[:600], 1, SeededRandomness(k)) for k, x in enumerate(updates(3))]
    total = sum(append_weight(v, 1, encoding.params) for v in honest)
    ok, notes, _ = mean_of(total)
    assert ok.mean_delta is not None and "refused" not in notes
    forged = total.copy()
    forged[-1] = 5
    assert "total weight 5 is not their number 3" in mean_of(forged)[1]["refused"]
    loud = total.copy()
    loud[:-1] += rot.rotate(np.full(600, 1.0), r.signs(1, 600)) * r.scale(600)  # a node adds norm sqrt(600) ~ 24.5
    assert "more than 3 updates within secagg.l2_bound=1 can reach" in mean_of(loud)[1]["refused"]


def test_an_update_that_is_not_finite_takes_part_as_zero():
    """Neither stopping the run nor dropping out (which would tell the server something about that client's data)."""
    _, _, encoding = mean_of(np.zeros(601))
    delta = {"layer.lora_A.weight": torch.full((10, 30), float("nan")), "layer.lora_B.weight": torch.zeros(30, 10)}
    sent = RotatedInput(encoding, seed=0, secure=False)(delta, 1, 1, 0)
    assert sent is not None and not sent[:-1].any() and sent[-1] == 1


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_the_servers_float32_decode_moves_the_sum_by_far_less_than_rounding_does(noise_multiplier):
    """At the largest field whose server decodes in float32 here, the decoded sum of five clients' encodings (with
    their noise shares) is within 1% of rounding's bound on the sum, K sqrt(d) / s, of the float64 decode."""
    last = max(b for b in range(14, 32) if rot.Rotation(b, 5, 1.0, 7, noise_multiplier).transform_dtype(D, 5) == np.float32)
    r = rot.Rotation(last, 5, 1.0, 7, noise_multiplier)
    beyond = rot.Rotation(last + 1, 5, 1.0, 7, noise_multiplier)
    assert beyond.transform_dtype(D, 5) == np.float64 and beyond.decode(np.zeros(D), 2).dtype == np.float64
    if noise_multiplier:  # the noised sum needs float64 at fields where one client's update still takes float32
        assert beyond.transform_dtype(D) == np.float32
    noise = [SeededRandomness(20 + k) for k in range(5)] if noise_multiplier else [None] * 5
    total = sum(r.encode(x, 2, SeededRandomness(k), noise[k]) for k, x in enumerate(updates(5)))
    decoded = r.decode(total.astype(np.float64), 2)
    assert decoded.dtype == np.float32
    exact = rot.unrotate(total / r.scale(D), r.signs(2, D, np.float64))
    assert np.linalg.norm(decoded - exact) < 0.01 * 5 * np.sqrt(D) / r.scale(D)


def test_a_huge_finite_update_is_scaled_to_the_bound_not_taken_as_not_finite():
    """float32's sum of squares overflows beyond a norm of 1.8e19: the norm is then taken in float64."""
    r = field(16, bound=1.0)
    huge = np.full(D, 1e19, dtype=np.float32)
    assert rot.l2_norm(huge) == pytest.approx(1e19 * np.sqrt(D), rel=1e-6)
    back = r.decode(r.encode(huge, 1, SeededRandomness(0)).astype(np.float64), 1)
    assert np.linalg.norm(back) == pytest.approx(1.0, abs=r.rounding_bound(D) * 1.01)


def test_rounding_goes_up_with_probability_the_fractional_part():
    """Unbiased: y rounds to floor(y) + 1 with probability y - floor(y), for values of either sign."""
    r, n = field(), 200_000
    for y in (0.3, -2.75, 7.999):
        rounded = r._round(np.full(n, y), SeededRandomness(1))
        assert set(np.unique(rounded)) <= {np.floor(y), np.floor(y) + 1}
        up = np.mean(rounded == np.floor(y) + 1)
        frac = y - np.floor(y)
        assert abs(up - frac) < 5 * np.sqrt(frac * (1 - frac) / n)


def test_conditional_rounding_keeps_the_norm_the_accounting_assumes():
    from fedlpp.privacy.discrete_gaussian import rounded_norm_bound

    r = rot.Rotation(16, 4, 1.0, seed=1, noise_multiplier=1.0)
    x = updates(1, norm=1.0)[0]
    x /= np.linalg.norm(x)  # at the bound, where rounding is most likely to pass it
    s = r.scale(D)
    bound = rounded_norm_bound(1.0 * s, D)
    for k in range(50):
        rounded = r._round(rot.rotate(x, r.signs(k, D)) * s, SeededRandomness(k))
        assert np.linalg.norm(rounded) <= bound
