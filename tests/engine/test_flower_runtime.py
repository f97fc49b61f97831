"""A real Flower deployment on 127.0.0.1: TLS SuperLink with node authentication, SuperNodes on their own data.

Every process the test starts runs in its own session and is stopped, whatever happens,
when ``LocalFederation`` is left; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.config import load_config, write_toml
from fedlpp.data.examples_file import write_examples
from fedlpp.engine import rundir
from fedlpp.engine.flower.deploy import LocalFederation, make_keys
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import client_partitions, load_task_data

pytestmark = pytest.mark.integration

FEDLPP = [sys.executable, "-m", "fedlpp.cli"]
EXPERIMENT = [
    "model.name=tiny-llama", "model.max_length=48", "data.num_train=60", "data.num_eval=3", "algorithm.name=fedlpp",
    "fl.rounds=2", "fl.num_clients=2", "fl.clients_per_round=2", "fl.local_steps=3", "train.batch_size=4",
    "train.lr=0.02", "eval.every=1", "eval.max_new_tokens=3", "seed=0", "flower.connect_timeout=60", "flower.round_timeout=120",
]


def test_a_deployed_fedlpp_run_equals_the_local_engine_and_refuses_an_unregistered_node(tmp_path):
    cfg = load_config(None, EXPERIMENT)
    write_toml(cfg, tmp_path / "experiment.toml")
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
    with LocalFederation(tmp_path / "federation", nodes=3) as federation:
        federation.start_superlink()
        federation.start_node(0, tmp_path / "client-0.jsonl", client_id=0)
        federation.start_node(1, tmp_path / "client-1.jsonl", client_id=1)
        rogue = federation.start_node(2, tmp_path / "client-1.jsonl", register=False)
        out, audit = tmp_path / "run", tmp_path / "audit"
        submit = subprocess.run([*FEDLPP, "deploy", "run", "--superlink", federation.connection.superlink, "--ca",
                                 str(federation.ca), "--config", str(tmp_path / "experiment.toml"), "--out", str(out),
                                 "--audit", str(audit)], capture_output=True, text=True, timeout=240)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "finished:completed" in submit.stdout
        assert rogue.wait(timeout=30) != 0, "the unregistered node was refused and stopped"
        assert "Failed to activate SuperNode" in federation.log("node-2")
        processes = list(federation.processes)
    assert all(p.poll() is not None for p in processes), "every process the test started has stopped"

    run_experiment(cfg, tmp_path / "local", progress=False)
    a, b = rundir.load_checkpoint(tmp_path / "local")[0], rundir.load_checkpoint(out)[0]
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert [r["clients"] for r in rundir.read_metrics(out)] == [[0, 1], [0, 1]]

    # Model privacy on the wire: every broadcast the ServerApp sent holds codes and scales only.
    payloads = sorted(audit.glob("*.payload.bin"))
    assert len(payloads) == 4
    theta_1 = _round_one_adapter(tmp_path, cfg)
    needles = [t.reshape(-1)[:4].numpy().tobytes() for n, t in theta_1.items() if ".lora_B." in n and torch.count_nonzero(t)]
    for path in sorted(audit.iterdir()):
        raw = path.read_bytes()
        assert not any(needle in raw for needle in needles), path.name
    for path in payloads:
        tensors, _ = wire.decode(path.read_bytes(), rnd.BROADCAST)
        assert {k: t.dtype for k, t in tensors.items()} == {"codes": torch.uint8, "scales": torch.float16}


def _round_one_adapter(tmp_path: Path, cfg) -> dict[str, torch.Tensor]:
    one = load_config(None, [*EXPERIMENT, "fl.rounds=1"])
    run_experiment(one, tmp_path / "round-one", progress=False)
    return rundir.load_checkpoint(tmp_path / "round-one")[0]


@pytest.mark.parametrize(("content", "message"), [(None, "no such data file"), ('{"prompt": 3}\n', "line 1")])
def test_a_supernode_with_missing_or_malformed_data_fails_at_start(tmp_path, content, message):
    keys = make_keys(tmp_path / "keys", nodes=1)
    data = tmp_path / "mine.jsonl"
    if content is not None:
        data.write_text(content)
    done = subprocess.run([*FEDLPP, "deploy", "supernode", "--superlink", "127.0.0.1:9", "--ca", str(tmp_path / "keys" / "ca.crt"),
                           "--key", str(keys[0]), "--data", str(data)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and message in done.stderr and str(data) in done.stderr
