"""Flower for real: a deployment on 127.0.0.1 (TLS SuperLink with node authentication, SuperNodes on their own
data) and the simulation runtime (Ray).

Every process the test starts runs in its own session and is stopped, whatever happens,
when ``LocalDeployment`` is left; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from flower_harness import LoopbackGrid
from test_flower_engine import theta_needles

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.config import load_config, write_toml
from fedlpp.data.examples_file import write_examples
from fedlpp.engine import rundir
from fedlpp.engine.flower.deploy import DeployError, LocalDeployment, _quotable, make_keys, make_node_key
from fedlpp.engine.flower.server_app import serve_on_grid
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run, client_partitions, load_task_data

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
    with LocalDeployment(tmp_path / "federation", nodes=3) as federation:
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
        started = federation.descendants()
        assert len(started) > 3, "SuperLink, SuperNodes and the programs they started"
    assert not [p for p in started if _alive(p)], "every process has stopped"

    run_experiment(cfg, tmp_path / "local", progress=False)
    a, b = rundir.load_checkpoint(tmp_path / "local")[0], rundir.load_checkpoint(out)[0]
    print("MAXDIFF", max(float((a[n] - b[n]).abs().max()) for n in a), sorted(((float((a[n] - b[n]).abs().max()), n) for n in a), reverse=True)[:3])
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert [r["clients"] for r in rundir.read_metrics(out)] == [[0, 1], [0, 1]]

    # Model privacy on the wire: every broadcast the ServerApp sent holds codes and scales only.
    payloads = sorted(audit.glob("*.payload.bin"))
    assert len(payloads) == 4
    needles = theta_needles(_round_one_adapter(tmp_path, cfg)) + theta_needles(build_run(cfg).server.initial_adapter())
    for path in sorted(audit.iterdir()):
        raw = path.read_bytes()
        assert not any(needle in raw for needle in needles), path.name
    for path in payloads:
        tensors, _ = wire.decode(path.read_bytes(), rnd.BROADCAST)
        assert {k: t.dtype for k, t in tensors.items()} == {"codes": torch.uint8, "scales": torch.float16}


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _round_one_adapter(tmp_path: Path, cfg) -> dict[str, torch.Tensor]:
    one = load_config(None, [*EXPERIMENT, "fl.rounds=1"])
    run_experiment(one, tmp_path / "round-one", progress=False)
    return rundir.load_checkpoint(tmp_path / "round-one")[0]


@pytest.mark.parametrize(("content", "message"), [(None, "no such data file"), ('{"prompt": 3}\n', "line 1")])
def test_a_supernode_with_missing_or_malformed_data_fails_at_start(tmp_path, content, message):
    keys = make_keys(tmp_path / "keys", nodes=1)
    assert keys[0].stat().st_mode & 0o777 == 0o600 and (tmp_path / "keys" / "server.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(DeployError, match="never overwritten"):
        make_keys(tmp_path / "keys", nodes=1)
    with pytest.raises(DeployError, match="never overwritten"):
        make_node_key(keys[0])
    data = tmp_path / "mine.jsonl"
    if content is not None:
        data.write_text(content)
    done = subprocess.run([*FEDLPP, "deploy", "supernode", "--superlink", "127.0.0.1:9", "--ca", str(tmp_path / "keys" / "ca.crt"),
                           "--key", str(keys[0]), "--data", str(data)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and message in done.stderr and str(data) in done.stderr


def _private_network() -> list[str] | None:
    """A command prefix that runs a program in a network namespace of its own (only loopback), or None."""
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30, check=False) \
        if shutil.which("unshare") and shutil.which("ip") else None
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if probe and probe.returncode == 0 else None


def test_the_simulation_runtime_ends_with_the_local_engines_adapter(tmp_path):
    """`fedlpp run --engine flower` on Ray. Ray listens on every interface it sees, so it runs in a network
    namespace of its own, where the only interface is loopback; without one (no unshare) it is not started."""
    prefix = _private_network()
    if prefix is None:
        pytest.skip("no private network namespace here (unshare -rn): Ray would listen beyond 127.0.0.1")
    overrides = [*EXPERIMENT[:-2], "fl.num_clients=3", "fl.rounds=2"]
    done = subprocess.run([*prefix, *FEDLPP, "run", "--engine", "flower", *overrides, "--out", str(tmp_path / "sim"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray actor runs torch: float sums in the same order on both sides
    try:
        run_experiment(load_config(None, overrides), tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = rundir.load_checkpoint(tmp_path / "local")[0], rundir.load_checkpoint(tmp_path / "sim")[0]
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert [r["clients"] for r in rundir.read_metrics(tmp_path / "sim")] == [r["clients"] for r in rundir.read_metrics(tmp_path / "local")]


def test_a_supernode_killed_before_its_masked_input_leaves_the_exact_sum_of_the_survivors(tmp_path):
    """SecAgg across real per-message ClientApp processes: each client's session lives in its node's state."""
    secure = [*EXPERIMENT[:-2], "algorithm.name=fedavg_lora", "fl.num_clients=4", "fl.clients_per_round=4", "fl.rounds=1",
              "eval.every=1", "flower.connect_timeout=60", "flower.round_timeout=45"]
    cfg = load_config(None, [*secure, "secagg.enabled=true"])
    write_toml(cfg, tmp_path / "experiment.toml")
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
    audit, out = tmp_path / "audit", tmp_path / "run"
    with LocalDeployment(tmp_path / "federation", nodes=4) as federation:
        federation.start_superlink()
        nodes = [federation.start_node(k, tmp_path / f"client-{k}.jsonl", client_id=k) for k in range(4)]
        submit = subprocess.Popen([*FEDLPP, "deploy", "run", "--superlink", federation.connection.superlink, "--ca", str(federation.ca),
                                   "--config", str(tmp_path / "experiment.toml"), "--out", str(out), "--audit", str(audit)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        victim = f"node{federation.node_ids[3]}"
        while submit.poll() is None and not any(victim in p.name for p in audit.glob("*-train.secagg-*.json")
                                                if json.loads(p.read_text()).get("step") == "masked_input"):
            time.sleep(0.05)
        os.killpg(nodes[3].pid, signal.SIGKILL)  # the SuperNode and its ClientApps, before it can answer
        output, _ = submit.communicate(timeout=300)
    assert submit.returncode == 0, output
    row = rundir.read_metrics(out)[0]
    assert row["secagg_survivors"] == [0, 1, 2] and "secagg masked_input" in row["failed"]["3"]
    nodes_plain = {100 + k: {"data-path": str(tmp_path / f"client-{k}.jsonl"), "client-id": k} for k in range(4)}
    serve_on_grid(LoopbackGrid(nodes_plain, raising=[103]), load_config(None, secure), tmp_path / "plain")
    a, b = rundir.load_checkpoint(tmp_path / "plain")[0], rundir.load_checkpoint(out)[0]
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n)
    print("MAXDIFF", max(float((a[n] - b[n]).abs().max()) for n in a), sorted(((float((a[n] - b[n]).abs().max()), n) for n in a), reverse=True)[:3])
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a), "the survivors' mean, up to fixed point"


@pytest.mark.parametrize("name", ['a"b', "a'b", "a\\b", "a\nb", "a\rb", "a\x7fb"])
def test_a_path_flower_cannot_carry_is_refused(tmp_path, name):
    with pytest.raises(DeployError, match="cannot be passed to Flower"):
        _quotable(tmp_path / name)
