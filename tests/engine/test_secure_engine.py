"""secagg.enabled: the server sees only the round's sum, and the result matches plain FedAvg-style aggregation."""

from __future__ import annotations

import pytest
import torch

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.config import ConfigError, load_config
from fedlpp.engine.local import run_experiment

pytestmark = pytest.mark.integration

BASE = [
    "model.name=tiny-llama",
    "model.max_length=64",
    "data.num_train=120",
    "data.num_eval=2",
    "fl.num_clients=4",
    "fl.clients_per_round=3",
    "fl.local_steps=2",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=100",
    "eval.max_new_tokens=2",
    "fl.rounds=1",
    "seed=0",
]


def final(directory) -> dict[str, torch.Tensor]:
    return rundir.load_checkpoint(directory)[0]


@pytest.mark.parametrize("algorithm", ["fedavg_lora", "fedlpp", "ffa_lora", "rolora"])
def test_secure_round_equals_plain_round_up_to_fixed_point(tmp_path, algorithm):
    plain = tmp_path / "plain"
    secure = tmp_path / "secure"
    # RoLoRA: a B round then an A round (the masked vector's length changes with the factor).
    extra = [f"algorithm.name={algorithm}", f"fl.rounds={2 if algorithm == 'rolora' else 1}"]
    run_experiment(load_config(None, BASE + extra), plain, progress=False)
    run_experiment(load_config(None, BASE + extra + ["secagg.enabled=true"]), secure, progress=False)
    a, b = final(plain), final(secure)
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n), "the round trained something"
    for name in a:
        # 2^-20 resolution, 3 summands, rescaled by n_max / sum(n): far below 1e-5.
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name
    row = rundir.read_metrics(secure)[0]
    assert sorted(row["secagg_survivors"]) == row["clients"]
    plain_up = rundir.read_metrics(plain)[0]["bytes_up"]
    # Uploads: 4 bytes per value (as float32) plus key and share messages.
    assert plain_up < row["bytes_up"] < 1.1 * plain_up


def test_the_server_never_receives_an_individual_update(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an individual update reached the server")

    monkeypatch.setattr(rnd, "validate_update", refuse)
    monkeypatch.setattr(rnd, "aggregate", refuse)
    seen = []
    original = rnd.apply_mean_delta

    def spy(spec, adapter, mean_delta, count, round_):
        seen.append(count)
        return original(spec, adapter, mean_delta, count, round_)

    monkeypatch.setattr(rnd, "apply_mean_delta", spy)
    run_experiment(load_config(None, [*BASE, "secagg.enabled=true", "fl.rounds=2"]), tmp_path / "r", progress=False)
    assert seen == [3, 3], "the server step only ever gets the mean over the round's clients"


def test_out_of_range_clients_drop_out_and_a_void_round_keeps_the_adapter(tmp_path, caplog):
    out = tmp_path / "r"
    run_experiment(
        load_config(None, [*BASE, "secagg.enabled=true", "secagg.clip_range=1e-4", "algorithm.name=fedavg_lora"]),
        out,
        progress=False,
    )
    row = rundir.read_metrics(out)[0]
    assert sorted(row["out_of_range"]) == row["clients"]
    assert "secagg_abort" in row
    assert "exceeds secagg.clip_range" in caplog.text  # "is not finite or exceeds ..."
    ckpt = final(out)
    b_names = [n for n in ckpt if ".lora_B." in n]
    assert all(torch.count_nonzero(ckpt[n]) == 0 for n in b_names), "the void round left B at its initial zeros"


def test_secagg_needs_three_clients_per_round():
    with pytest.raises(ConfigError, match="must be >= 3 with secagg.enabled"):
        load_config(None, ["secagg.enabled=true", "fl.clients_per_round=2"])


def test_a_client_with_a_non_finite_update_drops_out_instead_of_breaking_the_round():
    from fedlpp.algorithms.layout import layout_of
    from fedlpp.algorithms.secure import client_vector
    from fedlpp.engine.setup import secure_encoding

    agg = secure_encoding(load_config(None, [*BASE, "secagg.enabled=true"]), client_sizes=[10, 4, 7])
    layout = layout_of({"b": (2, 2)}, ["b"])
    assert client_vector(agg, {"b": torch.full((2, 2), 0.5)}, layout, 5)[-1] == 5 / agg.params.scale
    for bad in (float("nan"), float("inf"), 3.0):  # 3.0 * 5/10 = 1.5 > clip_range 1
        delta = {"b": torch.tensor([[0.1, bad], [0.0, 0.0]])}
        assert client_vector(agg, delta, layout, 5) is None
