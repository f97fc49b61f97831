"""The uplink quantizer: unbiased b-bit stochastic rounding of a client's update, one scale per block.

The update (one float vector in wire order) is cut into blocks of ``block_size`` values;
each block is divided by its scale s (its max |x|, rounded up to a float16, so every value
lands in [-1, 1]) and rounded at random to one of 2^b evenly spaced levels
l_j = -1 + 2j / (2^b - 1): up with probability equal to its distance from the level
below, in units of the gap. So E[Q(x)] = x exactly (Alistarh et al. 2017, QSGD; Suresh et
al. 2017): the server's mean of quantized updates is the clients' mean plus zero-mean
noise of variance at most gap^2 / 4 = (s / (2^b - 1))^2 per value and client (gap = 2 s / (2^b - 1)).

Unlike the broadcast quantizer (NF-w, nearest level, deterministic: a client must not
average broadcasts back to θ) this one is random on purpose; its codes are bit-packed by
the same ``packing`` module, and a block's scale travels as float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedlpp.quant.packing import pack_codes, packed_nbytes, unpack_codes
from fedlpp.quant.quantizer import ceil_to_float16, check_representable

UPLINK_BITS: tuple[int, ...] = (2, 4, 8)  # the quantizer's widths (config.UPLINK_CHOICES adds 32: float32, no rounding)


@dataclass(frozen=True)
class UplinkSpec:
    """How a client's update is quantized before it is sent."""

    bits: int  # b: bits per value, one of UPLINK_BITS
    block_size: int = 64  # values per float16 scale

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in UPLINK_BITS:
            raise ValueError(f"uplink bits must be one of {UPLINK_BITS}, got {self.bits!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"uplink block_size must be an int >= 1, got {self.block_size!r}")

    @property
    def intervals(self) -> int:
        """2^b - 1: the gaps between the 2^b levels."""
        return 2**self.bits - 1

    def num_blocks(self, count: int) -> int:
        return -(-count // self.block_size)

    def nbytes(self, count: int) -> int:
        """Bytes of codes and scales for ``count`` values."""
        return packed_nbytes(count, self.bits) + 2 * self.num_blocks(count)

    def as_meta(self) -> dict[str, int]:
        return {"bits": self.bits, "block_size": self.block_size}


def stochastic_quantize(values: torch.Tensor, spec: UplinkSpec, draws: np.ndarray) -> tuple[bytes, torch.Tensor]:
    """Packed codes and float16 block scales of a flat float vector.

    Args:
        values: The update, shape (n,); finite, within float16 range.
        spec: Bits and block size.
        draws: n uniform draws in [0, 1) that decide each rounding.

    Returns:
        (codes, scales): ``packed_nbytes(n, bits)`` bytes, and float16 of shape (num_blocks,).
    """
    x = values.detach().to(dtype=torch.float32, device="cpu").reshape(-1)
    check_representable(x)
    if draws.shape != (x.numel(),):
        raise ValueError(f"expected {x.numel()} uniform draws, got shape {draws.shape}")
    blocks = _blocks(x, spec)
    scales = ceil_to_float16(blocks.abs().amax(dim=1))
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales).to(torch.float64)
    position = (blocks.to(torch.float64) / divisor[:, None] + 1.0) * (spec.intervals / 2.0)  # in [0, 2^b - 1]
    position = position.reshape(-1)[: x.numel()].clamp_(0, spec.intervals)
    below = torch.floor(position)
    up = torch.from_numpy(draws) < (position - below)
    codes = (below + up.to(torch.float64)).clamp_(max=spec.intervals).to(torch.uint8)
    return pack_codes(codes, spec.bits), scales


def dequantize_stochastic(codes: bytes, scales: torch.Tensor, spec: UplinkSpec, count: int) -> torch.Tensor:
    """The float32 vector a quantized update stands for: (-1 + 2 code / (2^b - 1)) * its block's scale.

    Raises:
        ValueError: The codes or scales do not fit ``count`` values (wrong length, dtype or shape, padding
            bits set), or a scale is negative or not finite.
    """
    blocks = spec.num_blocks(count)
    if scales.dtype != torch.float16 or tuple(scales.shape) != (blocks,):
        raise ValueError(f"scales must be float16 of shape ({blocks},), got {scales.dtype} {tuple(scales.shape)}")
    wide = scales.to(torch.float32)
    if blocks and not (bool(torch.isfinite(wide).all()) and float(wide.min()) >= 0):
        raise ValueError("scales must be finite and >= 0")
    levels = unpack_codes(codes, spec.bits, count).to(torch.float32) * (2.0 / spec.intervals) - 1.0
    padded = torch.zeros(blocks * spec.block_size)
    padded[:count] = levels
    return (padded.reshape(blocks, spec.block_size) * wide[:, None]).reshape(-1)[:count]


def _blocks(x: torch.Tensor, spec: UplinkSpec) -> torch.Tensor:
    """(num_blocks, block_size), zero-padded: padding never changes a block's max |x|."""
    blocks = spec.num_blocks(x.numel())
    padded = torch.zeros(blocks * spec.block_size)
    padded[: x.numel()] = x
    return padded.reshape(blocks, spec.block_size)
