"""The broadcast quantizer: error bound, wire size, exactness on the grid, validation."""

from fractions import Fraction
from math import ceil

import pytest
import torch

from fedlpp.quant import (
    GRANULARITIES,
    SUPPORTED_BITS,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    max_abs_error_bound,
    nf_codebook,
    packed_nbytes,
    quantize,
    storage_bits,
    unpack_codes,
)

SHAPES = [(8, 576), (576, 8), (7, 13)]  # LoRA A (r x d), B (d x r) and an awkward size
SPECS = [QuantSpec(w, g, 64) for w in SUPPORTED_BITS for g in GRANULARITIES] + [
    QuantSpec(w, "block", 5)
    for w in SUPPORTED_BITS  # blocks that straddle rows
]


def _sample(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=gen)
    if kind == "normal":
        return normal
    # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3), heavy tails.
    chi2 = torch.randn((3, *shape), generator=gen).pow(2).sum(dim=0)
    return normal / (chi2 / 3).sqrt()


def _group_index(shape: tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """Which scale each flattened value uses, written independently of the quantizer."""
    n = torch.Size(shape).numel()
    position = torch.arange(n)
    if spec.granularity == "block":
        return position // spec.block_size
    if spec.granularity == "row":
        return position // (n // shape[0]) if len(shape) >= 2 else torch.zeros(n, dtype=torch.long)
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_error_within_half_largest_gap(spec: QuantSpec, shape: tuple[int, ...], kind: str) -> None:
    x = _sample(shape, kind, seed=sum(shape) + spec.bits)
    q = quantize(x, spec)
    err = (dequantize(q) - x).abs().reshape(-1)
    bound = max_abs_error_bound(q)[_group_index(shape, spec)]
    # 1e-6 relative slack covers float32 rounding of x / scale and level * scale.
    assert bool((err <= bound * (1 + 1e-6)).all())
    # The scale is the smallest float16 >= max |x| of its group (rounded up, never down).
    amax = torch.zeros(q.scales.numel()).scatter_reduce(0, _group_index(shape, spec), x.abs().reshape(-1), reduce="amax")
    previous = (q.scales.view(torch.int16) - 1).view(torch.float16).float()
    assert bool((q.scales.float() >= amax).all())
    assert bool((previous < amax).all())


def test_max_abs_error_bound_by_hand() -> None:
    # NF2 = {-1, 0, 0.3379, 1}: widest gap is [-1, 0], so the bound is 0.5 * scale.
    q = quantize(torch.tensor([2.0, -1.0, 0.5, 0.25]), QuantSpec(2, "block", 2))
    assert q.scales.tolist() == [2.0, 0.5]
    assert max_abs_error_bound(q).tolist() == [1.0, 0.25]


def test_hand_computed_example() -> None:
    # x = [0.9, -0.2, 0.1, 0.5], w=2, one scale.
    # float16(0.9) rounds down to 1843/2048 = 0.89990234375 < 0.9, so the scale is
    # bumped to 1844/2048 = 0.900390625. Normalised: [0.99957, -0.22213, 0.11106, 0.55531].
    # Midpoints of {-1, 0, 0.33792, 1} are {-0.5, 0.16896, 0.66896}, so the codes are
    # [3, 1, 1, 2] -> levels [1, 0, 0, 0.33791524] -> values [0.900390625, 0, 0, 0.3042557].
    # Packed 2-bit LSB first: 3 + (1 << 2) + (1 << 4) + (2 << 6) = 151 = 0x97.
    q = quantize(torch.tensor([0.9, -0.2, 0.1, 0.5]), QuantSpec(2, "tensor"))
    assert q.scales.tolist() == [0.900390625]
    assert q.codes == b"\x97"
    assert unpack_codes(q.codes, 2, 4).tolist() == [3, 1, 1, 2]
    expected = torch.tensor([0.900390625, 0.0, 0.0, 0.3042557])
    torch.testing.assert_close(dequantize(q), expected, atol=1e-6, rtol=0)
    assert q.nbytes == 3


@pytest.mark.parametrize(
    ("shape", "spec", "nbytes"),
    [
        # 8 x 576 = 4608 values, 72 blocks of 64 -> 144 scale bytes.
        ((8, 576), QuantSpec(1), 922 + 144),  # ceil(4608 / 5) = 922
        ((8, 576), QuantSpec(2), 1152 + 144),  # 2.25 bits per value, DESIGN 2.2
        ((8, 576), QuantSpec(3), 1728 + 144),
        ((8, 576), QuantSpec(4), 2304 + 144),
        ((8, 576), QuantSpec(8), 4608 + 144),
        ((8, 576), QuantSpec(2, "row"), 1152 + 16),
        ((576, 8), QuantSpec(2, "row"), 1152 + 1152),
        ((8, 576), QuantSpec(2, "tensor"), 1152 + 2),
        # 7 x 13 = 91 values: 3-bit codes ceil(273 / 8) = 35 bytes; 2 blocks of 64.
        ((7, 13), QuantSpec(3), 35 + 4),
        ((7, 13), QuantSpec(3, "row"), 35 + 14),
        ((7, 13), QuantSpec(3, "tensor"), 35 + 2),
        ((7, 13), QuantSpec(1, "block", 10), 19 + 20),  # ceil(91 / 5) = 19
    ],
)
def test_wire_size_by_hand(shape: tuple[int, ...], spec: QuantSpec, nbytes: int) -> None:
    assert quantize(_sample(shape, "normal", 0), spec).nbytes == nbytes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 4800, 4801])
def test_block_size_formula(bits: int, n: int) -> None:
    spec = QuantSpec(bits, "block", 64)
    per_value = Fraction(storage_bits(bits)).limit_denominator(10)
    expected = ceil(n * per_value / 8) + 2 * ceil(n / 64)
    assert quantize(_sample((n,), "normal", n), spec).nbytes == expected
    if n == 4800:  # a multiple of 5 and of 64, so there is no padding at all
        assert Fraction(expected * 8, n) == per_value + Fraction(16, 64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_values_on_the_grid_round_trip_exactly(spec: QuantSpec, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(7)
    levels = nf_codebook(spec.bits)
    groups = _group_index(shape, spec)
    n = groups.numel()
    codes = torch.randint(0, levels.numel(), (n,), generator=gen)
    # Each group's first value sits on level +-1, so the group's max |x| is its scale.
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = groups[1:] != groups[:-1]
    codes[first] = torch.where(torch.rand(n, generator=gen) < 0.5, 0, levels.numel() - 1)[first]
    scales = (torch.rand(int(groups.max()) + 1, generator=gen) * 4 + 0.01).half().float()
    x = (levels[codes] * scales[groups]).reshape(shape)
    q = quantize(x, spec)
    assert torch.equal(unpack_codes(q.codes, spec.bits, n).long(), codes)
    assert torch.equal(dequantize(q), x)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_zeros_round_trip_to_exact_zeros(spec: QuantSpec) -> None:
    # FedLPP round 0: B = 0, so the broadcast Q(B) must be exactly 0 (DESIGN 2.2).
    q = quantize(torch.zeros(576, 8), spec)
    assert bool((q.scales == 0).all())
    # The codes themselves point at level 0, not at an arbitrary level times scale 0.
    zero_code = int((nf_codebook(spec.bits) == 0).nonzero())
    assert bool((unpack_codes(q.codes, spec.bits, 576 * 8) == zero_code).all())
    out = dequantize(q)
    assert torch.equal(out, torch.zeros(576, 8))


def test_zero_block_inside_nonzero_tensor_is_exact() -> None:
    x = _sample((4, 64), "normal", 3)
    x[1] = 0.0  # exactly the second block of 64
    out = fake_quantize(x, QuantSpec(2, "block", 64))
    assert torch.equal(out[1], torch.zeros(64))
    assert bool(out[0].abs().sum() > 0)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_deterministic(spec: QuantSpec) -> None:
    x = _sample((8, 576), "heavy", 11)
    first, second = quantize(x, spec), quantize(x.clone(), spec)
    assert first.codes == second.codes
    assert torch.equal(first.scales, second.scales)


def test_coarser_granularity_gives_larger_error() -> None:
    # Sanity for the privacy knob (DESIGN 2.2): fewer scales, worse proxy.
    x = _sample((8, 576), "heavy", 5)
    errors = {g: (fake_quantize(x, QuantSpec(2, g, 64)) - x).abs().mean().item() for g in GRANULARITIES}
    assert errors["tensor"] > errors["row"] > errors["block"]


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4), (0, 4), (0,)])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_shapes_and_dtypes(shape: tuple[int, ...], granularity: str) -> None:
    x = _sample(shape, "normal", 2).to(torch.float64)
    spec = QuantSpec(3, granularity, 4)
    q = quantize(x, spec)
    out = dequantize(q)
    assert q.shape == shape and out.shape == x.shape and out.dtype == torch.float32
    expected_scales = {"block": -(-x.numel() // 4), "row": shape[0] if len(shape) >= 2 else 1, "tensor": 1}[granularity]
    assert q.scales.numel() == expected_scales
    # NF3's widest half gap is below 0.5; the appended 0 keeps max() defined when x is empty.
    amax = torch.cat([x.abs().reshape(-1), torch.zeros(1, dtype=x.dtype)]).max()
    assert bool(((out - x).abs() <= 0.5 * amax + 1e-3).all())


def test_one_dimensional_row_is_one_scale() -> None:
    q = quantize(torch.tensor([1.0, -4.0, 2.0]), QuantSpec(2, "row"))
    assert q.scales.tolist() == [4.0]


def test_bfloat16_and_grad_inputs() -> None:
    x = _sample((8, 16), "normal", 4).requires_grad_(True)
    expected = fake_quantize(x.detach(), QuantSpec(4))
    assert torch.equal(fake_quantize(x, QuantSpec(4)), expected)
    y = x.detach().to(torch.bfloat16)
    assert torch.equal(fake_quantize(y, QuantSpec(4)), fake_quantize(y.float(), QuantSpec(4)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 7e4, -65520.0])
def test_unrepresentable_values_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite|float16"):
        quantize(torch.tensor([0.5, bad]), QuantSpec(2))


def test_float16_max_is_accepted() -> None:
    x = torch.tensor([65504.0, -1.0])
    assert fake_quantize(x, QuantSpec(8, "tensor"))[0].item() == 65504.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, r"bits must be one of \(1, 2, 3, 4, 8\)"),
        (
            {"bits": 2, "granularity": "column"},
            r"granularity must be one of \('block', 'row', 'tensor'\)",
        ),
        ({"bits": 2, "block_size": 0}, "block_size must be an int >= 1"),
        ({"bits": 2, "block_size": 2.5}, "block_size must be an int >= 1"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


def test_quantized_tensor_rejects_inconsistent_parts() -> None:
    spec = QuantSpec(2, "block", 4)
    good = quantize(torch.ones(10), spec)
    with pytest.raises(ValueError, match="scales"):
        QuantizedTensor((10,), spec, good.codes, good.scales.float())
    with pytest.raises(ValueError, match="scales"):
        QuantizedTensor((10,), spec, good.codes, good.scales[:2])
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor((10,), spec, good.codes + b"\x00", good.scales)
    assert len(good.codes) == packed_nbytes(10, 2)
