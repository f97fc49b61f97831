"""RoLoRA (issue 14): one LoRA factor trained and sent per round, so averaging is exact.

Hand-made adapters first (no model), then the tiny model through the local engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import steps, wire
from fedlpp.algorithms.factors import frozen_factor
from fedlpp.algorithms.fedavg_lora import VALUES
from fedlpp.algorithms.spec import AlgorithmSpec, get_algorithm
from fedlpp.config import load_config
from fedlpp.engine import local
from fedlpp.engine.local import run_experiment
from fedlpp.models.lora import is_lora_a, is_lora_b
from fedlpp.quant import QuantSpec

A, B = "layer.lora_A.weight", "layer.lora_B.weight"
HEAD = "score.weight"  # a classifier head: not a LoRA factor, trained every round
SHAPES = {A: (2, 4), B: (3, 2), HEAD: (2, 3)}


def rolora() -> AlgorithmSpec:
    return get_algorithm("rolora", QuantSpec(bits=2))


def random_adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def update_bytes(delta: Mapping[str, torch.Tensor], n: int, round_: int) -> bytes:
    return rnd.make_update(delta, n, round_)


def test_odd_rounds_train_b_and_even_rounds_train_a():
    spec = rolora()
    assert [spec.trained_names(SHAPES, r) for r in (1, 2, 3, 4)] == [[B, HEAD], [A, HEAD], [B, HEAD], [A, HEAD]]
    assert [frozen_factor("alternate", r) for r in (1, 2)] == ["A", "B"]


def test_the_broadcast_carries_both_factors_in_full_precision():
    theta = random_adapter(0)
    payload = rnd.make_broadcast(rolora(), theta, a_seed=5, round_=2)
    tensors, meta = wire.decode(payload, rnd.BROADCAST)
    assert set(tensors) == {VALUES} and "a_seed" not in meta and "quant" not in meta
    start, round_ = rnd.read_broadcast(payload, SHAPES)
    assert round_ == 2 and all(torch.equal(start[n], theta[n]) for n in SHAPES)


@pytest.mark.parametrize("round_, trained, frozen", [(1, B, A), (2, A, B)])
def test_the_server_takes_only_the_rounds_factor_and_keeps_the_other(round_, trained, frozen):
    theta = random_adapter(0)
    right = {trained: torch.ones(SHAPES[trained]), HEAD: torch.ones(SHAPES[HEAD])}
    out = rnd.aggregate(rolora(), theta, [(0, update_bytes(right, 10, round_)), (1, update_bytes(right, 30, round_))], round_)
    assert out.accepted == (0, 1)
    assert torch.equal(out.adapter[frozen], theta[frozen])
    assert torch.allclose(out.adapter[trained], theta[trained] + 1)
    wrong = {frozen: torch.ones(SHAPES[frozen]), HEAD: torch.ones(SHAPES[HEAD])}
    refused = rnd.aggregate(rolora(), theta, [(0, update_bytes(wrong, 10, round_))], round_)
    assert "tensor layout" in refused.rejected[0]


@pytest.mark.parametrize("round_", [1, 2])
def test_averaging_is_exact_the_global_product_is_the_mean_of_the_clients_products(round_):
    """With one factor shared, B mean(A_k) = mean(B A_k) (and mean(B_k) A = mean(B_k A)), weights n_k."""
    theta, spec = random_adapter(0), rolora()
    trained = spec.trained_names(SHAPES, round_)
    sizes = [10, 30, 60]
    deltas = [{n: random_adapter(k + 1)[n] for n in trained} for k in range(len(sizes))]
    held = [{n: theta[n] + d[n] if n in d else theta[n] for n in SHAPES} for d in deltas]
    out = rnd.aggregate(
        spec, theta, [(k, update_bytes(d, n, round_)) for k, (d, n) in enumerate(zip(deltas, sizes, strict=True))], round_
    )
    expected = sum(n / sum(sizes) * (h[B] @ h[A]) for h, n in zip(held, sizes, strict=True))
    assert torch.allclose(out.adapter[B] @ out.adapter[A], expected, atol=1e-5)
    # FedAvg on both factors is not exact: the product of the means is not the mean of the products.
    both = [{n: random_adapter(k + 1)[n] for n in SHAPES} for k in range(len(sizes))]
    mean_b = sum(n / sum(sizes) * h[B] for h, n in zip(both, sizes, strict=True))
    mean_a = sum(n / sum(sizes) * h[A] for h, n in zip(both, sizes, strict=True))
    assert not torch.allclose(
        mean_b @ mean_a, sum(n / sum(sizes) * (h[B] @ h[A]) for h, n in zip(both, sizes, strict=True)), atol=1e-3
    )


def test_a_schedule_must_be_known_and_a_seeded_a_is_never_trained():
    with pytest.raises(ValueError, match="valid choices are both, b, alternate"):
        AlgorithmSpec("x", None, trains="sometimes")
    with pytest.raises(ValueError, match="a_from_seed needs trains='b'"):
        AlgorithmSpec("x", None, a_from_seed=True, trains="alternate")


# --- the tiny model through the local engine -------------------------------------------------

TINY = [
    "model.name=tiny-llama",
    "model.max_length=64",
    "data.num_train=240",
    "data.num_eval=6",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=4",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=4",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "seed=0",
    "algorithm.name=rolora",
    "fl.rounds=4",
]


def lora_pairs(adapter: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    return [(n.replace("lora_A", "lora_B"), n) for n in sorted(adapter) if is_lora_a(n)]


@pytest.mark.integration
def test_rolora_on_the_tiny_model_alternates_what_travels_and_aggregates_exactly(tmp_path, monkeypatch):
    uploads: dict[int, list[set[str]]] = {}
    held: dict[int, list[tuple[dict[str, torch.Tensor], int]]] = {}
    globals_: dict[int, dict[str, torch.Tensor]] = {}
    client_step, server_step = steps.client_step, rnd.server_step

    def recording_client(model, payload, data, recipe, on_step=None):
        result = client_step(model, payload, data, recipe, on_step)
        start, round_ = rnd.read_broadcast(payload, recipe.shapes)
        delta = rnd.validate_update(
            result.upload, data.client_id, rnd.update_layout(recipe.spec, recipe.shapes, round_), round_
        ).delta
        uploads.setdefault(round_, []).append(set(delta))
        held.setdefault(round_, []).append(({n: start[n] + delta.get(n, 0) for n in start}, result.num_examples))
        return result

    def recording_server(spec, adapter, inputs, round_, combiner):
        result = server_step(spec, adapter, inputs, round_, combiner)
        globals_[round_] = result.adapter
        return result

    monkeypatch.setattr(local, "client_step", recording_client)
    monkeypatch.setattr(rnd, "server_step", recording_server)
    run_experiment(load_config(None, TINY), tmp_path / "run", progress=False)

    for round_, names in sorted(uploads.items()):
        factor = is_lora_b if round_ % 2 == 1 else is_lora_a
        assert all(names_k and all(factor(n) for n in names_k) for names_k in names), f"round {round_} sent {names}"
    for round_, adapter in sorted(globals_.items()):
        clients = held[round_]
        total = sum(n for _, n in clients)
        for b, a in lora_pairs(adapter):
            expected = sum(n / total * (h[b] @ h[a]) for h, n in clients)
            assert torch.allclose(adapter[b] @ adapter[a], expected, atol=1e-6), f"round {round_}: {b}"
    # The frozen factor is the global one: A after round 1 is the A its clients received, B after round 2 is B after round 1.
    assert all(torch.equal(globals_[1][a], start[a]) for start, _ in held[1] for _, a in lora_pairs(globals_[1]))
    assert all(torch.equal(globals_[2][b], globals_[1][b]) for b, _ in lora_pairs(globals_[1]))
    assert any(not torch.equal(globals_[2][a], globals_[1][a]) for _, a in lora_pairs(globals_[1]))
