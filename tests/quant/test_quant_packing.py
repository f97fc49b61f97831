"""Bit packing: exact round trips, dense sizes, hand-checked layout, any width from 1 to 32 bits, input validation."""

import numpy as np
import pytest
import torch

from fedlpp.quant import SUPPORTED_BITS, pack_codes, packed_nbytes, storage_bits, unpack_codes
from fedlpp.quant.packing import pack_uints, unpack_uints

COUNTS = [0, 1, 5, 7, 63, 64, 65, 1000]


def _levels(bits: int) -> int:
    return 3 if bits == 1 else 2**bits


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("count", COUNTS)
def test_round_trip_is_exact(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + count)
    codes = torch.randint(0, _levels(bits), (count,), generator=gen, dtype=torch.uint8)
    data = pack_codes(codes, bits)
    assert len(data) == packed_nbytes(count, bits)
    out = unpack_codes(data, bits, count)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_round_trip(bits: int) -> None:
    # All-max codes exercise every bit of every field (and trit bytes up to 242).
    codes = torch.full((37,), _levels(bits) - 1, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 37), codes)


@pytest.mark.parametrize(
    ("bits", "count", "nbytes"),
    [
        (1, 1, 1),
        (1, 5, 1),
        (1, 7, 2),
        (1, 1000, 200),
        (2, 1, 1),
        (2, 7, 2),
        (2, 65, 17),
        (2, 1000, 250),
        (3, 1, 1),
        (3, 8, 3),
        (3, 63, 24),
        (3, 65, 25),
        (3, 1000, 375),
        (4, 7, 4),
        (4, 65, 33),
        (8, 65, 65),
        (8, 0, 0),
    ],
)
def test_packed_size_is_dense(bits: int, count: int, nbytes: int) -> None:
    assert packed_nbytes(count, bits) == nbytes
    assert len(pack_codes(torch.zeros(count, dtype=torch.uint8), bits)) == nbytes


def test_storage_bits() -> None:
    assert [storage_bits(w) for w in SUPPORTED_BITS] == [1.6, 2.0, 3.0, 4.0, 8.0]


def test_layout_by_hand() -> None:
    # 2-bit, LSB first: 3 | 1<<2 | 1<<4 | 2<<6 = 3 + 4 + 16 + 128 = 0x97.
    assert pack_codes(torch.tensor([3, 1, 1, 2]), 2) == b"\x97"
    # 3-bit: 8 values -> 3 bytes; value 7 then zeros sets the low 3 bits of byte 0,
    # value 7 in slot 2 covers bits 6..8 = 0xC0 in byte 0 and 0x01 in byte 1.
    assert pack_codes(torch.tensor([7, 0, 7, 0, 0, 0, 0, 0]), 3) == b"\xc7\x01\x00"
    # Ternary base 3, first value least significant: 2 + 1*3 + 0*9 + 2*27 + 1*81 = 140.
    assert pack_codes(torch.tensor([2, 1, 0, 2, 1]), 1) == bytes([140])


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_out_of_range_codes_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(torch.tensor([0, _levels(bits)]), bits)
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(torch.tensor([-1, 0]), bits)


def test_float_codes_rejected() -> None:
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.tensor([0.0, 1.0]), 2)


def test_unpack_rejects_wrong_length_and_bad_trits() -> None:
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_codes(b"\x00", 2, 5)
    with pytest.raises(ValueError, match="ternary"):
        unpack_codes(bytes([243]), 1, 5)


def bit_stream_reference(values: np.ndarray, bits: int) -> bytes:
    """The layout spelled out one bit at a time: value i's bit j is stream bit i * bits + j, LSB first in each byte."""
    stream = np.zeros(values.size * bits, dtype=np.uint8)
    for j in range(bits):
        stream[j::bits] = (values >> np.uint64(j)) & np.uint64(1)
    return np.packbits(stream, bitorder="little").tobytes()


@pytest.mark.parametrize("bits", range(1, 33))
def test_any_width_packs_as_the_bit_stream_and_back(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 63, 64, 65, 1_001):  # short, whole and broken periods of 64 / gcd(bits, 64) values
        values = rng.integers(0, 2**bits, count, dtype=np.uint64)
        packed = pack_uints(values, bits)
        assert packed == bit_stream_reference(values, bits)
        assert np.array_equal(unpack_uints(packed, bits, count), values)


def test_only_the_low_bits_of_each_value_are_packed() -> None:
    values = np.array([0xFFFF_FFFF, 0x1234_5678], dtype=np.uint32)
    assert np.array_equal(unpack_uints(pack_uints(values, 12), 12, 2), [0xFFF, 0x678])


def test_unpacking_refuses_a_wrong_length_padding_bits_and_a_bad_width() -> None:
    packed = bytearray(pack_uints(np.array([1, 2, 3], dtype=np.uint64), 12))  # 36 bits: the last byte has 4 spare
    with pytest.raises(ValueError, match="expected 5 bytes"):
        unpack_uints(bytes(packed[:-1]), 12, 3)
    packed[-1] |= 0x10
    with pytest.raises(ValueError, match="padding bits"):
        unpack_uints(bytes(packed), 12, 3)
    for bits in (0, 33, True):
        with pytest.raises(ValueError, match="from 1 to 32"):
            pack_uints(np.zeros(2, dtype=np.uint64), bits)
    with pytest.raises(ValueError, match="must be integers"):
        pack_uints(np.array([1.7, 2.0]), 4)
