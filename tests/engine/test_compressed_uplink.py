"""A compressed uplink over the Flower apps — plain b-bit updates, and SecAgg in a b-bit field: the same bytes and
the same adapter as the local engine."""

from __future__ import annotations

import math

import pytest
import torch
from flower_harness import LoopbackGrid, simulated_nodes
from test_flower_engine import TINY as FLOWER_TINY

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.config import load_config
from fedlpp.engine.flower.server_app import serve_on_grid
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.quant.stochastic import UplinkSpec

pytestmark = pytest.mark.integration

TINY = [*FLOWER_TINY, "eval.every=2", "fl.rounds=2"]


def test_every_engine_sends_the_same_compressed_bytes_and_ends_with_the_same_adapter(tmp_path):
    cfg = load_config(None, [*TINY, "algorithm.name=fedlpp_ffa", "uplink.bits=2"])
    run_experiment(cfg, tmp_path / "local", progress=False)
    serve_on_grid(LoopbackGrid(simulated_nodes(4)), cfg, tmp_path / "flower")
    a, b = rundir.load_checkpoint(tmp_path / "local")[0], rundir.load_checkpoint(tmp_path / "flower")[0]
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n), "the run trained something"
    assert all(torch.allclose(a[n], b[n], atol=1e-6, rtol=0) for n in a)
    rows, flower_rows = rundir.read_metrics(tmp_path / "local"), rundir.read_metrics(tmp_path / "flower")
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in flower_rows]

    # Each client's upload is exactly one 2-bit message over B alone (FFA): its size follows from the layout.
    shapes = build_run(cfg).server.initial_adapter()
    b_only = {n: torch.zeros_like(t) for n, t in shapes.items() if ".lora_B." in n}
    one = len(rnd.make_update(b_only, 30, 1, UplinkSpec(2), SeededRandomness(0)))
    assert [r["bytes_up"] for r in rows] == [2 * one] * 2
    float32 = len(rnd.make_update(b_only, 30, 1))
    assert one < float32 / 5, "tiny-llama's B is 1,536 values: the message's header is a third of its 2-bit form"


SECURE = [*TINY, "algorithm.name=fedavg_lora", "fl.num_clients=3", "fl.clients_per_round=3", "fl.rounds=1", "eval.every=1"]
SECURE += ["secagg.enabled=true", "fl.weighting=uniform"]


def test_secagg_in_a_16_bit_field_is_the_same_on_every_engine_and_within_its_rounding_bound_of_32_bits(tmp_path):
    small = load_config(None, [*SECURE, "secagg.modulus_bits=16"])
    run_experiment(small, tmp_path / "local", progress=False)
    serve_on_grid(LoopbackGrid(simulated_nodes(3)), small, tmp_path / "flower")
    run_experiment(load_config(None, SECURE), tmp_path / "full", progress=False)
    a, b, full = (rundir.load_checkpoint(tmp_path / name)[0] for name in ("local", "flower", "full"))
    assert all(torch.allclose(a[n], b[n], atol=1e-7, rtol=0) for n in a), "the same integers summed on both engines"
    [row], [flower_row], [full_row] = (rundir.read_metrics(tmp_path / name) for name in ("local", "flower", "full"))
    assert row["bytes_up"] == flower_row["bytes_up"] and row["secagg_survivors"] == [0, 1, 2]

    # The 16-bit mean differs from the 32-bit one (fixed point at 2^-20) by no more than rounding can move it.
    rotation = build_run(small).server.secure.rotation
    names = sorted(n for n in a if ".lora_" in n)
    dim = sum(a[n].numel() for n in names)
    gap = torch.cat([(a[n] - full[n]).reshape(-1) for n in names]).double().norm()
    assert 0 < float(gap) <= rotation.rounding_bound(dim) + math.sqrt(dim) * 2.0**-20

    # Every byte is counted from the messages: the only difference is each masked input, 4 bytes a value against 2.
    values = dim + 1  # the delta and the weight coordinate
    assert full_row["bytes_up"] - row["bytes_up"] == 3 * (4 * values - -(-values * 16 // 8))


def test_distributed_dp_over_the_flower_apps_sends_and_accounts_as_the_local_engine(tmp_path):
    """The noise shares are random (OS CSPRNG), so the adapters differ; the bytes, the survivors and every epsilon
    — computed by the server from the same plan — are the local engine's."""
    field = ["fl.num_clients=4", "fl.clients_per_round=4", "fl.rounds=2", "secagg.modulus_bits=16", "secagg.threshold=1.0"]
    private = load_config(None, [*SECURE, *field, "privacy.mode=client_dp", "privacy.epsilon=10", "privacy.delta=0.0625"])
    run_experiment(private, tmp_path / "local", progress=False)
    serve_on_grid(LoopbackGrid(simulated_nodes(4)), private, tmp_path / "flower")
    local, flower = rundir.read_metrics(tmp_path / "local"), rundir.read_metrics(tmp_path / "flower")
    for key in ("bytes_up", "bytes_down", "secagg_survivors", "epsilon"):
        assert [r[key] for r in local] == [r[key] for r in flower], key
    assert 0 < local[-1]["epsilon"] <= 10
