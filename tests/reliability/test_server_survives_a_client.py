"""No single client's update can crash the server or count twice (issue 12): each is refused by reason."""

from __future__ import annotations

import json

import pytest
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.algorithms.layout import fingerprint, layout_of
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.models.lora import lora_a_from_seed
from fedlpp.privacy.client_dp import NoisedSum
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.quant import QuantSpec

A, B = "layer.lora_A.weight", "layer.lora_B.weight"
LAYOUT = layout_of({A: (2, 4), B: (3, 2)}, [A, B])


def theta() -> dict[str, torch.Tensor]:
    return {**lora_a_from_seed({A: (2, 4)}, 0), B: torch.full((3, 2), 0.1)}


def good(value: float = 1.0, n: int = 3) -> bytes:
    return rnd.make_update({A: torch.full((2, 4), value), B: torch.full((3, 2), value)}, n, 1)


def crafted(**meta: object) -> bytes:
    base = {"num_examples": 3, "round": 1, "layout": fingerprint(LAYOUT)}
    return wire.encode(rnd.UPDATE, {"values": torch.ones(14)}, {**base, **meta})


def nested(depth: int) -> bytes:
    """Metadata nested ``depth`` lists deep, written as text (json.dumps itself cannot go that deep)."""
    from safetensors.torch import save

    base = json.dumps({"num_examples": 3, "round": 1, "layout": fingerprint(LAYOUT)})
    meta = base[:-1] + ', "extra": ' + "[" * depth + "1" + "]" * depth + "}"
    return save(
        {"values": torch.ones(14)}, metadata={"format": wire.FORMAT, "version": wire.VERSION, "kind": rnd.UPDATE, "meta": meta}
    )


COMBINERS = {
    "mean": lambda: rnd.WeightedMean(),
    "client_dp": lambda: rnd.ClientDpMean(NoisedSum(10.0, 0.0, 2, SeededRandomness(0))),
}


@pytest.mark.parametrize("combiner", list(COMBINERS))
@pytest.mark.parametrize(
    "payload, reason",
    [
        (crafted(num_examples=10**400), "num_examples 10000000000"),
        (crafted(num_examples=True), "num_examples must be a positive integer"),
        (crafted(num_examples=3.0), "num_examples must be a positive integer"),
        (crafted(round=True), "expected 1"),
        (crafted(round=1.0), "expected 1"),
        (nested(100_000), "metadata"),
        (nested(5_000), "metadata is missing or not a JSON object"),
        (nested(3), "nests deeper"),
        (crafted(extra="x" * 100_000), "characters, more than"),
    ],
)
def test_a_hostile_update_is_refused_by_reason_and_the_rest_aggregated(combiner, payload, reason):
    out = rnd.server_step(
        get_algorithm("fedavg_lora", QuantSpec(bits=2)),
        theta(),
        [(7, payload), (1, good()), (2, good(2.0))],
        1,
        COMBINERS[combiner](),
    )
    assert reason in out.rejected[7]
    assert set(out.accepted) == {1, 2}


def test_the_same_client_twice_in_a_round_counts_for_nothing():
    """Else one client passes the mean rule's two-update guard alone and theta becomes its own adapter."""
    fedlpp = get_algorithm("fedlpp", QuantSpec(bits=2, granularity="tensor"), "mean")
    start = theta()
    out = rnd.server_step(fedlpp, start, [(4, good(0.5)), (4, good(0.5))], 1, rnd.WeightedMean())
    assert out.accepted == () and "2 updates from this client" in out.rejected[4]
    assert all(torch.equal(out.adapter[n], start[n]) for n in start)


def test_an_update_may_not_claim_more_examples_than_its_client_declared():
    out = rnd.server_step(
        get_algorithm("fedavg_lora", QuantSpec(bits=2)),
        theta(),
        [(0, good(n=50)), (1, good(n=10))],
        1,
        rnd.WeightedMean({0: 40, 1: 10}),
    )
    assert "more than the 40 examples this client declared" in out.rejected[0]
    assert out.accepted == (1,)


def test_metadata_nested_just_past_what_a_recursive_check_survives_is_refused():
    out = rnd.server_step(
        get_algorithm("fedavg_lora", QuantSpec(bits=2)), theta(), [(7, nested(400)), (1, good())], 1, rnd.WeightedMean()
    )
    assert "nests deeper" in out.rejected[7] and out.accepted == (1,)


@pytest.mark.parametrize("total_weight", [0, 1, -5, 3 * 40 + 1])
def test_under_secagg_a_total_weight_no_honest_round_can_have_is_refused(total_weight):
    """Weights are masked, so only their sum is checked: 3 survivors weigh between 3 and 3 x the weight bound."""
    import numpy as np

    from fedlpp.algorithms.secure import SecureEncoding, SecureMean
    from fedlpp.secagg import SecAggParams
    from fedlpp.secagg.server import AggregateResult

    params = SecAggParams(scale=2.0**20, clip_range=1.0, max_clients=3)
    values = np.concatenate([np.full(14, 0.01), [total_weight / params.scale]])
    result = AggregateResult(np.zeros(15, dtype=np.uint32), values, (0, 1, 2), ())
    out = rnd.server_step(
        get_algorithm("fedavg_lora", QuantSpec(bits=2)), theta(), result, 1, SecureMean(SecureEncoding(params, 40))
    )
    assert out.accepted == () and "outside [3, 3 x 40]" in out.notes["refused"]
    assert all(torch.equal(out.adapter[n], theta()[n]) for n in theta())
    ok = np.concatenate([np.full(14, 0.01), [60 / params.scale]])
    fine = rnd.server_step(
        get_algorithm("fedavg_lora", QuantSpec(bits=2)),
        theta(),
        AggregateResult(np.zeros(15, dtype=np.uint32), ok, (0, 1, 2), ()),
        1,
        SecureMean(SecureEncoding(params, 40)),
    )
    assert fine.accepted == (0, 1, 2)
