"""NF-w codebooks against the values written down in DESIGN 2.2 and bitsandbytes' NF4."""

import pytest
import torch

from fedlpp.quant import SUPPORTED_BITS, nf_codebook

# DESIGN 2.2, rounded to 4 decimals there.
DESIGN_LEVELS = {
    2: [-1.0, 0.0, 0.3379, 1.0],
    3: [-1.0, -0.4786, -0.2171, 0.0, 0.1609, 0.3379, 0.5626, 1.0],
}

# bitsandbytes `create_normal_map()` (QLoRA's NF4) as float32 values. Note -0.18477343:
# some write-ups print -0.1848135 for this level, which is not what the code produces.
NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


@pytest.mark.parametrize("bits", sorted(DESIGN_LEVELS))
def test_codebook_matches_design_values(bits: int) -> None:
    expected = torch.tensor(DESIGN_LEVELS[bits])
    torch.testing.assert_close(nf_codebook(bits), expected, atol=1e-4, rtol=0)


def test_nf4_is_qlora_table() -> None:
    torch.testing.assert_close(nf_codebook(4), torch.tensor(NF4), atol=1e-7, rtol=0)


def test_one_bit_is_ternary() -> None:
    assert nf_codebook(1).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codebook_shape_order_and_anchors(bits: int) -> None:
    levels = nf_codebook(bits)
    assert levels.dtype == torch.float32
    assert levels.numel() == (3 if bits == 1 else 2**bits)
    assert bool((levels[1:] > levels[:-1]).all()), "levels must be strictly ascending"
    assert levels[0].item() == -1.0 and levels[-1].item() == 1.0
    assert (levels == 0).sum().item() == 1


def test_codebook_is_a_fresh_copy() -> None:
    nf_codebook(2)[0] = 123.0
    assert nf_codebook(2)[0].item() == -1.0


@pytest.mark.parametrize("bits", [0, 5, 16, -1, True])
def test_unsupported_bits_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 8\)"):
        nf_codebook(bits)
