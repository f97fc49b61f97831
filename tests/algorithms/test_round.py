"""The algorithm layer on hand-made adapters: no model, hand-computed expectations."""

import logging

import pytest
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.algorithms.fedavg_lora import server_step, weighted_mean
from fedlpp.algorithms.layout import fingerprint, layout_of
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.models.lora import lora_a_from_seed
from fedlpp.quant import QuantSpec, fake_quantize

A, B = "layer.lora_A.weight", "layer.lora_B.weight"
Q2 = QuantSpec(bits=2, granularity="tensor")


def adapter(a_seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {**lora_a_from_seed({A: (2, 4)}, a_seed), B: torch.randn(3, 2, generator=g) * 0.1}


def spec(name: str, rule: str = "mean", lr: float = 1.0):
    return get_algorithm(name, Q2, rule, lr)


def test_weighted_mean_by_example_count():
    d1, d2 = {B: torch.full((3, 2), 1.0)}, {B: torch.full((3, 2), 4.0)}
    # (1 * 1 + 2 * 4) / 3 = 3
    assert torch.allclose(weighted_mean([d1[B], d2[B]], [1, 2]), torch.full((3, 2), 3.0))


def test_aggregating_identical_updates_is_the_identity():
    d = {A: torch.randn(2, 4), B: torch.randn(3, 2)}
    mean = {n: weighted_mean([d[n]] * 3, [5, 1, 9]) for n in d}
    assert all(torch.allclose(mean[n], d[n]) for n in d)


def test_server_rules_by_hand():
    theta, proxy, delta = {B: torch.tensor([2.0])}, {B: torch.tensor([1.0])}, {B: torch.tensor([0.5])}
    # delta rule: 2 + 0.5 * 0.5
    assert server_step(theta, proxy, delta, "delta", 0.5)[B].item() == pytest.approx(2.25)
    # mean rule: 2 + 0.5 * (1 + 0.5 - 2)
    assert server_step(theta, proxy, delta, "mean", 0.5)[B].item() == pytest.approx(1.75)


def update_bytes(delta, n=10, round_=1):
    return rnd.make_update(delta, n, round_)


def test_fedavg_round_matches_hand_computation():
    theta = adapter()
    d1 = {A: torch.ones(2, 4), B: torch.ones(3, 2)}
    d2 = {A: -torch.ones(2, 4), B: 3 * torch.ones(3, 2)}
    out = rnd.aggregate(spec("fedavg_lora"), theta, [(0, update_bytes(d1, 30)), (1, update_bytes(d2, 10))], 1)
    # weights 3/4, 1/4: A += 0.5, B += 1.5
    assert torch.allclose(out.adapter[A], theta[A] + 0.5)
    assert torch.allclose(out.adapter[B], theta[B] + 1.5)
    assert out.accepted == (0, 1) and out.rejected == {}


def test_fedlpp_mean_rule_moves_to_the_clients_mean_adapter():
    theta = adapter()
    d = {A: torch.full((2, 4), 0.01), B: torch.full((3, 2), 0.02)}
    out = rnd.aggregate(spec("fedlpp", "mean"), theta, [(0, update_bytes(d)), (1, update_bytes(d))], 1)
    expected_b = fake_quantize(theta[B], Q2) + 0.02
    assert torch.allclose(out.adapter[B], expected_b, atol=1e-6)
    delta_rule = rnd.aggregate(spec("fedlpp", "delta"), theta, [(0, update_bytes(d))], 1)
    assert torch.allclose(delta_rule.adapter[B], theta[B] + 0.02, atol=1e-6)


def test_fedlpp_broadcast_holds_only_codes_and_scales():
    theta = adapter()
    payload = rnd.make_broadcast(spec("fedlpp"), theta, a_seed=0, round_=3)
    tensors, _meta = wire.decode(payload, rnd.BROADCAST)
    assert {n: t.dtype for n, t in tensors.items()} == {"codes": torch.uint8, "scales": torch.float16}
    # tensor granularity: one scale per tensor; 2 bits per value: A (8 values) 2 bytes + B (6 values) 2 bytes
    assert tensors["scales"].numel() == 2 and tensors["codes"].numel() == 4
    start, round_ = rnd.read_broadcast(payload, {A: (2, 4), B: (3, 2)})
    assert round_ == 3
    assert torch.equal(start[B], fake_quantize(theta[B], Q2))
    assert not torch.equal(start[B], theta[B])


def test_ffa_broadcast_sends_the_seed_not_a():
    theta = adapter(a_seed=11)
    for name in ("ffa_lora", "fedlpp_ffa"):
        payload = rnd.make_broadcast(spec(name), theta, a_seed=11, round_=1)
        _tensors, meta = wire.decode(payload, rnd.BROADCAST)
        assert meta["a_seed"] == 11
        assert meta["layout"] == fingerprint(layout_of({B: (3, 2)}, [B])), "A is not in the message"
        start, _ = rnd.read_broadcast(payload, {A: (2, 4), B: (3, 2)})
        assert torch.equal(start[A], theta[A]), "the client rebuilds a bit-identical A from the seed"


def test_ffa_aggregation_keeps_a_and_expects_only_b():
    theta = adapter()
    out = rnd.aggregate(spec("ffa_lora"), theta, [(0, update_bytes({B: torch.ones(3, 2)}))], 1)
    assert torch.equal(out.adapter[A], theta[A])
    assert torch.allclose(out.adapter[B], theta[B] + 1)
    rejected = rnd.aggregate(spec("ffa_lora"), theta, [(0, update_bytes({A: torch.ones(2, 4), B: torch.ones(3, 2)}))], 1)
    assert "tensor layout" in rejected.rejected[0]


@pytest.mark.parametrize(
    "delta, n, round_, reason",
    [
        ({B: torch.ones(3, 2)}, 10, 1, "tensor layout"),
        ({"other.lora_A.weight": torch.ones(2, 4), B: torch.ones(3, 2)}, 10, 1, "tensor layout"),
        ({A: torch.ones(2, 4), B: torch.ones(2, 3)}, 10, 1, "tensor layout"),
        ({A: torch.ones(2, 4), B: torch.tensor([[float("nan"), 0.0]] * 3)}, 10, 1, "NaN or Inf"),
        ({A: torch.ones(2, 4), B: torch.tensor([[float("inf"), 0.0]] * 3)}, 10, 1, "NaN or Inf"),
        ({A: torch.ones(2, 4), B: torch.full((3, 2), -7e4)}, 10, 1, "exceeds 65504"),
        ({A: torch.ones(2, 4), B: torch.ones(3, 2)}, 10, 2, "round"),
        ({A: torch.ones(2, 4), B: torch.ones(3, 2)}, 0, 1, "num_examples"),
    ],
)
def test_invalid_updates_are_rejected_logged_and_the_rest_aggregated(delta, n, round_, reason, caplog):
    theta = adapter()
    good = {A: torch.ones(2, 4), B: torch.ones(3, 2)}
    with caplog.at_level(logging.WARNING):
        out = rnd.aggregate(spec("fedavg_lora"), theta, [(4, update_bytes(delta, n, round_)), (5, update_bytes(good))], 1)
    assert reason in out.rejected[4]
    assert out.accepted == (5,)
    assert torch.allclose(out.adapter[B], theta[B] + 1)
    assert "client 4" in caplog.text and reason in caplog.text


def test_wrong_dtype_or_size_at_the_wire_level_is_rejected():
    theta = adapter()
    layout = layout_of({A: (2, 4), B: (3, 2)}, [A, B])
    meta = {"num_examples": 3, "round": 1, "layout": fingerprint(layout)}
    as_float64 = wire.encode(rnd.UPDATE, {"values": torch.ones(14, dtype=torch.float64)}, meta)
    too_short = wire.encode(rnd.UPDATE, {"values": torch.ones(13)}, meta)
    out = rnd.aggregate(spec("fedavg_lora"), theta, [(1, as_float64), (2, too_short)], 1)
    assert "dtype torch.float64" in out.rejected[1]
    assert "expected 14 values" in out.rejected[2]


def test_the_mean_rule_never_hands_one_client_the_server_adapter(caplog):
    theta = adapter()
    d = {A: torch.full((2, 4), 0.01), B: torch.full((3, 2), 0.02)}
    out = rnd.aggregate(spec("fedlpp", "mean"), theta, [(0, update_bytes(d)), (1, update_bytes({B: torch.ones(3, 2)}))], 1)
    assert out.accepted == () and 1 in out.rejected
    assert all(torch.equal(out.adapter[n], theta[n]) for n in theta)
    assert "one valid update" in caplog.text


def test_values_beyond_the_broadcast_range_are_rejected():
    theta = adapter()
    huge = {A: torch.ones(2, 4), B: torch.full((3, 2), 1e6)}
    out = rnd.aggregate(spec("fedavg_lora"), theta, [(3, update_bytes(huge))], 1)
    assert "exceeds" in out.rejected[3]
    # Individually valid updates whose aggregate leaves the range leave the adapter unchanged.
    big = {A: torch.ones(2, 4), B: torch.full((3, 2), 60000.0)}
    near = {n: t.clone() for n, t in theta.items()}
    near[B] = torch.full((3, 2), 60000.0)
    out = rnd.aggregate(spec("fedavg_lora"), near, [(0, update_bytes(big))], 1)
    assert out.accepted == () and torch.equal(out.adapter[B], near[B])


@pytest.mark.parametrize(
    "tensors, meta, reason",
    [
        ({"values": torch.ones(7, 2)}, "LAYOUT", "flat vector"),
        ({"values": torch.ones(14)}, ["not", "a", "dict"], "not a JSON object"),
    ],
)
def test_malformed_updates_are_rejected_not_raised(tensors, meta, reason):
    theta = adapter()
    layout = layout_of({A: (2, 4), B: (3, 2)}, [A, B])
    if meta == "LAYOUT":
        meta = {"num_examples": 3, "round": 1, "layout": fingerprint(layout)}
    bad = wire.encode(rnd.UPDATE, tensors, meta)
    good = update_bytes({A: torch.ones(2, 4), B: torch.ones(3, 2)})
    out = rnd.aggregate(spec("fedavg_lora"), theta, [(1, bad), (2, good)], 1)
    assert reason in out.rejected[1]
    assert out.accepted == (2,)


def test_a_message_without_metadata_is_rejected():
    from safetensors.torch import save

    bare = save({"values": torch.ones(14)}, metadata={"format": "fedlpp", "version": "1", "kind": "update"})
    with pytest.raises(wire.WireError, match="metadata is missing"):
        wire.decode(bare, rnd.UPDATE)


def test_garbage_bytes_are_rejected_not_raised():
    theta = adapter()
    out = rnd.aggregate(spec("fedavg_lora"), theta, [(2, b"\x00garbage")], 1)
    assert "not a fedlpp message" in out.rejected[2]


def test_a_round_with_no_valid_update_leaves_the_adapter_unchanged():
    theta = adapter()
    bad = {A: torch.ones(2, 4), B: torch.full((3, 2), float("nan"))}
    out = rnd.aggregate(spec("fedlpp"), theta, [(0, update_bytes(bad)), (1, update_bytes(bad))], 1)
    assert out.accepted == ()
    assert all(torch.equal(out.adapter[n], theta[n]) for n in theta)


def test_messages_are_typed_by_kind():
    payload = rnd.make_broadcast(spec("fedavg_lora"), adapter(), 0, 1)
    with pytest.raises(wire.WireError, match="expected a 'update' message"):
        wire.decode(payload, rnd.UPDATE)
