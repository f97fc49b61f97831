"""Distributed DP under SecAgg in a small field: priced by the discrete Gaussian's bound, which meets the central
Gaussian's as the field grows; every round charged for the shares its sum really holds; the noise comes from the OS."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fedlpp import rundir
from fedlpp.algorithms import rotation as rot
from fedlpp.algorithms import secure as sec
from fedlpp.algorithms.spec import get_algorithm
from fedlpp.config import ConfigError, SecAggConfig, load_config
from fedlpp.engine import local as local_engine
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run, protocol_params, secagg_params
from fedlpp.engine.transport import MessageError
from fedlpp.privacy.accountant import LEDGER_KEY, LedgerAccountant
from fedlpp.privacy.accounting import Accounting, epsilon
from fedlpp.privacy.distributed import DistributedNoise
from fedlpp.privacy.plan import distributed_plan
from fedlpp.privacy.randomness import SeededRandomness
from fedlpp.quant import QuantSpec
from fedlpp.secagg import AggregateResult

CENTRAL = Accounting("rdp", "fixed", 1e-5, population=4)  # central client-level DP, all 4 clients every round
RATE_ONE = Accounting("rdp", "poisson", 1e-5)


@pytest.mark.parametrize(("bits", "within"), [(16, 0.03), (20, 1e-3), (24, 1e-4)])
def test_epsilon_meets_the_central_gaussians_as_the_field_grows(bits, within):
    noise = DistributedNoise(bits, 4, 1.0, (460_800,), 4)
    for z in (0.8, 1.6):
        central = epsilon([(z, 1.0, 10)], CENTRAL)
        distributed = epsilon([(noise.round_sigma(z, 4), 1.0, 10)], RATE_ONE)
        assert central <= distributed <= central * (1 + within)


def test_a_round_with_fewer_shares_costs_more_and_calibration_covers_the_fewest():
    noise = DistributedNoise(16, 4, 1.0, (3000,), fewest_survivors=3)
    assert noise.round_sigma(1.0, 3) < noise.round_sigma(1.0, 4)
    cfg = load_config(None, ["privacy.mode=client_dp", "privacy.epsilon=6", "privacy.delta=1e-3"]).privacy
    plan = distributed_plan(cfg, noise, {0: 5, 1: 5, 2: 5, 3: 5}, 4)
    worst = LedgerAccountant.replayed(plan, [[0, 1, 2]] * 5)  # every round lost client 3
    assert worst.ledger.epsilon == pytest.approx(6.0, rel=0.01) and worst.ledger.epsilon <= 6.0 + 1e-9
    none_lost = LedgerAccountant.replayed(plan, [[0, 1, 2, 3]] * 5)
    assert none_lost.ledger.epsilon < worst.ledger.epsilon


def test_the_accountant_charges_the_survivors_it_is_told_of():
    noise = DistributedNoise(16, 4, 1.0, (3000,), fewest_survivors=3)
    cfg = load_config(None, ["privacy.mode=client_dp", "privacy.noise_multiplier=1.5", "privacy.delta=1e-3"]).privacy
    accountant = LedgerAccountant.start(distributed_plan(cfg, noise, dict.fromkeys(range(4), 3), 4))
    assert accountant.admit(1, [0, 1, 2, 3]) is None
    accountant.commit([0, 1, 3])  # client 2 dropped out: it is not charged, the others are at 3 shares
    assert set(accountant.ledger.epsilons) == {"0", "1", "3"}
    expected = epsilon([(noise.round_sigma(1.5, 3), 1.0, 1)], plan_accounting := accountant.plan.accounting)
    assert accountant.ledger.epsilons["0"] == pytest.approx(expected) and plan_accounting.sampling == "poisson"


def field_encoding(bits: int = 16, noise_multiplier: float = 1.0) -> sec.SecureEncoding:
    cfg = SecAggConfig(modulus_bits=bits)
    rotation = rot.Rotation(bits, 4, 1.0, seed=3, noise_multiplier=noise_multiplier)
    return sec.SecureEncoding(secagg_params(cfg, 4), 1, rotation)


def test_each_client_adds_a_discrete_gaussian_share_from_the_os(monkeypatch):
    drawn = []

    class Recording(sec.SystemRandomness):
        def words(self, n):
            drawn.append(n)
            return super().words(n)

    monkeypatch.setattr(sec, "SystemRandomness", Recording)
    encoding = field_encoding()
    delta = {"a.lora_A.weight": torch.zeros(8, 100), "a.lora_B.weight": torch.zeros(100, 8)}
    one = sec.RotatedInput(encoding, seed=0, secure=False)(delta, 1, 1, 0)
    two = sec.RotatedInput(encoding, seed=0, secure=False)(delta, 1, 1, 0)
    assert drawn, "the noise share came from the OS CSPRNG"
    assert not np.array_equal(one, two), "the same seed does not give the same noise"
    share_std = encoding.rotation.local_std(1600)
    assert one.dtype == np.uint16, "the field's elements in Z_2^16's words: each integer mod 2^16"
    assert np.std(one[:-1].view(np.int16)) == pytest.approx(share_std, rel=0.1) and one[-1] == 1


def test_under_distributed_dp_the_rounding_draws_come_from_the_os_too(monkeypatch):
    """Seeded, how often conditional rounding retried would follow from the data and a seed the server knows."""
    asked = []
    real = sec.randomness
    monkeypatch.setattr(sec, "randomness", lambda secure, seed: asked.append(secure) or real(secure, seed))
    delta = {"a.lora_A.weight": torch.zeros(8, 100), "a.lora_B.weight": torch.zeros(100, 8)}
    sec.RotatedInput(field_encoding(), seed=0, secure=False)(delta, 1, 1, 0)
    sec.RotatedInput(field_encoding(noise_multiplier=0.0), seed=0, secure=False)(delta, 1, 1, 0)
    assert asked == [True, False], "distributed DP: the OS; a small field without DP: the run's seed (reproducible)"


def test_the_server_tops_up_the_missing_shares_and_divides_by_the_expected_count():
    encoding = field_encoding()
    spec = get_algorithm("fedavg_lora", QuantSpec(2))
    adapter = {"a.lora_A.weight": torch.zeros(8, 100), "a.lora_B.weight": torch.zeros(100, 8)}
    rotation = encoding.rotation
    shares = [rotation.encode(np.zeros(1600), 1, SeededRandomness(k), SeededRandomness(10 + k)) for k in range(3)]
    total = np.append(np.mod(sum(shares) + rotation.half_field, 2 * rotation.half_field) - rotation.half_field, 3)
    notes: dict = {}
    out = sec.RotatedMean(encoding)(spec, adapter, AggregateResult(np.zeros(1601, np.uint32), total, (0, 1, 2), ()), 1, notes)
    assert notes["dp_noise_topped_up"] == {"survivors": 3, "expected": 4} and "refused" not in notes
    noise = torch.cat([t.reshape(-1) for t in out.mean_delta.values()]).double()
    assert float(noise.std()) == pytest.approx(1.0 * 1.0 / 4, rel=0.1), "z c / K: the whole noise over the public count"


TINY_DP = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=80",
    "data.num_eval=3",
    "eval.max_new_tokens=3",
    "eval.every=3",
    "algorithm.name=fedavg_lora",
    "fl.num_clients=4",
    "fl.clients_per_round=4",
    "fl.local_steps=2",
    "secagg.enabled=true",
    "secagg.modulus_bits=16",
    "privacy.delta=0.0625",
    "seed=0",
]


@pytest.mark.integration
def test_a_distributed_dp_run_charges_its_survivors_and_resumes_with_the_same_ledger(tmp_path, monkeypatch):
    """Client 2 fails in round 2: that round's sum holds 3 shares (the fewest 4 clients with threshold 0.6 can
    unmask), client 2 is not charged for it and the others are at 3 shares; the resumed run replays exactly that."""
    calls: dict[int, int] = {}
    real_step = local_engine.client_step

    def failing(model, payload, data, recipe, on_step=None):
        calls[data.client_id] = calls.get(data.client_id, 0) + 1
        if (data.client_id, calls[data.client_id]) == (2, 2):
            raise MessageError("client 2 fails on purpose")
        return real_step(model, payload, data, recipe, on_step)

    monkeypatch.setattr(local_engine, "client_step", failing)
    cfg = load_config(None, [*TINY_DP, "privacy.mode=client_dp", "privacy.noise_multiplier=2", "fl.rounds=2"])
    assert build_run(cfg).server.privacy.distributed.fewest_survivors == 3
    run_experiment(cfg, tmp_path / "run", progress=False)
    run_experiment(rundir.resumed_config(tmp_path / "run", ["fl.rounds=3"]), tmp_path / "run", resume=True, progress=False)
    rows = rundir.read_metrics(tmp_path / "run")
    assert [r["secagg_survivors"] for r in rows] == [[0, 1, 2, 3], [0, 1, 3], [0, 1, 2, 3]]
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())["privacy"]
    assert "distributed discrete Gaussian under secure aggregation in Z_2^16" in summary["statement"]
    assert summary["sampling"] == "none" and summary["epsilon"] == rows[-1]["epsilon"]
    ledger = rundir.load_checkpoint_metadata(tmp_path / "run")[LEDGER_KEY]
    histories = json.loads(ledger)["histories"]
    assert sum(steps for _, _, steps in histories["2"]) == 2 and sum(steps for _, _, steps in histories["0"]) == 3


def test_secagg_min_survivors_raises_the_floor_the_noise_is_priced_for():
    """A sparse graph's threshold floor (a survivor's threshold of neighbours plus itself) is far below its clients,
    so its noise is priced for few shares; secagg.min_survivors = 1 prices it for all K, as a complete graph at
    threshold 1 is, and the protocol then refuses any smaller sum."""
    k = ["fl.num_clients=128", "fl.clients_per_round=128", "privacy.mode=client_dp", "privacy.noise_multiplier=1"]
    small_field = ["secagg.enabled=true", "secagg.modulus_bits=16", "secagg.threshold=1.0"]
    sparse = load_config(None, [*k, *small_field, "secagg.graph=sparse"])
    assert protocol_params(sparse).min_survivors == 22  # degree ceil(3 log2 128) = 21, all of them, and itself
    everyone = load_config(None, [*k, *small_field, "secagg.graph=sparse", "secagg.min_survivors=1"])
    complete = load_config(None, [*k, *small_field])
    assert protocol_params(everyone).min_survivors == protocol_params(complete).min_survivors == 128
    assert protocol_params(load_config(None, [*k, "secagg.enabled=true", "secagg.min_survivors=0.5"])).min_survivors == 64
    assert protocol_params(load_config(None, [*k, "secagg.enabled=true"])).min_survivors == 0
    with pytest.raises(ConfigError, match="secagg.min_survivors: must be a fraction"):
        load_config(None, [*k, "secagg.enabled=true", "secagg.min_survivors=2"])
    with pytest.raises(ConfigError, match="secagg.min_survivors: 0.5 applies only with secagg.enabled=true"):
        load_config(None, [*k, "secagg.min_survivors=0.5"])


def test_a_target_epsilon_is_calibrated_once_for_the_distributed_mechanism(caplog):
    """Not first for central client-level DP (another noise multiplier, in the log) and then for the field's."""
    cfg = load_config(None, [*TINY_DP, "privacy.mode=client_dp", "privacy.epsilon=8", "fl.rounds=2"])
    with caplog.at_level(logging.INFO, logger="fedlpp.privacy.plan"):
        plan = build_run(cfg).server.privacy
    calibrations = [r.getMessage() for r in caplog.records if "calibrated to epsilon" in r.getMessage()]
    assert len(calibrations) == 1 and calibrations[0].startswith("privacy: distributed noise multiplier")
    assert plan.distributed is not None and f"{plan.noise_multiplier:.4f}" in calibrations[0]


@pytest.mark.integration
def test_dp_sgd_in_a_small_field_is_sample_level_dp_not_distributed(tmp_path):
    cfg = load_config(None, [*TINY_DP, "privacy.mode=dp_sgd", "privacy.noise_multiplier=1", "fl.rounds=1", "train.batch_size=4"])
    run_experiment(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())["privacy"]
    assert "DP-SGD on every client" in summary["statement"] and "distributed" not in summary["statement"]
    assert summary["unit"].startswith("each single training example")
