"""Dense bit packing of codebook indices for the wire (DESIGN 2.2, "Wire format").

Layout: values are written in order, least-significant bit first, into a little-endian
bit stream (value 0 occupies the low bits of byte 0). w=3 thus packs 8 values into
3 bytes. Ternary w=1 packs 5 trits per byte in base 3 (3**5 = 243 <= 256), value 0 as
the least-significant digit: 1.6 bits per value instead of 2.
"""

import numpy as np
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
    # (n, 8) bit matrix, LSB first; keep the low `bits` columns and re-pack the stream.
    bit_matrix = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``.

    Args:
        data: Bytes produced by ``pack_codes``.
        bits: Quantizer bit width, one of ``SUPPORTED_BITS``.
        count: Number of values that were packed.

    Returns:
        uint8 tensor of shape (count,).

    Raises:
        ValueError: If ``data`` has the wrong length or decodes to an invalid code.
    """
    expected = packed_nbytes(count, bits)
    if len(data) != expected:
        raise ValueError(f"expected {expected} bytes for {count} {bits}-bit codes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 1:
        return torch.from_numpy(_unpack_trits(raw, count))
    bit_stream = np.unpackbits(raw, bitorder="little")[: count * bits]  # (count * bits,)
    bit_matrix = np.zeros((count, 8), dtype=np.uint8)
    bit_matrix[:, :bits] = bit_stream.reshape(count, bits)
    return torch.from_numpy(np.packbits(bit_matrix, axis=1, bitorder="little").reshape(count))


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
