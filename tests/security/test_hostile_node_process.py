"""A modified node as a real process in a TLS deployment on 127.0.0.1: the server's checks, not the node's code,
keep it from steering the secure aggregate (``hostile_node.py`` says what it changes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.config import load_config, write_toml
from fedlpp.data.examples_file import write_examples
from fedlpp.engine.flower.deploy import LocalDeployment
from fedlpp.engine.setup import client_partitions, load_task_data

pytestmark = pytest.mark.integration

HOSTILE_NODE = Path(__file__).with_name("hostile_node.py")
EXPERIMENT = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=60",
    "data.num_eval=3",
    "algorithm.name=fedavg_lora",
    "fl.rounds=3",
    "fl.num_clients=3",
    "fl.clients_per_round=3",
    "fl.local_steps=2",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=3",
    "eval.max_new_tokens=3",
    "secagg.enabled=true",
    "seed=0",
    "flower.connect_timeout=120",
    "flower.round_timeout=60",
]


def test_a_modified_node_process_cannot_move_the_secure_sum_and_the_run_goes_on(tmp_path):
    """Round 1: one node's value 100x its range; round 2: its forged weight. Both rounds are discarded, named in the
    metrics, and every broadcast of rounds 2 and 3 is round 1's; round 3 (the node honest again) is aggregated."""
    cfg = load_config(None, EXPERIMENT)
    write_toml(cfg, tmp_path / "experiment.toml")
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
    out, audit = tmp_path / "run", tmp_path / "audit"
    with LocalDeployment(tmp_path / "federation", nodes=3) as federation:
        federation.start_superlink()
        for k in (0, 1):
            federation.start_node(k, tmp_path / f"client-{k}.jsonl", client_id=k, threads=1)
        federation.start_node(2, tmp_path / "client-2.jsonl", client_id=2, threads=1, launcher=[str(HOSTILE_NODE)])
        submit = subprocess.run(
            federation.run_command(tmp_path / "experiment.toml", out, audit),
            capture_output=True,
            text=True,
            timeout=400,
        )
        hostile_log = federation.log("node-2")
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "model load " in hostile_log, "the modified node ran fedlpp's node and trained"
    rows = rundir.read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert "more than 3 survivors within secagg.clip_range=1 can add up to" in rows[0]["refused"]
    assert "a node sent values outside its range" in rows[0]["refused"]
    assert "the survivors' total weight 27 is outside [3, 3 x 1]" in rows[1]["refused"]
    assert "refused" not in rows[2] and rows[2]["secagg_survivors"] == [0, 1, 2]

    sent = [_broadcast(audit, round_) for round_ in (1, 2, 3)]
    assert sent[0].keys() == sent[1].keys() == sent[2].keys()
    assert all(torch.equal(sent[0][n], later[n]) for later in sent[1:] for n in sent[0]), "the refused rounds changed nothing"
    final = rundir.load_checkpoint(out)[0]
    assert any(torch.count_nonzero(final[n]) for n in final if ".lora_B." in n), "round 3 was aggregated"


def _broadcast(audit: Path, round_: int) -> dict[str, torch.Tensor]:
    """The adapter the ServerApp sent every node to train ``round_`` on (one for all, as the audit copies show)."""
    payloads = set()
    for fields in audit.glob("*-train-node*.json"):
        if json.loads(fields.read_text())["round"] == round_:
            payloads.add(audit.joinpath(fields.name.replace(".json", ".payload.bin")).read_bytes())
    assert len(payloads) == 1, f"round {round_}: {len(payloads)} different broadcasts"
    return wire.decode(payloads.pop(), rnd.BROADCAST)[0]
