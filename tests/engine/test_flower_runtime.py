"""Flower for real: a deployment on 127.0.0.1 (TLS SuperLink with node authentication, SuperNodes on their own
data) and the simulation runtime (Ray).

Every process the test starts runs in its own session and is stopped, whatever happens,
when ``LocalDeployment`` is left; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
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

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.config import load_config, write_toml
from fedlpp.data.examples_file import write_examples
from fedlpp.engine.flower.deploy import DeployError, LocalDeployment, _quotable, free_port, make_keys, make_node_key
from fedlpp.engine.flower.server_app import serve_on_grid
from fedlpp.engine.local import run_experiment
from fedlpp.engine.setup import build_run, client_partitions, load_task_data, round_clients

pytestmark = pytest.mark.integration

FEDLPP = [sys.executable, "-m", "fedlpp.cli"]
EXPERIMENT = [
    "model.name=tiny-llama",
    "model.max_length=48",
    "data.num_train=60",
    "data.num_eval=3",
    "algorithm.name=fedlpp",
    "fl.rounds=2",
    "fl.num_clients=2",
    "fl.clients_per_round=2",
    "fl.local_steps=3",
    "train.batch_size=4",
    "train.lr=0.02",
    "eval.every=1",
    "eval.max_new_tokens=3",
    "seed=0",
    "flower.connect_timeout=60",
    "flower.round_timeout=120",
]


def test_warm_nodes_load_the_model_once_and_a_deployed_run_equals_the_local_engine(tmp_path):
    """Two warm nodes (and one whose key is not registered), 3 rounds, TLS; Ctrl-C then stops every process."""
    cfg = load_config(None, [*EXPERIMENT, "fl.rounds=3"])
    write_toml(cfg, tmp_path / "experiment.toml")
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
    with LocalDeployment(tmp_path / "federation", nodes=3) as federation:
        federation.start_superlink()
        federation.start_node(0, tmp_path / "client-0.jsonl", client_id=0, threads=1)
        federation.start_node(1, tmp_path / "client-1.jsonl", client_id=1, threads=1)
        rogue = federation.start_node(2, tmp_path / "client-1.jsonl", register=False)
        out, audit = tmp_path / "run", tmp_path / "audit"
        submit = subprocess.run(
            federation.run_command(tmp_path / "experiment.toml", out, audit),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "finished:completed" in submit.stdout
        assert f"run directory: {out} (report: report.md, metrics.png" in submit.stdout.splitlines()[-1]
        assert rogue.wait(timeout=30) != 0, "the unregistered node was refused and stopped"
        assert "this node's public key is not registered with the SuperLink" in federation.log("node-2")
        assert [federation.log(f"node-{k}").count("model load ") for k in (0, 1)] == [1, 1], "one model load per node"
        started = federation.descendants()
        assert len(started) > 3, "SuperLink, SuperNodes and the programs they started"
        for p in federation.processes:  # Ctrl-C, as a terminal sends it to each command's process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        psutil.wait_procs(started, timeout=30)
        assert not [p.cmdline() for p in started if _alive(p)], "Ctrl-C stopped every process fedlpp started"

    with one_torch_thread():  # as each node on this machine trains
        run_experiment(cfg, tmp_path / "local", progress=False)
    a, b = rundir.load_checkpoint(tmp_path / "local")[0], rundir.load_checkpoint(out)[0]
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert [r["clients"] for r in rundir.read_metrics(out)] == [[0, 1]] * 3
    assert {"report.md", "metrics.png", "summary.json"} <= {p.name for p in out.iterdir()}
    for command in (["eval", str(out)], ["report", str(out), "--out", str(tmp_path / "report")]):
        done = subprocess.run([*FEDLPP, *command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    # Model privacy on the wire: every broadcast the ServerApp sent holds codes and scales only.
    payloads = sorted(audit.glob("*.payload.bin"))
    assert len(payloads) == 6
    needles = theta_needles(_round_one_adapter(tmp_path, cfg)) + theta_needles(build_run(cfg).server.initial_adapter())
    for path in sorted(audit.iterdir()):
        raw = path.read_bytes()
        assert not any(needle in raw for needle in needles), path.name
    for path in payloads:
        tensors, _ = wire.decode(path.read_bytes(), rnd.BROADCAST)
        assert {k: t.dtype for k, t in tensors.items()} == {"codes": torch.uint8, "scales": torch.float16}


def test_a_node_that_cannot_reach_its_superlink_gives_up_saying_so(tmp_path):
    keys = make_keys(tmp_path / "keys", nodes=1)
    data = tmp_path / "mine.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n')
    superlink = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [
            *FEDLPP,
            "deploy",
            "supernode",
            "--superlink",
            superlink,
            "--ca",
            str(tmp_path / "keys" / "ca.crt"),
            "--key",
            str(keys[0]),
            "--data",
            str(data),
            "--port",
            str(free_port()),
            "--connect-timeout",
            "3",
            "--flwr-home",
            str(tmp_path / "home"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"could not reach the SuperLink at {superlink} within --connect-timeout=3 s" in done.stdout, done.stdout[-3000:]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _round_one_adapter(tmp_path: Path, cfg) -> dict[str, torch.Tensor]:
    one = load_config(None, [*EXPERIMENT, "fl.rounds=1"])
    run_experiment(one, tmp_path / "round-one", progress=False)
    return rundir.load_checkpoint(tmp_path / "round-one")[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such data file"),
        ('{"input": 3}\n', "line 1"),
        ('{"input": "a", "output": "b"}\n{"input": "c"}\n', "line 2: 'output'"),
    ],
)
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
    done = subprocess.run(
        [
            *FEDLPP,
            "deploy",
            "supernode",
            "--superlink",
            "127.0.0.1:9",
            "--ca",
            str(tmp_path / "keys" / "ca.crt"),
            "--key",
            str(keys[0]),
            "--data",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and message in done.stderr and str(data) in done.stderr


def _private_network() -> list[str] | None:
    """A command prefix that runs a program in a network namespace of its own (only loopback), or None."""
    probe = (
        subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30, check=False)
        if shutil.which("unshare") and shutil.which("ip")
        else None
    )
    return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if probe and probe.returncode == 0 else None


def test_the_simulation_runtime_ends_with_the_local_engines_adapter(tmp_path):
    """`fedlpp run --engine flower` on Ray. Ray listens on every interface it sees, so it runs in a network
    namespace of its own, where the only interface is loopback; without one (no unshare) it is not started."""
    prefix = _private_network()
    if prefix is None:
        pytest.skip("no private network namespace here (unshare -rn): Ray would listen beyond 127.0.0.1")
    overrides = [*EXPERIMENT[:-2], "fl.num_clients=3", "fl.rounds=2"]
    done = subprocess.run(
        [*prefix, *FEDLPP, "run", "--engine", "flower", *overrides, "--out", str(tmp_path / "sim"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    with one_torch_thread():  # as each Ray actor runs torch: float sums in the same order on both sides
        run_experiment(load_config(None, overrides), tmp_path / "local", progress=False)
    a, b = rundir.load_checkpoint(tmp_path / "local")[0], rundir.load_checkpoint(tmp_path / "sim")[0]
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a)
    assert [r["clients"] for r in rundir.read_metrics(tmp_path / "sim")] == [
        r["clients"] for r in rundir.read_metrics(tmp_path / "local")
    ]


def test_eight_nodes_under_secagg_plus_lose_one_mid_round_as_the_simulation_does(tmp_path):
    """8 warm nodes, 4 per round, SecAgg+ (sparse graph), 2 rounds; in round 2 one sampled node is killed (SIGKILL) as
    soon as its masked-input request is out. Round 1 (no failure) and round 2 (one dropout) end with the adapter of the
    same run over the in-process grid with that node vanishing at the same step of the same round."""
    secure = [
        *EXPERIMENT[:-2],
        "algorithm.name=fedavg_lora",
        "fl.num_clients=8",
        "fl.clients_per_round=4",
        "fl.rounds=2",
        "eval.every=2",
        "secagg.enabled=true",
        "secagg.graph=sparse",
        "flower.connect_timeout=180",
        "flower.round_timeout=20",
    ]
    cfg = load_config(None, secure)
    write_toml(cfg, tmp_path / "experiment.toml")
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
    victim = round_clients(cfg, 2)[0]
    audit, out = tmp_path / "audit", tmp_path / "run"
    with LocalDeployment(tmp_path / "federation", nodes=8) as federation:
        federation.start_superlink()
        nodes = [federation.start_node(k, tmp_path / f"client-{k}.jsonl", client_id=k, threads=1) for k in range(8)]
        submit = subprocess.Popen(
            federation.run_command(tmp_path / "experiment.toml", out, audit),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 300
        while submit.poll() is None and not _asked(audit, f"node{federation.node_ids[victim]}", "masked_input", 2):
            assert time.monotonic() < deadline, "round 2's masked_input step never reached the victim within 300 s"
            time.sleep(0.05)
        os.killpg(nodes[victim].pid, signal.SIGKILL)  # the node's worker and SuperNode, before it can answer
        output, _ = submit.communicate(timeout=300)
        loads = [federation.log(f"node-{k}").count("model load ") for k in range(8) if k != victim]
    assert submit.returncode == 0, output
    assert loads == [1] * 7
    first, second = rundir.read_metrics(out)
    assert "failed" not in first and first["secagg_survivors"] == round_clients(cfg, 1)
    assert second["secagg_survivors"] == [c for c in round_clients(cfg, 2) if c != victim]
    assert "secagg masked_input" in second["failed"][str(victim)]
    nodes_in_process = {100 + k: {"data-path": str(tmp_path / f"client-{k}.jsonl"), "client-id": k} for k in range(8)}
    with one_torch_thread():  # as each of the 8 nodes on this machine trains: float sums in the same order on both sides
        grid = LoopbackGrid(nodes_in_process, vanish_at={100 + victim: ("masked_input", 2)})
        serve_on_grid(grid, cfg, tmp_path / "in-process", data_assigned=False)  # nodes with their own data, as deployed
    assert [r["secagg_survivors"] for r in rundir.read_metrics(tmp_path / "in-process")] == [
        first["secagg_survivors"],
        second["secagg_survivors"],
    ]
    a, b = rundir.load_checkpoint(tmp_path / "in-process")[0], rundir.load_checkpoint(out)[0]
    assert any(torch.count_nonzero(a[n]) for n in a if ".lora_B." in n)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=0) for n in a), "the survivors' mean, up to fixed point"


def test_distributed_dp_deployed_sends_and_accounts_as_the_in_process_grid(tmp_path):
    """3 warm nodes on their own data, client-level DP under SecAgg in Z_2^16, one round. The bytes each way, the
    survivors and epsilon are those of the same run over the in-process grid, and on both the adapter is the
    noiseless run's (same training, same field, no DP) plus noise of the planned std z S / K on every value: the
    nodes drew their discrete Gaussian shares, and the server added none (nobody dropped out)."""
    base = [
        *EXPERIMENT[:-2],
        "algorithm.name=fedavg_lora",
        "fl.rounds=1",
        "fl.num_clients=3",
        "fl.clients_per_round=3",
        "fl.weighting=uniform",
        "secagg.enabled=true",
        "secagg.modulus_bits=16",
        "secagg.threshold=1.0",
        "secagg.l2_bound=10",
        "flower.connect_timeout=120",
        "flower.round_timeout=60",
    ]
    dp = ["privacy.mode=client_dp", "privacy.epsilon=10", "privacy.delta=0.05", "privacy.clip_norm=10"]
    cfg = load_config(None, [*base, *dp, "privacy.secure_noise=true"])  # a deployment requires it
    write_toml(cfg, tmp_path / "experiment.toml")
    nodes_in_process = {}
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(tmp_path / f"client-{k}.jsonl", part)
        nodes_in_process[100 + k] = {"data-path": str(tmp_path / f"client-{k}.jsonl"), "client-id": k}
    out = tmp_path / "run"
    with LocalDeployment(tmp_path / "federation", nodes=3) as federation:
        federation.start_superlink()
        for k in range(3):
            federation.start_node(k, tmp_path / f"client-{k}.jsonl", client_id=k, threads=1)
        submit = subprocess.run(
            federation.run_command(tmp_path / "experiment.toml", out, tmp_path / "audit"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    with one_torch_thread():  # as each node on this machine trains
        serve_on_grid(LoopbackGrid(nodes_in_process), cfg, tmp_path / "in-process", data_assigned=False)
        run_experiment(load_config(None, base), tmp_path / "noiseless", progress=False)
    [deployed], [in_process] = rundir.read_metrics(out), rundir.read_metrics(tmp_path / "in-process")
    for key in ("bytes_up", "bytes_down", "secagg_survivors", "epsilon"):
        assert deployed[key] == in_process[key], key
    assert deployed["secagg_survivors"] == [0, 1, 2] and "dp_noise_topped_up" not in deployed
    assert 0 < deployed["epsilon"] <= 10

    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert "distributed" in privacy["statement"] and "no amplification" in privacy["statement"]
    planned = privacy["noise_multiplier"] * 10 / 3  # z S / K on each value of the mean
    noiseless = rundir.load_checkpoint(tmp_path / "noiseless")[0]
    for run in (out, tmp_path / "in-process"):
        adapter = rundir.load_checkpoint(run)[0]
        noise = torch.cat([(adapter[n] - noiseless[n]).reshape(-1) for n in adapter if ".lora_" in n]).double()
        assert float(noise.std()) == pytest.approx(planned, rel=0.05), run.name


@contextlib.contextmanager
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _asked(audit: Path, node: str, step: str, round_: int) -> bool:
    """The ServerApp has sent ``node`` the request for ``step`` of ``round_`` (its audit copy is written first)."""
    for path in audit.glob(f"*-train.secagg-{node}.json"):
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if fields.get("step") == step and fields.get("round") == round_:
            return True
    return False


@pytest.mark.parametrize("name", ['a"b', "a'b", "a\\b", "a\nb", "a\rb", "a\x7fb"])
def test_a_path_flower_cannot_carry_is_refused(tmp_path, name):
    with pytest.raises(DeployError, match="cannot be passed to Flower"):
        _quotable(tmp_path / name)
