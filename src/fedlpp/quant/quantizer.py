"""The broadcast quantizer Q_w of FedLPP (DESIGN 2.2; arXiv 2406.10976).

Each adapter tensor is cut into groups (blocks, rows or the whole tensor), scaled by the
group's max |x| and snapped to the nearest NF-w level. Only packed codes and float16
scales leave the server, never the full-precision values.
"""

from dataclasses import dataclass

import torch

from fedlpp.quant.codebooks import check_bits, nf_codebook
from fedlpp.quant.packing import pack_codes, packed_nbytes, unpack_codes

GRANULARITIES: tuple[str, ...] = ("block", "row", "tensor")

_FLOAT16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class QuantSpec:
    """How an adapter tensor is quantized for the broadcast.

    Attributes:
        bits: Bits per value; 1 means ternary. Fewer bits leak less of the adapter.
        granularity: One scale per "block", per "row" or per "tensor"; coarser scales
            make the client's proxy worse, i.e. this is the model-privacy knob.
        block_size: Values per block when granularity is "block" (last block may be
            short); ignored otherwise.
    """

    bits: int
    granularity: str = "block"
    block_size: int = 64

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")


# eq=False: the generated __eq__ would compare tensors elementwise and raise; compare
# `codes` and `scales` explicitly instead.
@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """What a client receives for one adapter tensor.

    Attributes:
        shape: Shape of the original tensor.
        spec: The quantizer settings used.
        codes: Packed codebook indices (see ``packing``), one per value in row-major order.
        scales: float16 tensor of shape (num_groups,), one scale per group.
    """

    shape: tuple[int, ...]
    spec: QuantSpec
    codes: bytes
    scales: torch.Tensor

    def __post_init__(self) -> None:
        # Messages are decoded from the wire, so reject inconsistent parts early.
        count = _numel(self.shape)
        groups, _ = _group_layout(self.shape, self.spec)
        if self.scales.dtype != torch.float16 or self.scales.shape != (groups,):
            raise ValueError(f"scales must be float16 of shape ({groups},), got {self.scales.dtype} {tuple(self.scales.shape)}")
        if len(self.codes) != packed_nbytes(count, self.spec.bits):
            raise ValueError(f"codes must be {packed_nbytes(count, self.spec.bits)} bytes, got {len(self.codes)}")

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: packed codes plus 2 bytes per float16 scale."""
        return len(self.codes) + 2 * self.scales.numel()


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize a tensor to packed NF-w codes and float16 group scales.

    Rounding is deterministic (nearest level): stochastic rounding would let a client
    average several broadcasts back towards the full-precision adapter (DESIGN 2.2).

    Args:
        x: Floating-point tensor of any shape; computed in float32.
        spec: Quantizer settings.

    Returns:
        The quantized tensor; all-zero groups get scale 0 and dequantize to exact zeros.

    Raises:
        ValueError: If ``x`` holds non-finite values or magnitudes beyond float16 range.
    """
    x32 = x.detach().to(dtype=torch.float32, device="cpu")
    check_representable(x32)
    groups = _to_groups(x32, spec)  # (num_groups, group_len), zero-padded for blocks
    scales = ceil_to_float16(_group_absmax(groups))
    # A zero scale only occurs for an all-zero group; divide by 1 there so 0/0 never happens.
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    normalised = groups / divisor[:, None]  # in [-1, 1] because every scale >= max |x|
    codes = _nearest_level(normalised.reshape(-1)[: x32.numel()], spec.bits)
    return QuantizedTensor(tuple(x.shape), spec, pack_codes(codes, spec.bits), scales)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Rebuild the tensor a client sees: levels[code] * scale.

    Args:
        q: A quantized tensor.

    Returns:
        float32 tensor of shape ``q.shape``.
    """
    count = _numel(q.shape)
    groups, group_len = _group_layout(q.shape, q.spec)
    codes = unpack_codes(q.codes, q.spec.bits, count).long()
    values = torch.zeros(groups * group_len)
    values[:count] = nf_codebook(q.spec.bits)[codes]
    scaled = values.reshape(groups, group_len) * q.scales.float()[:, None]
    return scaled.reshape(-1)[:count].reshape(q.shape)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and immediately dequantize: Q_w(x) as a float32 tensor of x's shape."""
    return dequantize(quantize(x, spec))


def max_abs_error_bound(q: QuantizedTensor) -> torch.Tensor:
    """Worst-case |x - Q(x)| per group: half the widest codebook gap times the scale.

    Args:
        q: A quantized tensor.

    Returns:
        float32 tensor of shape (num_groups,).
    """
    levels = nf_codebook(q.spec.bits)
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    return half_gap * q.scales.float()


def num_scales(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """How many float16 scales ``quantize`` produces for a tensor of this shape."""
    return _group_layout(shape, spec)[0]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _group_layout(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, int]:
    """(num_groups, group_len) for a shape; blocks are padded up to a full block."""
    count = _numel(shape)
    if spec.granularity == "block":
        return -(-count // spec.block_size), spec.block_size
    if spec.granularity == "row":
        # 0-D and 1-D tensors are a single row.
        rows = shape[0] if len(shape) >= 2 else 1
        return rows, (count // rows if rows else 0)
    return 1, count


def _to_groups(x32: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    groups, group_len = _group_layout(tuple(x32.shape), spec)
    # Zero padding never changes a block's max |x|; padded codes are dropped before packing.
    padded = torch.zeros(groups * group_len)
    padded[: x32.numel()] = x32.reshape(-1)
    return padded.reshape(groups, group_len)


def check_representable(x32: torch.Tensor) -> None:
    if not bool(torch.isfinite(x32).all()):
        raise ValueError("cannot quantize a tensor with non-finite values")
    if x32.numel() and float(x32.abs().max()) > _FLOAT16_MAX:
        raise ValueError(f"cannot quantize magnitudes above the float16 maximum {_FLOAT16_MAX}")


def _group_absmax(groups: torch.Tensor) -> torch.Tensor:
    if groups.shape[1] == 0:
        return torch.zeros(groups.shape[0])
    return groups.abs().amax(dim=1)


def ceil_to_float16(amax: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= amax, so that |x| / scale <= 1 holds for every value."""
    scales = amax.to(torch.float16)
    rounded_down = scales.float() < amax
    # For non-negative finite float16, the next representable value is bit pattern + 1.
    bumped = (scales.view(torch.int16) + 1).view(torch.float16)
    return torch.where(rounded_down, bumped, scales)


def _nearest_level(normalised: torch.Tensor, bits: int) -> torch.Tensor:
    levels = nf_codebook(bits)
    midpoints = (levels[1:] + levels[:-1]) / 2
    # bucketize returns i with midpoints[i-1] < v <= midpoints[i]: the nearest level,
    # ties going to the lower one, deterministically.
    return torch.bucketize(normalised, midpoints).to(torch.uint8)
