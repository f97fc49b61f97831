"""fedlpp attack: what a client holds is recomputed exactly, from client-side information only, deterministically."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import steps
from fedlpp.cli import main
from fedlpp.config import load_config
from fedlpp.engine import local
from fedlpp.engine.setup import build_run
from fedlpp.experiments import attack

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=3",
    "algorithm.name=fedlpp",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=3",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=3",
    "eval.max_new_tokens=3",
    "fl.rounds=3",
    "seed=0",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    """A FedLPP run, with every adapter a client really held after its local training recorded."""
    out = tmp_path_factory.mktemp("run")
    held: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    original = steps.client_step

    def recording(model, payload, data, recipe, on_step=None):
        result = original(model, payload, data, recipe, on_step)
        start, round_ = rnd.read_broadcast(payload, recipe.shapes)
        delta = rnd.validate_update(
            result.upload, data.client_id, rnd.update_layout(recipe.spec, recipe.shapes, round_), round_
        ).delta
        held[(data.client_id, round_)] = {n: start[n] + delta[n] if n in delta else start[n] for n in start}
        return result

    patch = pytest.MonkeyPatch()
    patch.setattr(local, "client_step", recording)
    local.run_experiment(load_config(None, TINY), out, progress=False)
    patch.undo()
    return out, held


def test_keep_is_exactly_the_adapter_the_client_held(run):
    out, held = run
    rows = rundir.read_metrics(out)
    for client in range(4):
        joined = attack.rounds_joined(rows, client)
        if not joined:
            continue
        keep = attack.keep_adapter(build_run(load_config(out / rundir.CONFIG)), out, client, rows, 0.0)
        real = held[(client, joined[-1])]
        assert all(torch.equal(keep[n], real[n]) for n in real), client


def test_the_client_side_adapters_never_read_theta(run, monkeypatch):
    out, _ = run

    def refuse(*args, **kwargs):
        raise AssertionError("an attack read the server's adapter")

    monkeypatch.setattr(rundir, "load_checkpoint", refuse)
    cfg = load_config(out / rundir.CONFIG)
    plan = attack.AttackPlan((1, 2), (3,))
    held = attack.client_side_adapters(build_run(cfg), out, plan, rundir.read_metrics(out), 0.0)
    assert set(held) == {"keep", "finetune-3", "alone", "collude-2"}


def test_the_same_run_and_arguments_give_the_same_figures(run, capsys):
    out, _ = run
    assert main(["attack", str(out), "--client", "1", "--steps", "2", "6"]) == 0
    first = (out / "attack-client-1.json").read_text()
    captured = capsys.readouterr()
    assert "value taken" in captured.out
    assert "attack: fine-tuning Q(theta) for 6 steps" in captured.err
    bar = re.search(r"attack: scoring keep \((\d+) records: loss, then generation\): 0/(\d+)", captured.err)
    assert bar is not None and int(bar[2]) == 2 * int(bar[1]) > 0, captured.err
    again = attack.run_attack(out, 1, [2, 6], collude=2)
    assert json.loads(first) == json.loads(json.dumps(again))
    assert set(again["scores"]) == {"theta", "proxy", "keep", "finetune-2", "finetune-6", "alone", "collude-2"}


def test_the_runs_recorded_scores_of_theta_and_the_proxy_are_what_scoring_them_gives(run, tmp_path):
    out, _ = run
    summary = json.loads((out / rundir.SUMMARY).read_text())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / rundir.SUMMARY).unlink()  # nothing recorded: the attack scores theta and Q(theta) itself
    fresh = attack.score(build_run(load_config(copy / rundir.CONFIG)), copy, {}, alone={"loss": 1.0, "bleu": 0.0, "rouge_l": 0.0})
    for name, key in (("theta", "global"), ("proxy", "proxy")):
        assert fresh["scores"][name]["loss"] == pytest.approx(summary[key]["loss"], abs=1e-6)
        assert fresh["scores"][name]["bleu"] == pytest.approx(summary[key]["bleu"], abs=1e-6)


def test_the_whole_last_round_colluding_under_the_mean_rule_holds_theta(run):
    """theta = the examples-weighted mean of what the last round's clients keep (server_lr 1, rule mean)."""
    out, _ = run
    rows = rundir.read_metrics(out)
    cohort = rows[-1]["clients"]
    cfg = load_config(out / rundir.CONFIG)
    plan = attack.AttackPlan(tuple(attack.trained_clients(rows)[: len(cohort)]), ())
    assert sorted(plan.clients) == sorted(cohort)
    held = attack.client_side_adapters(build_run(cfg), out, plan, rows, 0.0, with_alone=False)
    theta, _ = rundir.load_checkpoint(out)
    colluded = held[f"collude-{len(cohort)}"]
    assert all(torch.allclose(colluded[n], theta[n], atol=1e-6) for n in theta)
    assert not all(torch.allclose(held["keep"][n], theta[n], atol=1e-6) for n in theta)  # one client alone does not


def test_alone_is_scored_once_for_runs_that_differ_only_in_algorithm(run, tmp_path, monkeypatch):
    out, _ = run
    cfg = load_config(out / rundir.CONFIG)
    key = attack.alone_key(cfg, 1, 6)
    other = load_config(None, [*TINY, "algorithm.name=fedavg_lora", "quant.bits=1"])
    assert attack.alone_key(other, 1, 6) == key
    assert attack.alone_key(load_config(None, [*TINY, "data.num_train=100"]), 1, 6) != key
    assert attack.alone_key(cfg, 2, 6) != key and attack.alone_key(cfg, 1, 3) != key
    cache = tmp_path / "cache"
    first = attack.run_attack(out, 1, [2], collude=1, cache=cache)
    monkeypatch.setattr(attack, "alone_adapter", lambda *a: pytest.fail("alone was trained again"))
    again = attack.run_attack(out, 1, [2], collude=1, cache=cache)
    assert again["scores"]["alone"] == first["scores"]["alone"]
    assert again["value_taken"] == first["value_taken"]


def test_the_default_attacker_is_a_client_of_the_last_round(run):
    out, _ = run
    rows = rundir.read_metrics(out)
    report = attack.run_attack(out, "last", [2], collude=1)
    assert report["client"] == attack.trained_clients(rows)[0] and report["client"] in rows[-1]["clients"]
    assert attack.trained_clients([{"round": 1, "clients": [0, 3]}, {"round": 2, "clients": [2, 3], "failed": {"3": "x"}}]) == [
        2,
        0,
        3,
    ]


def test_value_taken_is_the_share_of_the_federations_gain():
    assert attack.value_taken(attack=55.0, alone=50.0, theta=60.0) == 0.5
    assert attack.value_taken(attack=0.9, alone=1.0, theta=0.8) == pytest.approx(0.5)  # a loss: lower is better, same share
    assert attack.value_taken(attack=1.0, alone=2.0, theta=2.0) is None


def test_an_attacker_that_never_trained_or_does_not_exist_is_refused(run):
    out, _ = run
    with pytest.raises(ValueError, match="clients 0..3"):
        attack.run_attack(out, 7)
    rows = [{"round": 1, "clients": [0, 1]}]
    with pytest.raises(ValueError, match="never trained"):
        attack.keep_adapter(build_run(load_config(out / rundir.CONFIG)), out, 3, rows, 0.0)


VARIANTS = {
    "fedlpp_ffa": ["algorithm.name=fedlpp_ffa"],
    "fedlpp+secagg": ["fl.clients_per_round=3", "secagg.enabled=true"],
    "ffa_lora+dp_sgd": [
        "algorithm.name=ffa_lora",
        "privacy.mode=dp_sgd",
        "privacy.noise_multiplier=1.0",
        "train.max_grad_norm=0",
    ],
    "fedavg_lora+client_dp": [
        "algorithm.name=fedavg_lora",
        "privacy.mode=client_dp",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_norm=1.0",
    ],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_attack_runs_under_ffa_secagg_and_both_dp_modes(variant, tmp_path):
    """keep is exact there too: the whole last round colluding holds theta, up to SecAgg's fixed point
    (client-level DP adds noise the clients never see, so there theta differs by that noise)."""
    out = tmp_path / variant
    local.run_experiment(load_config(None, [*TINY, "fl.rounds=2", *VARIANTS[variant]]), out, progress=False)
    report = attack.run_attack(out, "last", [2], collude=1)
    assert set(report["scores"]) == {"theta", "proxy", "keep", "finetune-2", "alone"}
    rows = rundir.read_metrics(out)
    cohort = rows[-1]["clients"]
    sigma = float(rundir.read_summary(out).get("privacy", {}).get("noise_multiplier", 0.0))
    plan = attack.AttackPlan(tuple(attack.trained_clients(rows)[: len(cohort)]), ())
    held = attack.client_side_adapters(build_run(load_config(out / rundir.CONFIG)), out, plan, rows, sigma, with_alone=False)
    theta, _ = rundir.load_checkpoint(out)
    close = all(torch.allclose(held[f"collude-{len(cohort)}"][n], theta[n], atol=1e-4) for n in theta)
    assert close == (variant != "fedavg_lora+client_dp")


def test_an_unfinished_run_is_refused_rather_than_mixing_rounds(run, tmp_path):
    out, _ = run
    copy = tmp_path / "unfinished"
    shutil.copytree(out, copy)
    # A finished run extended and killed: its final broadcast is from before its last recorded round.
    shutil.copy(rundir.broadcast_path(copy, 2), rundir.broadcast_path(copy, rundir.FINAL_BROADCAST))
    with pytest.raises(rundir.RunDirError, match="has not finished"):
        attack.run_attack(copy, "last", [2], collude=1)


def test_the_attacker_is_not_bound_by_fedprox():
    """FedProx binds the clients' training in the federation, not what an attacking client does with what it holds."""
    plain, prox = load_config(None, []), load_config(None, ["train.proximal_mu=0.5"])
    assert attack.alone_key(plain, 0, 8) == attack.alone_key(prox, 0, 8)
