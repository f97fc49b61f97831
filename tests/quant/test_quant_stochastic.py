"""The uplink quantizer: unbiased, within one level of the value, the size it promises, and strict about what it decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlpp.quant.packing import packed_nbytes
from fedlpp.quant.stochastic import UplinkSpec, dequantize_stochastic, stochastic_quantize


def roundtrip(x: torch.Tensor, spec: UplinkSpec, rng: np.random.Generator) -> torch.Tensor:
    codes, scales = stochastic_quantize(x, spec, rng.random(x.numel()))
    return dequantize_stochastic(codes, scales, spec, x.numel())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_mean_of_many_roundings_is_the_value(bits):
    """E[Q(x)] = x: over 4000 independent roundings each value's mean is within 5 standard errors of it."""
    spec, rng = UplinkSpec(bits, block_size=16), np.random.default_rng(0)
    x = torch.randn(64) * 0.01
    draws = torch.stack([roundtrip(x, spec, rng) for _ in range(4000)])
    gap = float(x.abs().max()) * 2 / spec.intervals  # the widest gap between two levels
    error = (draws.double().mean(0) - x.double()).abs()
    assert float(error.max()) < 5 * (gap / 2) / np.sqrt(4000)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_value_lands_on_one_of_the_two_levels_around_it(bits):
    spec = UplinkSpec(bits, block_size=8)
    x = torch.randn(100) * 3
    y = roundtrip(x, spec, np.random.default_rng(1))
    scales = x.reshape(-1)[:96].reshape(12, 8).abs().amax(1).repeat_interleave(8).tolist() + [float(x[96:].abs().max())] * 4
    gaps = torch.tensor(scales) * 2 / spec.intervals
    assert bool(((y - x).abs() <= gaps * (1 + 2e-3)).all())


def test_a_zero_block_stays_exactly_zero_and_the_sizes_are_what_nbytes_says():
    spec = UplinkSpec(4, block_size=64)
    x = torch.zeros(200)
    x[130:] = torch.linspace(-1, 1, 70)
    codes, scales = stochastic_quantize(x, spec, np.random.default_rng(2).random(200))
    assert len(codes) == packed_nbytes(200, 4) == 100 and scales.dtype == torch.float16 and scales.shape == (4,)
    assert spec.nbytes(200) == 100 + 2 * 4
    y = dequantize_stochastic(codes, scales, spec, 200)
    assert torch.equal(y[:128], torch.zeros(128))
    assert float(y[199]) == pytest.approx(1.0) and float(y[130]) == pytest.approx(-1.0)  # the block's extremes are levels


def test_the_same_draws_give_the_same_codes():
    spec, x, draws = UplinkSpec(2), torch.randn(300), np.random.default_rng(3).random(300)
    assert stochastic_quantize(x, spec, draws)[0] == stochastic_quantize(x, spec, draws.copy())[0]


@pytest.mark.parametrize(
    ("codes", "scales", "message"),
    [
        (b"\x00" * 99, torch.zeros(4, dtype=torch.float16), "expected 100 bytes"),
        (b"\x00" * 100, torch.zeros(3, dtype=torch.float16), "shape \\(4,\\)"),
        (b"\x00" * 100, torch.zeros(4, dtype=torch.float32), "float16"),
        (b"\x00" * 100, torch.tensor([1, -1, 0, 0], dtype=torch.float16), "finite and >= 0"),
        (b"\x00" * 100, torch.tensor([1, float("inf"), 0, 0], dtype=torch.float16), "finite and >= 0"),
    ],
)
def test_codes_or_scales_that_do_not_fit_are_refused(codes, scales, message):
    with pytest.raises(ValueError, match=message):
        dequantize_stochastic(codes, scales, UplinkSpec(4, block_size=64), 200)


def test_bad_specs_and_values_are_refused():
    with pytest.raises(ValueError, match="one of"):
        UplinkSpec(3)
    with pytest.raises(ValueError, match="block_size"):
        UplinkSpec(4, block_size=0)
    with pytest.raises(ValueError, match="non-finite"):
        stochastic_quantize(torch.tensor([1.0, float("nan")]), UplinkSpec(4), np.zeros(2))
    with pytest.raises(ValueError, match="uniform draws"):
        stochastic_quantize(torch.ones(3), UplinkSpec(4), np.zeros(2))


def test_set_padding_bits_after_the_last_value_are_refused():
    codes, scales = stochastic_quantize(torch.ones(3), UplinkSpec(2, block_size=64), np.zeros(3))  # 6 bits of 8
    assert dequantize_stochastic(codes, scales, UplinkSpec(2, block_size=64), 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="padding bits"):
        dequantize_stochastic(bytes([codes[0] | 0x80]), scales, UplinkSpec(2, block_size=64), 3)
