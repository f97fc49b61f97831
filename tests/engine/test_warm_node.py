"""The pieces of a warm deployment node that need no network: the shortened waits, checked against the pinned Flower
source; the app check; and the one data format a node and ``data.task=jsonl`` share."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import zipfile

import pytest

from fedlpp.data.examples_file import ExamplesFileError, line_of, read_examples, write_examples
from fedlpp.data.jsonl import load_jsonl
from fedlpp.data.schema import Example
from fedlpp.engine.flower import pinned
from fedlpp.engine.flower.messages import REPLY_POLL
from fedlpp.engine.flower.node import APP_DIR, NodeError, check_app, fedlpp_app, secret_pipe, task_poll_seconds


def test_the_installed_flower_still_holds_the_waits_fedlpp_shortens():
    """Fails the day flwr's SuperNode loop or object pull changes: then the patches in pinned.py must be re-read."""
    pinned.check_flower()


def test_a_changed_flower_is_refused(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.42.0")
    with pytest.raises(pinned.FlowerChanged, match="flwr 1.42.0 is installed"):
        pinned.check_flower()


def test_the_supernode_polls_fast_after_a_message_and_backs_off_to_the_cap_when_idle(monkeypatch):
    slept, clock = [], [0.0]
    monkeypatch.setattr(pinned.time, "sleep", slept.append)
    monkeypatch.setattr(pinned.time, "monotonic", lambda: clock[0])
    waits = pinned.short_waits(0.25)
    for _ in range(8):
        waits.sleep(3)  # Flower's idle wait
    for elapsed in (0.0, 2.0, 30.0):
        clock[0] = 100 + elapsed
        waits.sleep(0.5)  # Flower's wait for a reply: a message is being answered (since t=100)
    waits.sleep(3)
    clock[0] = 200
    waits.sleep(0.5)
    assert slept[0] == pinned.FIRST_POLL_S and slept[1] == pytest.approx(1.5 * pinned.FIRST_POLL_S)
    assert max(slept[:8]) == 0.25 and slept[7] == 0.25
    assert slept[8:11] == [pinned.REPLY_POLL_S, pytest.approx(0.1), 0.5], "a twentieth of the time waited, at most 0.5 s"
    assert slept[11] == pinned.FIRST_POLL_S and slept[12] == pinned.REPLY_POLL_S, "each kind of wait restarts the other"


def test_the_object_pull_backoff_is_shortened_in_place_and_only_as_read(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils

    monkeypatch.setattr(inflatable_utils.pull_objects, "__kwdefaults__", dict(inflatable_utils.pull_objects.__kwdefaults__))
    monkeypatch.setattr(
        inflatable_utils.pull_and_inflate_object_from_tree,
        "__kwdefaults__",
        dict(inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__),
    )
    pinned.shorten_pull_backoff()
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.02
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == 7200
    pinned.shorten_pull_backoff()  # twice is harmless
    inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] = 5
    with pytest.raises(pinned.FlowerChanged, match="pull defaults"):
        pinned.shorten_pull_backoff()


@pytest.mark.parametrize(("raw", "ok"), [("", True), ("0.1", True), ("0", False), ("5", False), ("x", False)])
def test_poll_settings_are_checked(raw, ok):
    if ok:
        assert 0.01 <= pinned.poll_seconds({pinned.POLL_ENV: raw}) <= 3
        assert 0.01 <= task_poll_seconds({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": raw}) <= 60
    else:
        with pytest.raises(ValueError, match=pinned.POLL_ENV):
            pinned.poll_seconds({pinned.POLL_ENV: raw})
        if raw != "5":
            with pytest.raises(ValueError, match="FLWR_SUPEREXEC_TASK_POLL_INTERVAL"):
                task_poll_seconds({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": raw})


def test_the_server_looks_for_replies_every_twentieth_of_the_time_waited():
    assert REPLY_POLL.after(0) == 0.02 and REPLY_POLL.after(3) == pytest.approx(0.15) and REPLY_POLL.after(600) == 0.5


def _fab(pyproject: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", pyproject)
    return buffer.getvalue()


def test_a_warm_node_runs_only_fedlpps_own_app():
    ours = (APP_DIR / "pyproject.toml").read_text()
    expected = fedlpp_app()
    check_app(expected.fab_id, expected.version, _fab(ours), expected)
    with pytest.raises(NodeError, match="runs only fedlpp's app"):
        check_app("mallory/app", "1.0.0", _fab(ours), expected)
    evil = ours.replace("fedlpp.engine.flower.client_app:app", "evil.module:app")
    with pytest.raises(NodeError, match="evil.module:app"):
        check_app(expected.fab_id, expected.version, _fab(evil), expected)
    with pytest.raises(NodeError, match="cannot be read"):
        check_app(expected.fab_id, expected.version, b"not a zip", expected)


def test_the_supernode_reads_its_secret_through_a_pipe_with_flowers_own_loader():
    """No file holds the node's secret (a killed node left one in a temporary folder); a child reads it once."""
    secret = os.urandom(32)
    read = (
        "import sys; from flwr.supercore.auth import load_superexec_auth_secret as load; "
        "sys.stdout.buffer.write(load(sys.argv[1]))"
    )
    with secret_pipe(secret) as (path, fd):
        child = subprocess.run([sys.executable, "-c", read, path], pass_fds=(fd,), capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr.decode(errors="replace")
    assert child.stdout == secret
    with pytest.raises(ValueError, match="one pipe write"), secret_pipe(bytes(select.PIPE_BUF + 1)):
        pass


def test_partition_files_use_the_fields_data_task_jsonl_reads(tmp_path):
    generation = [
        Example("name[Aromi], food[Thai]", "Aromi serves Thai food.", group="Aromi", attributes=(("name", "Aromi"),))
    ] * 3 + [Example("name[Bibimbap]", "Bibimbap is cheap.")] * 3
    write_examples(tmp_path / "gen.jsonl", generation)
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"input", "output", "group", "name"}
    assert read_examples(tmp_path / "gen.jsonl") == generation
    task = load_jsonl(path=str(tmp_path / "gen.jsonl"), hf_id="", num_train=0, num_eval=1, seed=0)
    assert {e.prompt for e in task.train} | {e.prompt for e in task.eval} == {e.prompt for e in generation}

    classification = [Example(f"premise {k}", "", label=k % 2, group=str(k % 2), pair=f"hypothesis {k}") for k in range(6)]
    write_examples(tmp_path / "cls.jsonl", classification)
    assert set(json.loads((tmp_path / "cls.jsonl").read_text().splitlines()[0])) == {"text", "label", "pair", "group"}
    assert read_examples(tmp_path / "cls.jsonl") == classification
    task = load_jsonl(
        path=str(tmp_path / "cls.jsonl"), hf_id="", num_train=0, num_eval=0, seed=0, eval_path=str(tmp_path / "cls.jsonl")
    )
    assert {(e.prompt, e.pair, e.label) for e in task.train} == {(e.prompt, e.pair, e.label) for e in classification}
    assert line_of(Example("p", "t"))["output"] == "t"


def test_the_old_spelling_is_read_with_a_warning_and_a_file_holds_one_kind(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text('{"prompt": "a", "target": "b", "label": null, "group": ""}\n')
    with pytest.warns(FutureWarning, match="old spelling"):
        assert read_examples(path) == [Example("a", "b")]
    path.write_text('{"prompt": "c", "target": "", "label": 1}\n')
    with pytest.warns(FutureWarning, match="old spelling"):
        assert read_examples(path) == [Example("c", "", label=1, group="1")]
    path.write_text('{"prompt": "a"}\n')
    with pytest.warns(FutureWarning), pytest.raises(ExamplesFileError, match="line 1: 'output' must be a non-empty string"):
        read_examples(path)
    path.write_text('{"input": "a", "output": "b"}\n{"text": "c", "label": 0}\n')
    with pytest.raises(ExamplesFileError, match="line 2: a classification example in a file of generation examples"):
        read_examples(path)


def test_fedlpp_partition_writes_what_a_node_reads(tmp_path):
    from fedlpp.cli import main

    assert (
        main(["partition", "--out", str(tmp_path / "parts"), "model.name=tiny-llama", "data.num_train=40", "fl.num_clients=2"])
        == 0
    )
    first = json.loads((tmp_path / "parts" / "client-0.jsonl").read_text().splitlines()[0])
    assert {"input", "output"} <= set(first) and "prompt" not in first
    assert sum(len(read_examples(tmp_path / "parts" / f"client-{k}.jsonl")) for k in range(2)) == 40
