"""SecAgg in a b-bit field (secagg.modulus_bits < 32): the same protocol, b bits a value on the wire, the exact sum mod 2^b."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_harness import flip, make_round

from fedlpp.secagg import SecAggAbort, SecAggError, SecAggParams, SecAggRangeError, decode_sum, field_elements
from fedlpp.secagg import server as server_module
from fedlpp.secagg import wire as swire
from fedlpp.secagg.fixedpoint import to_field
from fedlpp.secagg.params import SecAggParamsError
from fedlpp.secagg.wire import HEADER_BYTES


def small(bits: int, clients: int = 8, **extra) -> SecAggParams:
    """The finest scale whose headroom holds for ``clients`` inputs in [-1, 1] in Z_{2^bits}."""
    scale = 2.0 ** (bits - 2 - int(np.ceil(np.log2(clients))))
    return SecAggParams(scale=scale, clip_range=1.0, max_clients=clients, modulus_bits=bits, **extra)


@pytest.mark.parametrize("bits", [12, 16, 20, 31])
def test_the_unmasked_sum_is_the_sum_of_the_same_encodings_without_masks_exactly(bits):
    rnd = make_round(8, dim=777, params=small(bits))
    views = rnd.mask(rnd.share(rnd.advertise()), skip=[5])  # and one client drops out after sharing its keys
    result = rnd.unmask(rnd.sign(views))
    survivors = [c for c in range(8) if c != 5]
    assert result.dropped == (5,) and np.array_equal(result.encoded, rnd.expected(survivors))
    assert np.max(np.abs(result.values - sum(rnd.inputs[c] for c in survivors))) <= 7 / rnd.params.scale


@pytest.mark.parametrize("bits", [12, 16, 24])
def test_a_masked_value_costs_b_bits(bits):
    for dim in (1, 1000, 12345):
        rnd = make_round(3, dim=dim, params=small(bits, clients=3))
        routed = rnd.share(rnd.advertise())
        assert len(rnd.clients[0].masked_input(routed[0], rnd.inputs[0])) == HEADER_BYTES + -(-dim * bits // 8)


def test_packing_keeps_each_values_low_bits_and_refuses_set_padding_bits():
    words = np.random.default_rng(0).integers(0, 2**32, 13, dtype=np.uint64).astype(np.uint32)
    body = swire.encode_masked(words, 12)
    assert len(body) == 20  # 13 x 12 bits = 156 bits
    back = swire.decode_masked(swire.Reader(bytes(body), "test"), 13, 12)
    assert np.array_equal(back, words & np.uint32(0xFFF))
    padded = bytes(body[:-1]) + bytes([body[-1] | 0x80])
    with pytest.raises(SecAggError, match="padding bits"):
        swire.decode_masked(swire.Reader(padded, "test"), 13, 12)


def test_a_sum_decodes_as_a_signed_b_bit_number():
    params = small(12, clients=3)
    assert decode_sum(np.array([0, 1, 2047, 2048, 4095], dtype=np.uint32), params).tolist() == [
        v / params.scale for v in (0, 1, 2047, -2048, -1)
    ]


def test_a_field_too_small_or_without_headroom_is_refused_by_name():
    with pytest.raises(SecAggParamsError, match="secagg.modulus_bits: must be in \\[12, 32\\]"):
        SecAggParams(modulus_bits=8)
    with pytest.raises(SecAggParamsError, match="secagg.scale: no headroom.* must be < 2\\^15"):
        SecAggParams(scale=2.0**20, modulus_bits=16, max_clients=3)


def test_a_flipped_bit_in_a_small_masked_input_moves_one_coordinate_of_the_sum_by_that_bit():
    """Masking is a one-time pad mod 2^b: a flipped bit is not detectable by the protocol (SecAgg has no integrity
    for inputs), so the sum moves by exactly that bit's value — the check on the sum is the caller's (RotatedMean)."""
    rnd = make_round(4, dim=50, params=small(16, clients=4))
    masked = rnd.share(rnd.advertise())
    for c, message in masked.items():
        rnd.server.receive_masked_input(
            flip(rnd.clients[c].masked_input(message, rnd.inputs[c]), -1)
            if c == 0
            else rnd.clients[c].masked_input(message, rnd.inputs[c]),
            c,
        )
    result = rnd.unmask(rnd.sign(rnd.server.finish_masked_input()))
    diff = (result.encoded.astype(np.int64) - rnd.expected(range(4)).astype(np.int64)) % 2**16
    assert np.count_nonzero(diff) == 1 and int(diff[-1]) in (2**8, 2**16 - 2**8)  # the last value's bit 8


def test_values_that_wrap_at_each_client_cancel_in_the_sum_when_the_encoder_bounds_the_sum():
    """sum_may_wrap: one value must fit the field, the sum is read modulo 2^b. Two clients' values wrapped on their
    own (3000 -> -1096, -2500 -> 1596) add up with a third to the true 500; a true sum beyond the field wraps."""
    params = SecAggParams(scale=1.0, clip_range=2048.0, max_clients=3, modulus_bits=12, sum_may_wrap=True)
    rnd = make_round(3, dim=4, params=params)
    rnd.inputs = {0: np.array([-1096.0, 2000, 2048, -2048]), 1: np.array([1596.0, 2000, 0, 0]), 2: np.array([0.0, -1900, 1, -1])}
    result = rnd.run()
    assert np.array_equal(result.encoded, rnd.expected(range(3)))
    assert result.values.tolist() == [500.0, 2100.0 - 4096, -2047.0, 2047.0]


def test_a_sum_that_may_wrap_is_only_for_a_small_field_whose_range_holds_one_value():
    with pytest.raises(SecAggParamsError, match="fewer than 32 bits"):
        SecAggParams(scale=1.0, clip_range=2.0**31, modulus_bits=32, sum_may_wrap=True)
    with pytest.raises(SecAggParamsError, match="beyond the field"):
        SecAggParams(scale=1.0, clip_range=2049.0, modulus_bits=12, sum_may_wrap=True)


def test_no_sum_of_fewer_than_min_survivors_is_unmasked_and_clients_refuse_to_sign_one(monkeypatch):
    """Distributed DP is priced for at least min_survivors noise shares: the server aborts below it, and a client
    shown such a view (by a server that skipped the check) refuses to sign."""
    params = dataclasses.replace(small(16, clients=5), min_survivors=5)
    rnd = make_round(5, dim=20, params=params)
    routed = rnd.share(rnd.advertise())
    with pytest.raises(SecAggAbort, match="survivors \\(secagg min_survivors\\)"):
        rnd.mask(routed, skip=[4])
    lenient = make_round(5, dim=20, params=params)
    monkeypatch.setattr(server_module, "_require", lambda *args: None)  # a server that does not check
    views = lenient.mask(lenient.share(lenient.advertise()), skip=[4])
    monkeypatch.undo()
    with pytest.raises(SecAggAbort, match="ConsistencyCheck"):
        lenient.clients[0].sign_survivors(views[0])


def test_field_elements_are_taken_as_they_are_only_where_the_encoder_bounds_the_sum():
    """In a field of at most 16 bits the words are uint16: uint32 elements keep their residue mod 2^16 and uint16
    ones pass; uint16 elements cannot carry a 20-bit field's values, and a fixed-point session range-checks any
    array as numbers (an unsigned one is not trusted as field elements there)."""
    wraps16 = SecAggParams(scale=1.0, clip_range=2.0**15, max_clients=3, modulus_bits=16, sum_may_wrap=True)
    assert wraps16.word == np.dtype("<u2")
    elements = field_elements(np.array([-1, 70000, 5]), 1, wraps16)
    assert elements.dtype == np.uint16 and elements.tolist() == [65535, 70000 % 65536, 5, 1]
    assert to_field(np.array([65535, 70000], dtype=np.uint32), wraps16, 0).tolist() == [65535, 70000 % 65536]
    wraps20 = SecAggParams(scale=1.0, clip_range=2.0**19, max_clients=3, modulus_bits=20, sum_may_wrap=True)
    with pytest.raises(ValueError, match="uint16 field elements cannot carry Z_2\\^20"):
        to_field(np.array([1, 2], dtype=np.uint16), wraps20, 4)
    with pytest.raises(SecAggRangeError):
        to_field(np.array([3], dtype=np.uint32), small(16), 0)  # 3 > clip_range 1: refused, not taken as an element
    with pytest.raises(TypeError, match="field elements are integers"):
        field_elements(np.array([0.5]), 1, wraps16)
