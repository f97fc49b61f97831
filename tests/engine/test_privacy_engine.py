"""Runs with DP: epsilon in every row, cross-checked; budget stops; resume keeps the accountant."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from fedlpp import rundir
from fedlpp.cli import main
from fedlpp.config import ConfigError, load_config
from fedlpp.engine.local import LEDGER_KEY, run_experiment
from fedlpp.engine.setup import build_run, sample_clients

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=4",
    "fl.num_clients=3",
    "fl.clients_per_round=2",
    "fl.local_steps=3",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=99",
    "eval.max_new_tokens=2",
    "seed=0",
]


def tiny(*extra: str, rounds: int = 3):
    return load_config(None, [*TINY, f"fl.rounds={rounds}", *extra])


def rows(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def _rdp(sigma: float, rate: float, steps: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_the_issue_smoke_command_reports_epsilon_every_round(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "model.name=tiny-llama",
            "algorithm.name=ffa_lora",
            "fl.rounds=3",
            "fl.num_clients=3",
            "fl.clients_per_round=3",
            "privacy.mode=dp_sgd",
            "privacy.noise_multiplier=1.0",
            "privacy.accountant=rdp",
            "seed=0",
            "data.num_train=90",
            "data.num_eval=2",
            "fl.local_steps=2",
            "eval.max_new_tokens=2",
            "train.batch_size=8",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [1, 2, 3]
    epsilons = [r["epsilon"] for r in metrics]
    assert all(e > 0 for e in epsilons) and epsilons == sorted(epsilons)
    assert all(set(r["epsilon_per_client"]) == {"0", "1", "2"} for r in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == epsilons[-1]
    assert "is protected by" in summary["privacy"]["statement"]
    assert "protected by" in capsys.readouterr().out


@pytest.mark.parametrize(
    "mode",
    [
        ["privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0"],
        ["privacy.mode=client_dp", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5"],
    ],
)
def test_rolora_trains_under_both_dp_modes_one_factor_per_round(tmp_path, mode):
    """Like FFA-LoRA, RoLoRA aggregates linearly, so it composes with DP-SGD and client-level DP as they are."""
    initial = build_run(tiny()).server.initial_adapter()
    run_experiment(tiny("algorithm.name=rolora", *mode, rounds=1), tmp_path / "one", progress=False)
    run_experiment(tiny("algorithm.name=rolora", *mode, rounds=2), tmp_path / "two", progress=False)
    one, two = rundir.load_checkpoint(tmp_path / "one")[0], rundir.load_checkpoint(tmp_path / "two")[0]
    a_names = [n for n in one if ".lora_A." in n]
    b_names = [n for n in one if ".lora_B." in n]
    assert all(torch.equal(one[n], initial[n]) for n in a_names), "round 1 trains B only"
    assert all(torch.count_nonzero(one[n]) for n in b_names), "round 1 moved B (noise alone would)"
    assert all(torch.equal(two[n], one[n]) for n in b_names), "round 2 trains A only"
    assert all(not torch.equal(two[n], one[n]) for n in a_names)
    assert rows(tmp_path / "two")[-1]["epsilon"] > rows(tmp_path / "one")[-1]["epsilon"] > 0


def test_reported_epsilon_equals_dp_accounting_for_each_clients_real_steps(tmp_path):
    cfg = tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=0.9", rounds=4)
    run_experiment(cfg, tmp_path / "run", progress=False)
    ctx_sizes = build_run(cfg).server.client_sizes
    final = rows(tmp_path / "run")[-1]
    for client in range(3):
        joined = sum(client in sample_clients(0, r, 3, 2) for r in range(1, 5))
        expected = _rdp(0.9, 4 / ctx_sizes[client], joined * 3, 1e-5) if joined else 0.0
        assert final["epsilon_per_client"].get(str(client), 0.0) == pytest.approx(expected, rel=0.01)
    assert final["epsilon"] == max(final["epsilon_per_client"].values())


def test_target_epsilon_calibrates_sigma_and_the_run_ends_at_the_target(tmp_path):
    summary = run_experiment(tiny("privacy.mode=dp_sgd", "privacy.epsilon=2.0"), tmp_path / "run", progress=False)
    assert summary["privacy"]["calibrated_for_epsilon"] == 2.0
    assert 1.9 <= summary["privacy"]["epsilon"] <= 2.0
    assert "stopped" not in summary and summary["rounds"] == 3


def test_budget_exhaustion_stops_before_the_round_that_would_exceed_it(tmp_path):
    out = tmp_path / "run"
    # sigma 1 at q = 4/40: about 1.3 after round 1, 1.5 after round 2 (each client joins 2 of 3 rounds).
    full = run_experiment(
        tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", rounds=3), tmp_path / "full", progress=False
    )
    eps = [r["epsilon"] for r in rows(tmp_path / "full")]
    budget = (eps[0] + eps[1]) / 2
    summary = run_experiment(
        tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", f"privacy.budget={budget}"), out, progress=False
    )
    assert summary["rounds"] == 1 and "stopped" in summary and "privacy budget" in summary["stopped"]
    assert summary["privacy"]["epsilon"] <= budget
    adapter, last = rundir.load_checkpoint(out)
    assert last == 1 and all(torch.isfinite(t).all() for t in adapter.values())
    assert (out / "adapter" / "adapter_config.json").exists()
    assert full["privacy"]["epsilon"] > budget
    assert summary["final_round"] == 1 and summary["global"]["loss"] > 0  # the adapter it stopped with is evaluated
    assert "train_loss" not in rows(out)[0]  # computed from the clients' data without noise: not released


def test_resume_keeps_the_accountant_and_reproduces_the_run(tmp_path):
    straight = tmp_path / "straight"
    run_experiment(tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", rounds=3), straight, progress=False)
    split = tmp_path / "split"
    run_experiment(tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", rounds=2), split, progress=False)
    assert LEDGER_KEY in rundir.load_checkpoint_metadata(split)
    run_experiment(tiny("privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", rounds=3), split, resume=True, progress=False)
    a, b = rows(straight), rows(split)
    assert [r["epsilon"] for r in a] == [r["epsilon"] for r in b]
    assert [r["epsilon"] for r in b] == sorted(r["epsilon"] for r in b)
    adapter_a, adapter_b = rundir.load_checkpoint(straight)[0], rundir.load_checkpoint(split)[0]
    assert all(torch.equal(adapter_a[n], adapter_b[n]) for n in adapter_a)


def test_resume_with_more_rounds_keeps_the_calibrated_sigma_and_stops_at_the_target(tmp_path):
    out = tmp_path / "run"
    first = run_experiment(tiny("privacy.mode=dp_sgd", "privacy.epsilon=2.0", rounds=2), out, progress=False)
    longer = run_experiment(tiny("privacy.mode=dp_sgd", "privacy.epsilon=2.0", rounds=4), out, resume=True, progress=False)
    assert longer["privacy"]["noise_multiplier"] == first["privacy"]["noise_multiplier"]
    assert longer["rounds"] == 2 and "privacy budget" in longer["stopped"]
    assert longer["privacy"]["epsilon"] == first["privacy"]["epsilon"]


def test_client_level_dp_accounts_the_run_with_sampling_without_replacement(tmp_path):
    summary = run_experiment(
        tiny("privacy.mode=client_dp", "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.5"), tmp_path / "run", progress=False
    )
    ref = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    ref.compose(dp_accounting.SampledWithoutReplacementDpEvent(3, 2, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert summary["privacy"]["epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=0.01)
    assert "whole dataset" in summary["privacy"]["statement"]
    assert "epsilon_per_client" not in rows(tmp_path / "run")[-1]


def test_client_level_dp_with_poisson_client_sampling(tmp_path):
    cfg = tiny(
        "privacy.mode=client_dp",
        "privacy.noise_multiplier=1.5",
        "privacy.client_sampling=poisson",
        "privacy.accountant=prv",
        rounds=4,
    )
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["privacy"]["epsilon"] == pytest.approx(_pld(1.5, 2 / 3, 4, 1e-5), rel=0.01)
    assert all(isinstance(r["clients"], list) for r in rows(tmp_path / "run"))


def _pld(sigma: float, rate: float, steps: int, delta: float) -> float:
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_client_level_dp_under_secure_aggregation_matches_the_plain_mean_without_noise(tmp_path):
    common = ("privacy.mode=client_dp", "privacy.noise_multiplier=1e-9", "privacy.clip_norm=0.05", "fl.clients_per_round=3")
    plain = run_experiment(tiny(*common, rounds=1), tmp_path / "plain", progress=False)
    secure = run_experiment(tiny(*common, "secagg.enabled=true", rounds=1), tmp_path / "secure", progress=False)
    a, b = rundir.load_checkpoint(tmp_path / "plain")[0], rundir.load_checkpoint(tmp_path / "secure")[0]
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert plain["privacy"]["epsilon"] == secure["privacy"]["epsilon"]


def test_noise_shares_that_cannot_fit_the_secagg_range_are_refused_before_training(tmp_path):
    cfg = tiny(
        "privacy.mode=client_dp",
        "privacy.noise_multiplier=1.0",
        "privacy.clip_norm=1.0",
        "fl.clients_per_round=3",
        "secagg.enabled=true",
    )
    with pytest.raises(ConfigError, match="secagg.clip_range"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
