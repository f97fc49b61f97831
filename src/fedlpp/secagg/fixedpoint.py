"""Fixed-point encoding of client vectors into Z_{2^b} and decoding of their sum.

A value x with |x| <= r becomes round(x * scale) mod 2^32; the protocol sums in Z_{2^32}
and the field Z_{2^b} (``SecAggParams.modulus_bits``, 32 by default) is its low b bits, which
is all a b-bit masked value carries. ``SecAggParams`` guarantees max_clients * ceil(r * scale)
< 2^(b-1), so the sum of up to max_clients encodings, read as a signed b-bit integer, is
exactly the integer sum (DESIGN 3.3: headroom for n summands) — unless the encoder bounds
the sum itself (``sum_may_wrap``), when a wrapped sum is the encoder's rare, bounded failure.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedlpp.secagg.errors import SecAggRangeError
from fedlpp.secagg.params import SecAggParams

Encoded = npt.NDArray[np.unsignedinteger]  # uint32, or uint16 as the protocol's words (``SecAggParams.word``)


def check_range(values: npt.NDArray[np.floating], params: SecAggParams, client: int) -> None:
    """Refuse a vector with any |x| > r (or NaN / inf): never clip silently.

    Args:
        values: The client's vector, shape (d,).
        params: Protocol parameters (``clip_range``).
        client: The client's id, named in the error.

    Raises:
        SecAggRangeError: Naming the client, the first bad index and its value.
    """
    if in_range(values, params):
        return
    # The index of the first offender is only searched on failure.
    r = params.clip_range
    index = int(np.flatnonzero(~(np.abs(values) <= r))[0])
    raise SecAggRangeError(client, index, float(values[index]), r)


def in_range(values: npt.NDArray[np.floating], params: SecAggParams) -> bool:
    """Whether every |x| <= clip_range; NaN is not in range (min/max are NaN if any value is,
    and NaN fails both comparisons). Two passes, no temporary array."""
    r = params.clip_range
    return values.size == 0 or bool(values.min() >= -r and values.max() <= r)


def encode(values: npt.ArrayLike, params: SecAggParams, client: int) -> Encoded:
    """Encode a float vector as round(x * scale) mod 2^32.

    Args:
        values: The client's vector, shape (d,); float32 or float64.
        params: Protocol parameters.
        client: The client's id (for the range error).

    Returns:
        uint32 array, shape (d,).

    Raises:
        SecAggRangeError: If a value is outside [-r, r].
    """
    x = np.asarray(values).reshape(-1)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    check_range(x, params, client)
    scaled = np.multiply(x, params.scale, dtype=np.float64)  # x * scale in float64, whatever x's dtype
    np.rint(scaled, out=scaled)
    # Headroom gives |round(x * scale)| <= ceil(r * scale) < 2^31: exact in int32, whose
    # bits read as uint32 are the value mod 2^32.
    return scaled.astype(np.int32).view(np.uint32)


def field_elements(integers: npt.NDArray[np.int64], weight: int, params: SecAggParams) -> Encoded:
    """Integers already in the field's units (an encoder that bounds the sum itself, scale 1) and a last
    coordinate ``weight``, as the protocol's input: each in the protocol's words (``params.word``), whose low b bits
    are its residue mod 2^b.

    Returns:
        uint16 or uint32 array, shape (d + 1,).
    """
    if integers.dtype.kind not in "iu":
        raise TypeError(f"field elements are integers, not {integers.dtype}")
    out = np.empty(integers.size + 1, dtype=params.word)
    np.copyto(out[:-1], integers, casting="unsafe")  # to a narrower unsigned type: the low bits, the value mod 2^16/2^32
    out[-1] = weight
    return out


def to_field(values: npt.ArrayLike, params: SecAggParams, client: int) -> Encoded:
    """A client's input in the protocol's words (a fresh array): where the encoder bounds the sum itself
    (``params.sum_may_wrap``), an unsigned integer array is taken as field elements already (``field_elements``);
    anything else is fixed-point encoded (``encode``, with its range check).

    Raises:
        ValueError: Field elements narrower than the protocol's words (they would not carry Z_2^b's residues).
    """
    if params.sum_may_wrap and isinstance(values, np.ndarray) and values.dtype.kind == "u":
        if values.dtype.itemsize < params.word.itemsize:
            raise ValueError(f"client {client}: {values.dtype} field elements cannot carry Z_2^{params.modulus_bits}")
        return values.reshape(-1).astype(params.word)
    return encode(values, params, client).astype(params.word, copy=False)


def decode_sum(total: Encoded, params: SecAggParams) -> npt.NDArray[np.float64]:
    """Decode a sum of encodings: its low b bits read as a signed b-bit integer, divided by the scale.

    Args:
        total: Sum, in the protocol's words, of at most ``max_clients`` encodings, shape (d,).
        params: Protocol parameters.

    Returns:
        float64 array, shape (d,): the sum of the rounded inputs, exactly.
    """
    words = np.asarray(total, dtype=params.word)
    width = 8 * params.word.itemsize
    signed = words.view(np.dtype(f"<i{params.word.itemsize}"))
    if params.modulus_bits < width:
        shift = width - params.modulus_bits  # the low b bits moved to the top: their sign is the signed word's
        signed = np.left_shift(words, shift, dtype=params.word).view(signed.dtype) >> shift
    return np.divide(signed, params.scale, dtype=np.float64)


def append_weight(weighted: npt.ArrayLike, weight: int, params: SecAggParams) -> npt.NDArray[np.float64]:
    """Append an integer weight as one more coordinate that encodes to exactly ``weight``.

    For a weighted mean the caller sends n_k * delta_k (already scaled into [-r, r]) and
    the weight n_k; the protocol sums both, so the server learns sum(n_k * delta_k) and
    sum(n_k) and nothing per client. The weight is stored as weight / scale, whose
    encoding round(weight / scale * scale) is the integer itself.

    Args:
        weighted: The client's weighted vector, shape (d,).
        weight: The client's non-negative integer weight (e.g. its number of examples).
        params: Protocol parameters; weight must be <= clip_range * scale.

    Returns:
        float64 array, shape (d + 1,).
    """
    x = np.asarray(weighted, dtype=np.float64).reshape(-1)
    return np.concatenate([x, [weight_coordinate(weight, params)]])


def weight_coordinate(weight: int, params: SecAggParams) -> float:
    """The coordinate ``append_weight`` appends for ``weight``: weight / scale, which encodes to ``weight``.

    Raises:
        ValueError: If the weight is negative or beyond clip_range * scale.
    """
    if weight < 0 or weight > params.clip_range * params.scale:
        raise ValueError(f"weight {weight} must be in [0, clip_range * scale = {params.clip_range * params.scale}]")
    return weight / params.scale


def split_weight(total: npt.NDArray[np.float64], params: SecAggParams) -> tuple[npt.NDArray[np.float64], int]:
    """Split a decoded sum made with ``append_weight`` into (sum of vectors, total weight).

    Args:
        total: Output of ``decode_sum`` (or ``AggregateResult.values``), shape (d + 1,).
        params: Protocol parameters.

    Returns:
        The weighted sum, shape (d,), and the exact integer sum of the weights.
    """
    return total[:-1], int(np.rint(total[-1] * params.scale))
