"""The run directory is its owner's: no link is written through, θ is owner-only, damage and edits are refused, and a
refused command writes nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedlpp import rundir
from fedlpp.cli import main
from fedlpp.config import load_config
from fedlpp.engine.local import run_experiment

pytestmark = pytest.mark.integration

TINY = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=120",
    "data.num_eval=3",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.local_steps=2",
    "train.batch_size=4",
    "eval.every=3",
    "eval.max_new_tokens=3",
    "fl.rounds=3",
    "seed=0",
]
DP = [*TINY, "algorithm.name=ffa_lora", "privacy.mode=dp_sgd", "privacy.noise_multiplier=1.0", "train.batch_size=4"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(load_config(None, TINY), out, progress=False)
    return out


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("private") / "run"
    run_experiment(load_config(None, DP), out, progress=False)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != rundir.LOCK}


def refused(args: list[str], out: Path, capsys, text: str) -> None:
    """The command exits non-zero naming the problem, and the run directory is byte-for-byte as it was."""
    before = snapshot(out)
    assert main(args) != 0
    assert text in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("name", [rundir.LOCK, rundir.METRICS, rundir.CONFIG, rundir.CHECKPOINT, rundir.BROADCASTS])
def test_a_link_planted_where_the_run_writes_is_refused_and_its_target_untouched(finished, tmp_path, capsys, name):
    run = _copy(finished, tmp_path)
    target = tmp_path / "outside"
    target.write_text("the owner's other file\n")
    if (run / name).is_dir():
        shutil.rmtree(run / name)
    else:
        (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    refused(["run", "--resume", str(run), "fl.rounds=4", "--quiet"], run, capsys, "is a symbolic link")
    assert target.read_text() == "the owner's other file\n"


def test_the_files_that_hold_theta_are_the_owners_alone(finished):
    for path in [finished / rundir.CHECKPOINT, *(p for p in (finished / rundir.ADAPTER).rglob("*") if p.is_file())]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_flipped_bit_in_the_checkpoint_is_refused_on_resume_and_by_eval(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    tensors = load_file(str(run / rundir.CHECKPOINT))
    with safe_open(str(run / rundir.CHECKPOINT), framework="pt") as f:
        metadata = f.metadata()
    name = sorted(tensors)[0]
    tensors[name].view(-1).view(torch.int32)[0] ^= 1  # one bit of one value
    save_file(tensors, str(run / rundir.CHECKPOINT), metadata=metadata)
    refused(["run", "--resume", str(run), "fl.rounds=4", "--quiet"], run, capsys, "checkpoint.safetensors is damaged")
    assert main(["eval", str(run), "--quiet"]) != 0
    assert "checkpoint.safetensors is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("edit", ["value", "missing round", "another run's row"])
def test_a_metrics_history_that_does_not_match_the_checkpoint_is_refused(finished, tmp_path, capsys, edit):
    run = _copy(finished, tmp_path)
    rows = rundir.read_metrics(run)
    if edit == "value":
        rows[0]["bytes_up"] -= 1
    elif edit == "missing round":
        del rows[1]
    else:
        rows[0]["clients"] = [c + 1 for c in rows[0]["clients"]]
    (run / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(["run", "--resume", str(run), "fl.rounds=4", "--quiet"], run, capsys, "metrics.jsonl does not match")


def test_a_refused_resume_leaves_config_toml_as_it_was(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    lines = (run / rundir.METRICS).read_text().splitlines()
    (run / rundir.METRICS).write_text("\n".join(["{damaged", *lines[1:]]) + "\n")
    refused(["run", "--resume", str(run), "fl.rounds=5", "--quiet"], run, capsys, "not valid JSON")  # not rounds = 5


def test_a_damaged_last_metrics_row_is_reported_not_dropped_silently(finished, tmp_path, caplog):
    run = _copy(finished, tmp_path)
    with (run / rundir.METRICS).open("a") as f:
        f.write('{"round": 4, "cut')
    assert [r["round"] for r in rundir.read_metrics(run)] == [1, 2, 3]
    assert "line 4: a row cut short" in caplog.text


def test_a_failed_new_run_in_an_existing_folder_leaves_nothing_behind(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["run", *TINY, "data.task=jsonl", f"data.path={tmp_path / 'empty.jsonl'}", "--out", str(out), "--quiet"]) != 0
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["run", *TINY, "data.task=jsonl", f"data.path={tmp_path / 'empty.jsonl'}", "--out", str(out), "--quiet"]) != 0
    assert list(out.iterdir()) == []  # no .lock either


def _rewrite_ledger(run: Path, edit) -> None:
    """An edited privacy ledger, saved as fedlpp would save it (with a fresh digest): only the ledger is a lie."""
    tensors = load_file(str(run / rundir.CHECKPOINT))
    metadata = rundir.load_checkpoint_metadata(run)
    ledger = json.loads(metadata["privacy_ledger"])
    edit(ledger)
    metadata["privacy_ledger"] = json.dumps(ledger)
    adapter = {n: t for n, t in tensors.items() if not n.startswith(rundir.SERVER_STATE_PREFIX)}
    extra = {k: v for k, v in metadata.items() if k not in ("round", rundir.DIGEST_KEY)}
    rundir.save_checkpoint(run, adapter, int(metadata["round"]), extra)


def _noisier_past(ledger: dict) -> None:
    """sigma raised in the ledger and in every step of its histories: the replay would agree, epsilon would drop."""
    ledger["noise_multiplier"] = 50.0
    for history in ledger["histories"].values():
        for step in history:
            step[0] = 50.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda led: led["histories"]["0"].pop(), "privacy ledger does not match the rounds"),
        (lambda led: led.update(noise_multiplier=0.0), "noise multiplier 0.0, which no run uses"),
        (lambda led: led.update(noise_multiplier=float("nan")), "noise multiplier nan, which no run uses"),
        (lambda led: led.update(noise_multiplier=50.0), "holds noise multiplier 50, but this run's config gives 1"),
        (_noisier_past, "holds noise multiplier 50, but this run's config gives 1"),
    ],
    ids=["fewer steps", "no noise", "nan", "another sigma", "another sigma everywhere"],
)
def test_epsilon_is_computed_from_the_rounds_run_never_read_back(private, tmp_path, capsys, edit, message):
    run = _copy(private, tmp_path)
    _rewrite_ledger(run, edit)
    refused(["run", "--resume", str(run), "fl.rounds=4", "--quiet"], run, capsys, message)


def test_an_untouched_private_run_resumes_and_epsilon_only_grows(private, tmp_path):
    run = _copy(private, tmp_path)
    before = rundir.read_metrics(run)[-1]["epsilon"]
    summary = run_experiment(rundir.resumed_config(run, ["fl.rounds=4"]), run, resume=True, progress=False)
    rows = rundir.read_metrics(run)
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[-1]["epsilon"] > before
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"]


def test_a_data_path_that_is_a_folder_or_a_fifo_is_named(tmp_path, capsys):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for path, text in ((tmp_path, "is a directory, not a file"), (fifo, "is not a regular file")):
        assert main(["run", *TINY, "data.task=jsonl", f"data.path={path}", "--out", str(tmp_path / "r"), "--quiet"]) != 0
        assert text in capsys.readouterr().err


def test_appends_and_the_lock_do_not_follow_a_link_planted_after_the_check(finished, tmp_path):
    """check_no_links refuses links up front; a link swapped in later is not followed by the appends or the lock."""
    run = _copy(finished, tmp_path)
    target = tmp_path / "outside"
    target.write_text("the owner's other file\n")
    (run / rundir.METRICS).unlink()
    (run / rundir.METRICS).symlink_to(target)
    with pytest.raises(rundir.RunDirError, match="could not append to"):
        rundir.append_metrics(run, {"round": 9})
    (run / rundir.METRICS).unlink()
    (run / rundir.LOCK).unlink(missing_ok=True)
    (run / rundir.LOCK).symlink_to(target)
    with pytest.raises(rundir.RunDirError), rundir.exclusive(run):
        pass
    assert target.read_text() == "the owner's other file\n"


def test_a_full_disk_names_the_file_keeps_the_last_good_round_and_the_run_resumes_later(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path)
    before = snapshot(run)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as disk:
        disk.setattr(os, "fsync", full)
        assert main(["run", "--resume", str(run), "fl.rounds=4", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert f"could not write {run / rundir.METRICS}: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert snapshot(run) == before, "round 3's checkpoint and metrics stay as they were"
    assert main(["run", "--resume", str(run), "fl.rounds=4", "--quiet"]) == 0, "with space again, the same command goes on"
    assert [r["round"] for r in rundir.read_metrics(run)] == [1, 2, 3, 4]
