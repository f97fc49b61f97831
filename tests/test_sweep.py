"""Sweep files: validated up front, crossed axes x seeds, resumable, one mean ± std table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlpp.config import ConfigError
from fedlpp.experiments.sweep import SWEEP_JSON, SWEEP_MD, load_sweep, run_sweep, table

SWEEP = """
[fl]
rounds = 2
[sweep]
seeds = [0, 1]
[sweep.axes.algorithm]
"LoRA" = ["algorithm.name=fedavg_lora"]
"FFA" = ["algorithm.name=ffa_lora", "train.lr=0.02"]
[sweep.axes.privacy]
"none" = []
"eps=3" = ["privacy.mode=dp_sgd", "privacy.epsilon=3"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_axes_are_crossed_with_seeds_and_overrides_apply_to_every_point(tmp_path):
    sweep = load_sweep(_write(tmp_path, SWEEP), ["fl.rounds=3"])
    assert sweep.axes == ("algorithm", "privacy")
    assert len(sweep.points) == 8
    ffa_private = [p for p in sweep.points if p.labels == ("FFA", "eps=3")]
    assert [p.seed for p in ffa_private] == [0, 1]
    assert all(p.config.train.lr == 0.02 and p.config.privacy.epsilon == 3 and p.config.fl.rounds == 3 for p in ffa_private)
    assert ffa_private[1].directory == "FFA__eps=3/seed1"


def test_a_bad_point_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep point LoRA / none, seed 0: privacy\.noise_multiplier"):
        load_sweep(_write(tmp_path, SWEEP), ["privacy.noise_multiplier=1"])
    with pytest.raises(ConfigError, match=r"\[sweep\]"):
        load_sweep(_write(tmp_path, "[fl]\nrounds = 2\n"), [])
    with pytest.raises(ConfigError, match="sweep.seeds"):
        load_sweep(_write(tmp_path, "[sweep]\nseeds = []\n"), [])


def test_finished_points_are_kept_and_the_table_has_mean_and_std(tmp_path):
    sweep = load_sweep(_write(tmp_path, SWEEP), [])
    calls = []

    def fake_run(cfg, directory, resume):
        calls.append((cfg.algorithm.name, cfg.seed, resume))
        directory.mkdir(parents=True)
        eps = cfg.privacy.epsilon or None
        summary = {
            "rounds": 2,
            "global": {"accuracy": 80.0 + cfg.seed},
            "proxy": {"accuracy": 80.0},
            "wall_s": 1.0,
            **({"privacy": {"epsilon": eps, "noise_multiplier": 1.1}} if eps else {}),
        }
        (directory / "summary.json").write_text(json.dumps(summary))
        return summary

    out = tmp_path / "out"
    run_sweep(sweep, out, fake_run, echo=lambda _: None)
    assert len(calls) == 8
    run_sweep(sweep, out, fake_run, echo=lambda _: None)
    assert len(calls) == 8  # nothing ran twice
    runs = json.loads((out / SWEEP_JSON).read_text())["runs"]
    assert len(runs) == 8 and runs[0]["algorithm"] == "LoRA"
    md = (out / SWEEP_MD).read_text()
    assert "| algorithm | privacy | accuracy | proxy accuracy | epsilon | sigma | seeds |" in md
    assert "| LoRA | none | 80.50 ± 0.71 | 80.00 ± 0.00 | ∞ (non-private) | – | 2 |" in md
    assert "| FFA | eps=3 | 80.50 ± 0.71 | 80.00 ± 0.00 | 3.00 ± 0.00 | 1.100 | 2 |" in md


def test_table_of_no_runs_is_just_a_header():
    assert table(("a",), []).startswith("| a | proxy loss | epsilon")


def test_labels_that_collide_as_directories_are_refused(tmp_path):
    text = '[sweep]\nseeds = [0]\n[sweep.axes.privacy]\n"ε=1" = []\n"σ=1" = ["train.lr=0.01"]\n'
    with pytest.raises(ConfigError, match="same run directory"):
        load_sweep(_write(tmp_path, text), [])


def test_a_changed_sweep_file_does_not_mix_with_old_runs(tmp_path):
    from fedlpp.config import write_toml

    sweep = load_sweep(_write(tmp_path, SWEEP), [])
    out = tmp_path / "out"
    old = out / sweep.points[0].directory
    old.mkdir(parents=True)
    write_toml(load_sweep(_write(tmp_path, SWEEP), ["fl.rounds=5"]).points[0].config, old / "config.toml")
    with pytest.raises(ConfigError, match="different fl.rounds"):
        run_sweep(sweep, out, lambda *a: pytest.fail("nothing may run"), echo=lambda _: None)


ATTACKED = SWEEP.replace("[sweep.axes.privacy]", "[sweep.attack]\ncollude = 2\nsteps = [3]\n[sweep.axes.privacy]")


def _fake_run(calls):
    def run(cfg, directory, resume):
        calls.append((cfg.algorithm.name, cfg.privacy.mode, cfg.seed))
        directory.mkdir(parents=True)
        summary = {
            "rounds": 2,
            "global": {"loss": 1.0, "bleu": 40.0 + cfg.seed},
            "proxy": {"loss": 2.0, "bleu": 10.0},
            "wall_s": 1.0,
        }
        (directory / "summary.json").write_text(json.dumps(summary))
        (directory / "metrics.jsonl").write_text(json.dumps({"round": 2, "clients": [3, 1]}) + "\n")
        return summary

    return run


def _fake_attack(attacks):
    def attack(directory, settings):
        attacks.append((directory, settings))
        theta = json.loads((directory / "summary.json").read_text())["global"]["bleu"]
        scores = {"theta": {"bleu": theta}, "proxy": {"bleu": 10.0}, "keep": {"bleu": 30.0}, "alone": {"bleu": 20.0}}
        taken = {k: {"bleu": (v["bleu"] - 20.0) / (theta - 20.0)} for k, v in scores.items() if k not in ("theta", "alone")}
        report = {
            "client": 1,
            "colluders": [1, 3],
            "finetune_steps": [3],
            "requested": {"collude": 2, "steps": [3]},
            "scores": scores,
            "value_taken": taken,
        }
        (directory / "attack-client-1.json").write_text(json.dumps(report))  # the last round's first client, lowest id first
        return report

    return attack


def test_runs_go_seed_by_seed_and_only_runs_the_points_asked_for(tmp_path):
    sweep = load_sweep(_write(tmp_path, SWEEP), [])
    assert [p.seed for p in sweep.points] == [0, 0, 0, 0, 1, 1, 1, 1]
    calls = []
    out = tmp_path / "out"
    run_sweep(sweep, out, _fake_run(calls), echo=lambda _: None, only=["FFA / none"])
    assert calls == [("ffa_lora", "none", 0), ("ffa_lora", "none", 1)]
    run_sweep(sweep, out, _fake_run(calls), echo=lambda _: None, only=["LoRA / none seed 1"])
    assert calls[-1] == ("fedavg_lora", "none", 1)
    assert len(json.loads((out / SWEEP_JSON).read_text())["runs"]) == 3  # every finished point is tabulated


def test_an_only_that_picks_no_point_is_refused_naming_the_points_and_nothing_is_written(tmp_path, capsys):
    from fedlpp.cli import main

    path = _write(tmp_path, SWEEP)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--only 'ZZZ', 'YYY' match none of the sweep's points: 'LoRA / none seed 0', "):
        run_sweep(load_sweep(path, []), out, _fake_run([]), echo=lambda _: None, only=["ZZZ", "YYY"])
    assert main(["sweep", str(path), "--out", str(out), "--only", "ZZZ"]) == 2
    said = capsys.readouterr()
    assert "runs into" not in said.out and "--only 'ZZZ' matches none" in said.err
    assert not out.exists()


def test_a_missing_model_folder_in_a_sweep_is_refused_naming_the_point_before_anything_is_written(tmp_path, capsys):
    from fedlpp.cli import main

    out = tmp_path / "out"
    assert main(["sweep", str(_write(tmp_path, SWEEP)), f"model.name={tmp_path / 'gone'}", "--out", str(out)]) == 1
    said = capsys.readouterr()
    assert (
        "runs into" not in said.out
        and f"sweep point LoRA / none seed 0: model.name: no such folder: {tmp_path / 'gone'}" in said.err
    )
    assert not out.exists()


def test_an_only_text_of_another_sweep_beside_one_of_this_sweep_runs_this_sweeps_points(tmp_path):
    """One set of --only texts for two sweeps sharing a folder: each runs its own points."""
    calls = []
    run_sweep(
        load_sweep(_write(tmp_path, SWEEP), []),
        tmp_path / "out",
        _fake_run(calls),
        echo=lambda _: None,
        only=["FFA / none seed 0", "other sweep"],
    )
    assert calls == [("ffa_lora", "none", 0)]


def test_every_run_is_attacked_once_and_the_attack_table_shows_the_share_taken(tmp_path):
    sweep = load_sweep(_write(tmp_path, ATTACKED), ["fl.num_clients=4"])
    assert sweep.attack is not None and (sweep.attack.client, sweep.attack.collude, sweep.attack.steps) == ("last", 2, (3,))
    attacks, out = [], tmp_path / "out"
    run_sweep(sweep, out, _fake_run([]), echo=lambda _: None, attack=_fake_attack(attacks))
    assert len(attacks) == 8
    run_sweep(sweep, out, _fake_run([]), echo=lambda _: None, attack=_fake_attack(attacks))
    assert len(attacks) == 8  # kept: the reports are in the run directories
    record = json.loads((out / SWEEP_JSON).read_text())["runs"][0]
    assert record["attack"]["value_taken"]["keep"]["bleu"] == 0.5
    md = (out / SWEEP_MD).read_text()
    assert "| LoRA | none | 40.50 ± 0.71 | 10.00 ± 0.00 | 30.00 ± 0.00 | 20.00 ± 0.00 | -0.49 ± 0.02 | 0.49 ± 0.02 | 2 |" in md


def test_only_also_limits_which_runs_are_attacked_so_two_sweeps_can_share_a_folder(tmp_path):
    sweep = load_sweep(_write(tmp_path, ATTACKED), ["fl.num_clients=4"])
    attacks, out = [], tmp_path / "out"
    run_sweep(sweep, out, _fake_run([]), echo=lambda _: None, only=["FFA / none seed 0"])  # trained, not attacked
    run_sweep(sweep, out, _fake_run([]), echo=lambda _: None, attack=_fake_attack(attacks), only=["LoRA / none seed 0"])
    assert [d.name for d, _ in attacks] == ["seed0"] and "LoRA" in str(attacks[0][0])  # the FFA run may be another's to attack
    runs = json.loads((out / SWEEP_JSON).read_text())["runs"]
    assert [("attack" in r) for r in runs] == [True, False]  # both tabulated; the attacked one with its report
    run_sweep(sweep, out, _fake_run([]), echo=lambda _: None, attack=_fake_attack(attacks), only=["FFA / none seed 0"])
    assert len(attacks) == 2  # its own sweep attacks it; the LoRA report is kept


@pytest.mark.parametrize(
    "attack, message",
    [
        ("client = -1", "sweep.attack.client"),
        ("collude = 0", "sweep.attack.collude"),
        ("steps = [0]", "sweep.attack.steps"),
        ("rounds = 2", "unknown key"),
        ("client = 9", "not a client of every run"),
    ],
)
def test_a_bad_attack_table_is_refused(tmp_path, attack, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(tmp_path, SWEEP.replace("[sweep.axes.privacy]", f"[sweep.attack]\n{attack}\n[sweep.axes.privacy]")), [])


def test_the_attack_table_takes_every_runs_columns():
    from fedlpp.experiments.sweep import attack_table

    def record(variant, steps):
        scores = {"theta": {"bleu": 50.0}, "alone": {"bleu": 30.0}, f"finetune-{steps}": {"bleu": 40.0}}
        return {"variant": variant, "attack": {"scores": scores, "value_taken": {f"finetune-{steps}": {"bleu": 0.5}}}}

    md = attack_table(("variant",), [record("E=5", 5), record("E=10", 10)])
    assert "| E=5 | 50.00 | 30.00 | 40.00 | – | 0.50 | – | 1 |" in md
    assert "| E=10 | 50.00 | 30.00 | – | 40.00 | – | 0.50 | 1 |" in md
