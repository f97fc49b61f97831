"""Normal-quantile (NF-w) codebooks for the FedLPP broadcast quantizer (DESIGN 2.2)."""

from functools import cache

import torch
from scipy.stats import norm

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)

# QLoRA's offset (Dettmers et al. 2023, bitsandbytes `create_normal_map`): the outermost
# quantile used, chosen so that +-1 are the extreme levels after normalising by the max.
_NF_OFFSET = 0.9677083


def check_bits(bits: int) -> None:
    """Reject a bit width that has no codebook.

    Args:
        bits: Requested bits per value.

    Raises:
        ValueError: If ``bits`` is not one of ``SUPPORTED_BITS``.
    """
    # bool is an int subclass; `True` silently meaning 1 bit would hide a config mistake.
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def num_levels(bits: int) -> int:
    """Number of codebook levels for a bit width: 3 for ternary w=1, else 2**w.

    Args:
        bits: Bits per value, one of ``SUPPORTED_BITS``.

    Returns:
        How many distinct codes a value can take.
    """
    check_bits(bits)
    return 3 if bits == 1 else 2**bits


def nf_codebook(bits: int) -> torch.Tensor:
    """The sorted NF-w codebook in [-1, 1], containing -1, 0 and 1 exactly.

    w=1 is ternary {-1, 0, 1}; w>=2 follows QLoRA's asymmetric normal map with 2**w
    levels (w=4 is bitwise equal to bitsandbytes' NF4 table).

    Args:
        bits: Bits per value, one of ``SUPPORTED_BITS``.

    Returns:
        A fresh float32 tensor of shape (num_levels(bits),), ascending.

    Raises:
        ValueError: If ``bits`` is unsupported.
    """
    check_bits(bits)
    # The cache holds plain floats so callers can never mutate the shared codebook.
    return torch.tensor(_levels(bits), dtype=torch.float32)


@cache
def _levels(bits: int) -> tuple[float, ...]:
    if bits == 1:
        return (-1.0, 0.0, 1.0)
    half = 2 ** (bits - 1)
    # float32 linspace, float64 ppf, float32 normalisation: the exact recipe of
    # bitsandbytes' create_normal_map, so w=4 reproduces NF4 to the last bit.
    positive = norm.ppf(torch.linspace(_NF_OFFSET, 0.5, half + 1)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(_NF_OFFSET, 0.5, half)[:-1].numpy())
    values = torch.tensor([*positive, 0.0, *negative], dtype=torch.float32)
    values = values.sort().values
    values = values / values.max()
    return tuple(float(v) for v in values)
