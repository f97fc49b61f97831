"""Dense bit packing of codebook indices for the wire (DESIGN 2.2, "Wire format").

Layout: values are written in order, least-significant bit first, into a little-endian
bit stream (value 0 occupies the low bits of byte 0). w=3 thus packs 8 values into
3 bytes. Ternary w=1 packs 5 trits per byte in base 3 (3**5 = 243 <= 256), value 0 as
the least-significant digit: 1.6 bits per value instead of 2.

``pack_uints``/``unpack_uints`` write any width from 1 to 32 bits in the same layout (the
codebook indices above, and SecAgg's masked values in a b-bit field). Each 64-bit
little-endian word of the stream holds the bits of the values that start in it, so a period
of 64 / gcd(bits, 64) values fills a whole number of words; packing adds each value's shifted
bits into its word (the fields do not overlap, so the sum is their OR) and carries the part
of a value that straddles into the next word; unpacking reads them back. A dozen numpy
operations on the whole vector instead of a bit matrix 8 to 32 times its size.
"""

import functools
import math

import numpy as np
import numpy.typing as npt
import torch

from fedlpp.quant.codebooks import check_bits, num_levels

_TRITS_PER_BYTE = 5
_TRIT_WEIGHTS = np.array([3**k for k in range(_TRITS_PER_BYTE)], dtype=np.int64)
_MAX_TRIT_BYTE = 3**_TRITS_PER_BYTE - 1


def storage_bits(bits: int) -> float:
    """Bits actually spent per value on the wire, ignoring padding of the last byte.

    Args:
        bits: Quantizer bit width, one of ``SUPPORTED_BITS``.

    Returns:
        ``bits`` for w >= 2; 1.6 for ternary w = 1 (5 trits per byte).
    """
    check_bits(bits)
    return 8 / _TRITS_PER_BYTE if bits == 1 else float(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Size in bytes of ``count`` packed codes.

    Args:
        count: Number of values.
        bits: Quantizer bit width, one of ``SUPPORTED_BITS``.

    Returns:
        ceil(count * bits / 8), or ceil(count / 5) for ternary w = 1.
    """
    check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if bits == 1:
        return -(-count // _TRITS_PER_BYTE)
    return -(-count * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """Pack codebook indices into a dense byte string.

    Args:
        codes: Integer tensor of any shape (flattened in row-major order), values in
            [0, num_levels(bits)).
        bits: Quantizer bit width, one of ``SUPPORTED_BITS``.

    Returns:
        ``packed_nbytes(codes.numel(), bits)`` bytes.

    Raises:
        ValueError: If ``codes`` is not an integer tensor or holds an out-of-range code.
    """
    flat = _checked_codes(codes, bits)
    if bits == 1:
        return _pack_trits(flat)
    return pack_uints(flat, bits)


def unpack_codes(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``.

    Args:
        data: Bytes produced by ``pack_codes``.
        bits: Quantizer bit width, one of ``SUPPORTED_BITS``.
        count: Number of values that were packed.

    Returns:
        uint8 tensor of shape (count,).

    Raises:
        ValueError: If ``data`` has the wrong length, sets a padding bit after the last code, or (ternary)
            holds a byte that is not 5 trits.
    """
    expected = packed_nbytes(count, bits)
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes for {count} {bits}-bit codes, got {len(data)}")
    if bits == 1:
        return torch.from_numpy(_unpack_trits(np.frombuffer(data, dtype=np.uint8), count))
    return torch.from_numpy(unpack_uints(data, bits, count).astype(np.uint8))


def _checked_codes(codes: torch.Tensor, bits: int) -> np.ndarray:
    levels = num_levels(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= levels):
        raise ValueError(f"codes for bits={bits} must lie in [0, {levels}), got range [{int(flat.min())}, {int(flat.max())}]")
    return flat.to(torch.uint8).numpy()


def _pack_trits(flat: np.ndarray) -> bytes:
    padded = np.zeros(packed_nbytes(flat.size, 1) * _TRITS_PER_BYTE, dtype=np.int64)
    padded[: flat.size] = flat
    digits = padded.reshape(-1, _TRITS_PER_BYTE)  # (nbytes, 5)
    return (digits @ _TRIT_WEIGHTS).astype(np.uint8).tobytes()


def _unpack_trits(raw: np.ndarray, count: int) -> np.ndarray:
    if raw.size and int(raw.max()) > _MAX_TRIT_BYTE:
        raise ValueError(f"ternary byte values must be <= {_MAX_TRIT_BYTE}, got {int(raw.max())}")
    digits = (raw.astype(np.int64)[:, None] // _TRIT_WEIGHTS) % 3  # (nbytes, 5)
    return digits.reshape(-1)[:count].astype(np.uint8)


MAX_UINT_BITS = 32
_WHOLE_BYTES = {8: "<u1", 16: "<u2", 32: "<u4"}  # the same layout, read and written as little-endian integers


def pack_uints(values: npt.NDArray[np.unsignedinteger] | npt.NDArray[np.signedinteger], bits: int) -> bytes:
    """The low ``bits`` bits (1..32) of each value, packed least-significant bit first: ceil(n bits / 8) bytes."""
    if values.dtype.kind not in "ui":
        raise ValueError(f"values must be integers, got {values.dtype}")
    layout = _layout_of(bits)
    count = values.size
    if bits in _WHOLE_BYTES:
        return (values.reshape(-1).astype(np.uint64) & np.uint64((1 << bits) - 1)).astype(_WHOLE_BYTES[bits]).tobytes()
    groups = -(-count // layout.period)
    padded = np.zeros(groups * layout.period, dtype=np.uint64)
    padded[:count] = values.reshape(-1)
    padded &= np.uint64((1 << bits) - 1)
    fields = padded.reshape(groups, layout.period)
    words = np.add.reduceat(fields << layout.shift, layout.first_of_word, axis=1)  # disjoint fields: sum = OR
    if layout.straddles.size:
        words[:, layout.word[layout.straddles] + 1] += fields[:, layout.straddles] >> layout.carry_shift
    return words.astype("<u8").tobytes()[: -(-count * bits // 8)]


def unpack_uints(data: bytes | memoryview, bits: int, count: int) -> npt.NDArray[np.uint64]:
    """Inverse of ``pack_uints``: ``count`` values (uint64). ValueError when ``data`` is not exactly
    ceil(count bits / 8) bytes or sets a padding bit after the last value."""
    layout = _layout_of(bits)
    data = memoryview(data).cast("B")
    expected = -(-count * bits // 8)
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes for {count} {bits}-bit values, got {len(data)}")
    used = count * bits % 8
    if used and data[-1] >> used:
        raise ValueError(f"the last byte sets padding bits after value {count - 1}")
    if bits in _WHOLE_BYTES:
        return np.frombuffer(data, dtype=_WHOLE_BYTES[bits]).astype(np.uint64)
    groups = -(-count // layout.period)
    raw = np.zeros(groups * layout.words * 8, dtype=np.uint8)
    raw[:expected] = np.frombuffer(data, dtype=np.uint8)
    words = raw.view("<u8").reshape(groups, layout.words)
    fields = words[:, layout.word] >> layout.shift
    if layout.straddles.size:
        fields[:, layout.straddles] |= words[:, layout.word[layout.straddles] + 1] << layout.carry_shift
    fields &= np.uint64((1 << bits) - 1)
    return fields.reshape(-1)[:count]


class _Layout:
    """Where each value of a period starts: its word, its shift in it, and which values run into the next word."""

    def __init__(self, bits: int) -> None:
        self.period = 64 // math.gcd(bits, 64)  # values per whole number of words
        self.words = self.period * bits // 64
        start = np.arange(self.period) * bits
        self.word = start >> 6
        self.shift = (start & 63).astype(np.uint64)
        self.first_of_word = np.searchsorted(self.word, np.arange(self.words))  # every word has a value starting in it
        self.straddles = np.nonzero((start & 63) + bits > 64)[0]
        self.carry_shift = np.uint64(64) - self.shift[self.straddles]


def _layout_of(bits: int) -> _Layout:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_UINT_BITS:
        raise ValueError(f"bits must be an integer from 1 to {MAX_UINT_BITS}, got {bits!r}")
    return _layout(bits)


@functools.lru_cache(maxsize=MAX_UINT_BITS)
def _layout(bits: int) -> _Layout:
    return _Layout(bits)
