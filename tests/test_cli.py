"""The command line as a user types it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedlpp import rundir
from fedlpp.cli import main

SMOKE = "model.name=tiny-llama algorithm.name=fedlpp quant.bits=2 fl.rounds=2 fl.num_clients=4 fl.clients_per_round=2 seed=0"


def test_bad_config_is_refused_before_anything_loads(tmp_path: Path, capsys):
    code = main(["run", "algorithm.name=fedprox", "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "algorithm.name: got 'fedprox'; valid choices are" in err
    assert not (tmp_path / "r").exists(), "nothing is written for a refused config"


def test_missing_data_path_is_a_clear_error(tmp_path: Path, capsys):
    code = main(
        [
            "run",
            "model.name=tiny-llama",
            "data.task=e2e",
            f"data.path={tmp_path / 'nope'}",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    assert code == 1
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.toml").exists(), "a failed start leaves nothing that blocks --out"


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["run", "model.name=tiny-llama", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_resume_needs_a_run_directory(tmp_path: Path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


@pytest.mark.integration
def test_the_issue_smoke_command_works_as_written(tmp_path: Path, capsys):
    out = tmp_path / "smoke"
    assert main(["run", *SMOKE.split(), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "global" in printed and "proxy" in printed and "FedAvg+LoRA" in printed
    rows = [json.loads(line) for line in (out / rundir.METRICS).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert {"round", "bytes_down", "bytes_up", "wall_s", "global", "proxy"} <= set(rows[-1])
    assert (out / rundir.ADAPTER / "adapter_config.json").is_file()
    assert (out / rundir.SUMMARY).is_file() and (out / rundir.CHECKPOINT).is_file()
    # Only fl.rounds may change on resume; anything else would break "same result".
    assert main(["run", "--resume", str(out), "train.lr=0.5"]) == 2
    assert "train.lr: cannot change when resuming" in capsys.readouterr().err
    assert main(["run", "--resume", str(out), "fl.rounds=1", "--quiet"]) == 2
    assert "cannot shrink it" in capsys.readouterr().err


def test_progress_redirected_to_a_log_is_plain_lines(tmp_path: Path, capsys):
    """stderr is not a terminal here: rounds, client steps and evaluation show as lines, no escape codes."""
    assert main(["run", *SMOKE.split(), "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"run directory: {tmp_path / 'r'}\n")  # said before the run, not only at its end
    err = captured.err
    assert "\x1b[" not in err and "\r" not in err
    assert "round 1 client steps: 0/" in err and "rounds: 1/2" in err and "rounds: 2/2 (" in err
    bar = re.search(r"round 2 evaluation, global then proxy \((\d+) records: loss, then generation\): 0/(\d+)", err)
    assert bar is not None, err
    assert int(bar[2]) == 2 * 2 * int(bar[1]) > 0, "each record's loss and generation, for global and proxy"


def test_eval_scores_the_saved_adapter_and_its_proxy_and_writes_predictions(tmp_path: Path, capsys):
    out = tmp_path / "r"
    assert main(["run", *SMOKE.split(), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["global"] == pytest.approx(summary["global"]) and report["proxy"] == pytest.approx(
        summary["proxy"]
    )  # the run's own final scores
    lines = (out / "predictions" / "global.txt").read_text().splitlines()
    assert len(lines) == report["examples"] and (out / "predictions" / "proxy.txt").is_file()
    assert "global" in capsys.readouterr().out
    assert set(report["official"]["global"]) == {
        "bleu",
        "rouge_l",
    }  # weather: the generic set (e2e: BLEU, NIST, METEOR, ROUGE-L, CIDEr)
    assert main(["eval", str(out), "data.num_eval=5", "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["examples"] == 5
    assert main(["eval", str(out), "fl.rounds=9", "--quiet"]) == 2
    assert "fl.rounds: an evaluation cannot change it" in capsys.readouterr().err


def test_beam_search_decoding_runs_and_eval_can_change_it(tmp_path: Path):
    out = tmp_path / "r"
    assert (
        main(
            [
                "run",
                *SMOKE.split(),
                "eval.num_beams=3",
                "eval.length_penalty=0.9",
                "eval.no_repeat_ngram_size=2",
                "eval.max_new_tokens=6",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["eval", str(out), "eval.num_beams=1", "eval.no_repeat_ngram_size=0", "data.num_eval=4", "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["changed"] == {
        "data.num_eval": 4,
        "eval.num_beams": 1,
        "eval.no_repeat_ngram_size": 0,
    }


def test_report_compares_runs_named_by_what_differs_and_plots_them(tmp_path: Path, capsys):
    plain, private = tmp_path / "plain", tmp_path / "private"
    common = [
        "model.name=tiny-llama",
        "algorithm.name=ffa_lora",
        "fl.rounds=2",
        "fl.num_clients=3",
        "fl.clients_per_round=3",
        "eval.every=1",
        "eval.max_new_tokens=4",
        "data.num_eval=8",
        "train.batch_size=8",
        "train.lr=1e-3",
        "train.weight_decay=0.01",
    ]  # pinned: dp_sgd would fill in its own
    assert main(["run", *common, "--out", str(plain), "--quiet"]) == 0
    assert (plain / "report.md").is_file() and (plain / "metrics.png").is_file()  # every run writes its own report
    assert main(["run", *common, "privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "--out", str(private), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(plain), str(private), "--out", str(tmp_path / "both")]) == 0
    text = (tmp_path / "both" / "report.md").read_text()
    assert (
        "| privacy.mode=none, privacy.noise_multiplier=0.0 | 2 |" in text
        and "| privacy.mode=dp_sgd, privacy.noise_multiplier=1.0 | 2 |" in text
    )
    for png in ("metrics.png", "bytes.png", "epsilon.png"):
        assert (tmp_path / "both" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_a_bad_model_name_or_data_path_is_refused_before_anything_is_printed_or_loaded(tmp_path: Path, capsys):
    assert main(["run", "model.name=smolm2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "run directory" not in out and "model.name: 'smolm2' is not a short name (smollm2-135m" in err
    assert main(["run", "model.name=./no-such-model", "--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert "model.name: no such folder: ./no-such-model" in capsys.readouterr().err


def test_what_is_no_model_or_no_device_here_is_refused_before_the_run_directory_is_printed(tmp_path: Path, capsys):
    import torch

    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "configs").mkdir()
    cases = [
        ([f"model.name={tmp_path / 'notes.txt'}"], "is a file; name the model's folder"),
        ([f"model.name={tmp_path / 'configs'}"], "has no config.json, so it is no model checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train.device=cuda"], "train.device: 'cuda' was asked for but torch sees no CUDA GPU"))
    for overrides, message in cases:
        assert main(["run", *overrides, "--out", str(tmp_path / "r"), "--quiet"]) == 2, overrides
        out, err = capsys.readouterr()
        assert "run directory" not in out and message in err, err
        assert not (tmp_path / "r").exists()


def test_a_relative_model_folder_missing_where_a_command_runs_says_where_it_looked(tmp_path: Path, monkeypatch):
    """A run's config keeps ./my-model as given: eval, attack or --resume started elsewhere must say why it is not found."""
    from fedlpp.models.source import check_model_name

    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    check_model_name("./my-model")
    monkeypatch.chdir(tmp_path / "my-model")
    with pytest.raises(FileNotFoundError, match=rf"no such folder: \./my-model \(.*here {tmp_path / 'my-model'};.*started in"):
        check_model_name("./my-model")
    with pytest.raises(FileNotFoundError) as absolute:
        check_model_name(str(tmp_path / "gone"))
    assert str(absolute.value) == f"model.name: no such folder: {tmp_path / 'gone'}", "no word on relative paths"
    monkeypatch.setenv("HOME", str(tmp_path))
    check_model_name("~/my-model")  # ~ is the user's home, as the data loaders read it


def test_a_local_model_folder_names_the_default_run_directory_by_its_own_name(tmp_path: Path):
    from fedlpp.cli.main import default_out
    from fedlpp.config import load_config

    (tmp_path / "my-model").mkdir()
    out = default_out(load_config(None, [f"model.name={tmp_path / 'my-model'}"]))
    assert out.parent == Path("runs") and out.name.startswith("fedlpp-my-model-")
    assert default_out(load_config(None, ["model.name=meta-llama/Llama-3.2-1B"])).name.startswith(
        "fedlpp-meta-llama_Llama-3.2-1B-"
    )


def test_eval_attack_and_report_on_a_folder_without_a_run_say_no_run_here(tmp_path: Path, capsys):
    for command in (["eval", str(tmp_path)], ["attack", str(tmp_path)], ["report", str(tmp_path)]):
        assert main(command) == 2, command
        assert f"no run here: {tmp_path} has no config.toml" in capsys.readouterr().err


def test_config_show_says_where_each_value_came_from(tmp_path: Path, capsys):
    assert main(["config", "show", "--config", "configs/e2e_fedlpp_w2.toml", "fl.rounds=3"]) == 0
    lines, section = {}, ""
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            lines[f"{section}.{line.split(' = ')[0].strip()}"] = line
    assert lines["fl.rounds"].endswith("[override]")
    assert lines["quant.bits"].endswith("[file]")
    assert lines["uplink.bits"].endswith("[default]")
    assert lines["model.quantize"].endswith("[default]")
