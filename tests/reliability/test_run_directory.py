"""A run directory cannot be corrupted: damage is refused by name and nothing changes (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedlpp import rundir
from fedlpp.cli import main
from fedlpp.config import load_config, write_toml
from fedlpp.engine.local import run_experiment

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=3",
    "algorithm.name=fedlpp",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=2",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=3",
    "eval.max_new_tokens=3",
    "fl.rounds=3",
    "seed=0",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(load_config(None, TINY), out, progress=False)
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def resume_refused(out: Path, capsys, *match: str) -> None:
    """``fedlpp run --resume`` exits non-zero naming the problem, and the directory is byte-for-byte unchanged."""
    before = snapshot(out)
    assert main(["run", "--resume", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    for text in match:
        assert text in err, err
    assert snapshot(out) == before


def test_a_damaged_metrics_line_stops_the_resume_instead_of_wiping_the_history(run, capsys):
    lines = (run / rundir.METRICS).read_text().splitlines()
    (run / rundir.METRICS).write_text("\n".join(["{damaged", *lines[1:]]) + "\n")
    resume_refused(run, capsys, "metrics.jsonl, line 1", "not valid JSON")


def test_a_metrics_row_that_is_not_an_object_or_out_of_order_is_refused(run, capsys):
    lines = (run / rundir.METRICS).read_text().splitlines()
    (run / rundir.METRICS).write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    resume_refused(run, capsys, "line 2", "expected a JSON object")
    (run / rundir.METRICS).write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    resume_refused(run, capsys, "line 2", "does not follow round 2")


def test_a_missing_checkpoint_is_refused_not_restarted_from_round_0(run, capsys):
    (run / rundir.CHECKPOINT).unlink()
    resume_refused(run, capsys, "checkpoint.safetensors is missing", "restart the run")


@pytest.mark.parametrize("damage", ["truncated", "random", "no round", "wrong shape"])
def test_a_damaged_or_foreign_checkpoint_is_refused_by_name(run, capsys, damage):
    path = run / rundir.CHECKPOINT
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(
            torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
        )
    else:
        tensors = load_file(str(path))
        if damage == "wrong shape":
            name = sorted(tensors)[0]
            tensors[name] = torch.zeros(3, 3)
        save_file(tensors, str(path), metadata=None if damage == "no round" else {"round": "3"})
    expected = {
        "truncated": "is damaged",
        "random": "is damaged",
        "no round": "no valid 'round'",
        "wrong shape": "this run's adapter has",
    }
    resume_refused(run, capsys, "checkpoint.safetensors", expected[damage])


def test_resuming_with_an_edited_config_is_refused(run, capsys):
    write_toml(load_config(None, [*TINY, "algorithm.name=fedavg_lora"]), run / rundir.CONFIG)
    resume_refused(run, capsys, "algorithm.name differs from the configuration the checkpoint was made with")


def test_a_second_process_on_a_run_directory_is_refused_and_a_dead_holders_lock_recovered(run, capsys):
    with rundir.exclusive(run):
        resume_refused(run, capsys, f"is in use by process {os.getpid()}")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from fedlpp import rundir\n"
            "with rundir.exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        resume_refused(run, capsys, f"is in use by process {holder.pid}")
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    assert (run / rundir.LOCK).read_text() == str(holder.pid)  # a dead holder's pid is still written there
    assert main(["run", "--resume", str(run), "--quiet", "fl.rounds=4"]) == 0
    assert [r["round"] for r in rundir.read_metrics(run)] == [1, 2, 3, 4]


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / rundir.METRICS).write_text('{"round": 1}\n')
    before = snapshot(out)
    assert main(["run", *TINY, "--out", str(out), "--quiet"]) != 0
    assert "already holds a run (metrics.jsonl)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_failed_checkpoint_write_is_one_error_and_the_last_good_checkpoint_stays(run, capsys, monkeypatch):
    before = (run / rundir.CHECKPOINT).read_bytes()

    def refuse(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: Operation not permitted (os error 1)")  # safetensors' kind

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)  # rundir imports it where it writes
    assert main(["run", "--resume", str(run), "--quiet", "fl.rounds=4"]) != 0
    err = capsys.readouterr().err
    assert "could not write" in err and "checkpoint.safetensors" in err and "Traceback" not in err
    assert (run / rundir.CHECKPOINT).read_bytes() == before
    assert not (run / (rundir.CHECKPOINT + ".tmp")).exists()


def test_a_sweep_label_is_a_name_not_a_path(tmp_path):
    from fedlpp.config import ConfigError
    from fedlpp.experiments.sweep import load_sweep

    path = tmp_path / "sweep.toml"
    path.write_text('[sweep]\nseeds = [0]\n[sweep.axes.x]\n".." = []\n')
    with pytest.raises(ConfigError, match="is not a name"):
        load_sweep(path, [])


def test_the_checkpoint_records_the_configuration(finished):
    record = json.loads(rundir.load_checkpoint_metadata(finished)[rundir.CONFIG_KEY])
    assert record["algorithm"]["name"] == "fedlpp" and "rounds" not in record["fl"]


def test_a_new_run_that_fails_in_its_first_round_leaves_nothing_and_the_same_out_works(tmp_path, monkeypatch, capsys):
    from fedlpp.engine import local

    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise RuntimeError("a client failed")

    monkeypatch.setattr(local, "client_step", fail)
    with pytest.raises(RuntimeError, match="a client failed"):
        run_experiment(load_config(None, TINY), out, progress=False)
    assert not out.exists()
    monkeypatch.undo()
    run_experiment(load_config(None, [*TINY, "fl.rounds=1"]), out, progress=False)
    assert [r["round"] for r in rundir.read_metrics(out)] == [1]


def test_a_refused_new_run_leaves_the_run_it_found_untouched(run, tmp_path):
    """The refusal comes before anything is written or cleaned up, whichever engine serves."""
    from fedlpp.engine.local import local_transport
    from fedlpp.engine.server import serve
    from fedlpp.engine.setup import build_run

    (run / rundir.CHECKPOINT).unlink()  # a run without a checkpoint: the case cleanup would have wiped
    before = snapshot(run)
    local_run = build_run(load_config(None, TINY))
    with pytest.raises(rundir.RunDirError, match="already holds a run"):
        serve(
            local_run.server,
            local_transport(local_run),
            run,
            resume=False,
            progress=False,
        )
    assert snapshot(run) == before


def test_a_kill_between_round_1s_metrics_and_its_checkpoint_resumes(run):
    (run / rundir.CHECKPOINT).unlink()
    (run / rundir.SUMMARY).unlink()
    lines = (run / rundir.METRICS).read_text().splitlines()
    (run / rundir.METRICS).write_text(lines[0] + "\n")  # round 1 recorded, its checkpoint never written
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert [r["round"] for r in rundir.read_metrics(run)] == [1, 2, 3]


def test_a_dp_checkpoint_without_its_privacy_ledger_is_refused(tmp_path, capsys):
    out = tmp_path / "dp"
    dp = ["algorithm.name=ffa_lora", "privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "fl.rounds=1"]
    run_experiment(load_config(None, [*TINY, *dp]), out, progress=False)
    tensors = load_file(str(out / rundir.CHECKPOINT))
    # as an older fedlpp wrote it (no digest): with a digest, the missing ledger is refused as damage first
    metadata = {k: v for k, v in rundir.load_checkpoint_metadata(out).items() if k not in ("privacy_ledger", rundir.DIGEST_KEY)}
    save_file(tensors, str(out / rundir.CHECKPOINT), metadata=metadata)
    resume_refused(out, capsys, "has no privacy ledger")


def test_every_file_of_a_run_gets_the_usual_permissions(run):
    """Those that do not hold theta (the checkpoint and adapter/ are the owner's alone: tests/security)."""
    import os
    import stat

    expected = 0o666 & ~_current_umask()
    for path in [run / rundir.METRICS, run / rundir.SUMMARY, run / rundir.CONFIG]:
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path.name


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_run_saved_before_model_pooling_existed_keeps_reading_the_cls_pooler(tmp_path):
    """Its classifier head was trained on BERT's pooler; the new default (auto: mean for minilm-l6) would change it."""
    write_toml(load_config(None, ["model.name=minilm-l6", "data.task=sst2"]), tmp_path / "config.toml")
    assert rundir.load_run_config(tmp_path, []).model.pooling == "auto"  # a run that recorded the key keeps it
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(text.replace('pooling = "auto"\n', ""))
    assert rundir.load_run_config(tmp_path, []).model.pooling == "cls"
    old = rundir.resumed_config(tmp_path, ["fl.rounds=9"])
    assert old.model.pooling == "cls"
    record = json.loads(rundir.config_record(old))
    del record["model"]["pooling"]  # its checkpoint, too, was saved before the key
    rundir.save_checkpoint(tmp_path, {"w": torch.zeros(2)}, 1, extra={rundir.CONFIG_KEY: json.dumps(record)})
    rundir.check_checkpoint_config(tmp_path, old)  # resumes as it was
    with pytest.raises(rundir.RunDirError, match="model.pooling differs"):
        rundir.check_checkpoint_config(tmp_path, load_config(None, ["model.name=minilm-l6", "data.task=sst2"]))
