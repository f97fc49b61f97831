"""Fixed-point encoding: exact sums, loud range errors, headroom validated at config time."""

import math

import numpy as np
import pytest

from fedlpp.secagg import (
    SecAggParams,
    SecAggParamsError,
    SecAggRangeError,
    append_weight,
    decode_sum,
    encode,
    split_weight,
)


def test_encoding_is_round_x_scale_mod_2_32() -> None:
    params = SecAggParams(scale=4.0, clip_range=1.0, max_clients=10)
    enc = encode([0.0, 0.25, -0.25, 1.0, -1.0, 0.374], params, client=0)
    # Hand-computed: -0.25 * 4 = -1 -> 2^32 - 1; 0.374 * 4 = 1.496 -> 1.
    assert enc.tolist() == [0, 1, 2**32 - 1, 4, 2**32 - 4, 1]
    assert enc.dtype == np.uint32


def test_sum_of_encodings_decodes_exactly_at_full_headroom() -> None:
    params = SecAggParams(scale=2.0**16, clip_range=1.0, max_clients=32000)
    n = params.max_clients
    # n clients all at +r (and all at -r) is the worst case the headroom must absorb.
    for sign in (1.0, -1.0):
        one = encode(np.full(3, sign), params, 0).astype(np.uint64)
        total = (one * n % 2**32).astype(np.uint32)
        assert decode_sum(total, params).tolist() == [sign * n] * 3


@pytest.mark.parametrize("bad", [1.0001, -2.0, float("nan"), float("inf")])
def test_out_of_range_value_names_client_and_index(bad: float) -> None:
    params = SecAggParams(clip_range=1.0)
    values = np.zeros(10)
    values[7] = bad
    values[9] = 5.0  # a later offender: the error reports the first one
    with pytest.raises(SecAggRangeError, match=r"client 3 value at index 7") as info:
        encode(values, params, client=3)
    assert (info.value.client, info.value.index) == (3, 7)
    assert info.value.value == bad or math.isnan(info.value.value)


def test_value_at_the_bound_is_accepted() -> None:
    params = SecAggParams(clip_range=0.5)
    assert encode([0.5, -0.5], params, 0).view(np.int32).tolist() == [2**19, -(2**19)]


def test_config_without_headroom_is_rejected() -> None:
    # 1000 * 2^21 = 2^31 - no room for the sign bit.
    with pytest.raises(SecAggParamsError, match="headroom"):
        SecAggParams(scale=2.0**21, clip_range=1.0, max_clients=1024)
    SecAggParams(scale=2.0**21, clip_range=1.0, max_clients=1023)  # just fits


@pytest.mark.parametrize(
    "field, value",
    [
        ("scale", 0.0),
        ("clip_range", -1.0),
        ("max_clients", 2),
        ("threshold_fraction", 0.5),
        ("graph", "ring"),
        ("degree", -1),
        ("prg", "rc4"),
    ],
)
def test_invalid_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SecAggParamsError, match=f"secagg.{field}"):
        SecAggParams(**{field: value})  # type: ignore[arg-type]


def test_weight_coordinate_sums_to_the_exact_total_weight() -> None:
    params = SecAggParams(scale=2.0**16, clip_range=1.0, max_clients=100)
    weights = [120, 7, 3001]
    deltas = [np.array([0.1, -0.2]), np.array([0.3, 0.0]), np.array([-0.05, 0.01])]
    # Weighted mean: each client sends (n_k / n_max) * delta_k so the product stays in range.
    n_max = max(weights)
    total = np.zeros(3, dtype=np.uint64)
    for k, (w, d) in enumerate(zip(weights, deltas, strict=True)):
        total += encode(append_weight(d * w / n_max, w, params), params, k)
    weighted_sum, weight_total = split_weight(decode_sum((total % 2**32).astype(np.uint32), params), params)
    assert weight_total == sum(weights)
    expected = sum(w * d for w, d in zip(weights, deltas, strict=True)) / n_max
    np.testing.assert_allclose(weighted_sum, expected, atol=len(weights) / params.scale)
