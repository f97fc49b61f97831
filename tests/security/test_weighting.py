"""A node's declared example count does not decide the aggregate: in a deployment every client weighs the same unless
the config says otherwise, also under secure aggregation (where the server checks the weights after unmasking)."""

from __future__ import annotations

import pytest
import torch

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.config import ConfigError, load_config
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import uniform_weighting
from fedlpp.quant import QuantSpec

ADAPTER = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}


def _update(value: float, num_examples: int) -> bytes:
    return rnd.make_update({n: torch.full_like(t, value) for n, t in ADAPTER.items()}, num_examples, 1)


def test_under_uniform_weighting_a_huge_declared_count_weighs_as_much_as_any_other():
    spec = get_algorithm("fedavg_lora", QuantSpec(bits=2))
    inputs = [(0, _update(1.0, 2**40)), (1, _update(3.0, 1))]  # client 0 claims 2^40 examples (and declared as many)
    declared = {0: 2**40, 1: 1}
    steered = rnd.server_step(spec, ADAPTER, inputs, 1, rnd.WeightedMean(declared))
    uniform = rnd.server_step(spec, ADAPTER, inputs, 1, rnd.WeightedMean(declared, uniform=True))
    assert torch.allclose(steered.adapter["m.lora_A.weight"], torch.full((2, 4), 1.0))  # examples: client 0 decides
    assert torch.allclose(uniform.adapter["m.lora_A.weight"], torch.full((2, 4), 2.0))  # uniform: the plain mean


def test_auto_weighs_by_examples_where_the_server_split_the_data_and_uniformly_where_nodes_declare():
    auto, examples, uniform = (load_config(None, [f"fl.weighting={w}"]) for w in ("auto", "examples", "uniform"))
    assert [uniform_weighting(auto, assigned) for assigned in (True, False)] == [False, True]
    assert [uniform_weighting(examples, assigned) for assigned in (True, False)] == [False, False]
    assert [uniform_weighting(uniform, assigned) for assigned in (True, False)] == [True, True]
    with pytest.raises(ConfigError, match="fl.weighting: got 'most'"):
        load_config(None, ["fl.weighting=most"])


TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=130",
    "data.num_eval=3",
    "data.partition=quantity_skew",  # clients of very different sizes: the weighting shows
    "algorithm.name=fedavg_lora",
    "fl.num_clients=4",
    "fl.clients_per_round=3",
    "fl.local_steps=2",
    "train.batch_size=4",
    "eval.every=5",
    "eval.max_new_tokens=3",
    "fl.rounds=1",
    "seed=0",
]


@pytest.mark.integration
def test_uniform_weighting_under_secagg_is_the_plain_uniform_mean(tmp_path):
    """Each input weighs 1 and the weight bound is 1: the unmasked weights must add up to exactly the survivors."""
    plain = run_experiment(load_config(None, [*TINY, "fl.weighting=uniform"]), tmp_path / "plain", progress=False)
    secure = [*TINY, "fl.weighting=uniform", "secagg.enabled=true"]
    run_experiment(load_config(None, secure), tmp_path / "secure", progress=False)
    by_examples = tmp_path / "examples"
    run_experiment(load_config(None, TINY), by_examples, progress=False)
    a, b = rundir.load_checkpoint(tmp_path / "plain")[0], rundir.load_checkpoint(tmp_path / "secure")[0]
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    weighted = rundir.load_checkpoint(by_examples)[0]
    assert not all(torch.allclose(a[n], weighted[n], atol=1e-5) for n in a)  # the weighting changed the mean
    assert plain["rounds"] == 1


def test_a_secure_sum_no_honest_survivors_could_produce_is_discarded_naming_the_round(caplog):
    import numpy as np

    from fedlpp.algorithms.secure import SecureEncoding, SecureMean
    from fedlpp.engine.setup import secagg_params
    from fedlpp.secagg import AggregateResult

    cfg = load_config(None, ["secagg.enabled=true", "fl.clients_per_round=3", "secagg.clip_range=1.0"])
    params = secagg_params(cfg.secagg, 3)
    spec = get_algorithm("fedavg_lora", QuantSpec(bits=2))
    mean = SecureMean(SecureEncoding(params, weight_bound=1))
    d = sum(t.numel() for t in ADAPTER.values())

    def combined(peak: float):
        values = np.zeros(d + 1)
        values[0], values[-1] = peak, 3 / params.scale  # one coordinate, then the weights of 3 survivors (1 each)
        notes: dict = {}
        out = mean(spec, ADAPTER, AggregateResult(np.zeros(d + 1, np.uint32), values, (0, 1, 2), ()), 7, notes)
        return out, notes

    fine, _ = combined(2.9)  # three inputs within [-1, 1]
    assert fine.mean_delta is not None
    with caplog.at_level("WARNING"):
        refused, notes = combined(100.0)  # a node sent values 100x its range
    assert refused.mean_delta is None and "more than 3 survivors within secagg.clip_range=1" in notes["refused"]
    assert "round 7: secure aggregation: the unmasked sum reaches 100" in caplog.text
