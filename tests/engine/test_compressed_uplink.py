"""A compressed uplink over the Flower apps: the same bytes and the same adapter as the local engine."""

from __future__ import annotations

import pytest
import torch
from flower_harness import LoopbackGrid, simulated_nodes

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.config import load_config
from fedlpp.engine.flower.server_app import serve_on_grid
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.quant.stochastic import UplinkSpec

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=3",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=3",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=2",
    "eval.max_new_tokens=3",
    "fl.rounds=2",
    "seed=0",
    "flower.connect_timeout=2",
]


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
