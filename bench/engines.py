"""Start-up and per-round time of the three runtimes side by side, and memory of 1,000 virtual clients.

Usage:
    .venv/bin/python bench/engines.py                          # tiny-llama, all three runtimes + the memory figure
    .venv/bin/python bench/engines.py --model smollm2-135m     # real training steps (minutes)
    .venv/bin/python bench/engines.py --skip-memory --secagg   # + a deployment with and without SecAgg (3 nodes)
    .venv/bin/python bench/engines.py --skip-memory --out bench/results/engines.json (the default)

The same experiment (FedLPP w=2, N clients, K per round, E local steps; evaluation only
after the last round) runs on:

- local: ``fedlpp run`` (every client in one process, one model in memory);
- flower simulation: ``fedlpp run --engine flower`` (Ray, one actor per core);
- flower deployment: ``LocalDeployment`` — a TLS SuperLink with node authentication and
  N warm SuperNodes on 127.0.0.1 (each trains with cores/N torch threads, as the
  simulation's actors do), each reading its own client-K.jsonl — and ``fedlpp deploy run``.

Each runs in a fresh process. "start-up" is the command's wall-clock minus its rounds'
time; "per round" is the median ``wall_s`` of the rounds before the last (the last one
also evaluates), printed with its range. All three must end with the same adapter; the
script checks that. For the deployment it also prints the per-message overhead: each
round's wall time minus the slowest node's time answering its train message (the nodes
log it), and the model loads per node (1 expected). Targets: simulation <= 1.3x local;
deployment <= 2x on tiny-llama, <= 1.3x on SmolLM2-135M; SecAgg <= 2x plain deployment.

Memory: the simulation with ``--memory-clients`` (1,000) virtual clients, 10 sampled per
round, against the same run with 10 clients (same data, same K): the peak of the summed
resident memory of the run's whole process tree (driver, Ray's processes and actors),
sampled every 0.2 s. Target: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlpp import rundir
from fedlpp.config import load_config, write_toml
from fedlpp.data.examples_file import write_examples
from fedlpp.engine.flower.deploy import LocalDeployment
from fedlpp.engine.flower.node import ANSWERED
from fedlpp.engine.setup import client_partitions, load_task_data
from fedlpp.provenance import code_version

DEFAULT_OUT = Path(__file__).parent / "results" / "engines.json"
FEDLPP = [sys.executable, "-m", "fedlpp.cli"]
ROUND_TARGET, MEMORY_TARGET, SECAGG_TARGET = 1.3, 1.2, 2.0
DEPLOY_TARGET = {"tiny-llama": 2.0, "smollm2-135m": 1.3}  # a deployed round against the local engine's


def experiment(model: str, rounds: int, clients: int, per_round: int, steps: int) -> list[str]:
    data = ["data.num_train=400", "model.max_length=64"] if model == "tiny-llama" else ["data.num_train=400"]
    return [
        f"model.name={model}",
        "algorithm.name=fedlpp",
        f"fl.rounds={rounds}",
        f"fl.num_clients={clients}",
        f"fl.clients_per_round={per_round}",
        f"fl.local_steps={steps}",
        "train.batch_size=8",
        "data.num_eval=4",
        f"eval.every={rounds}",
        "eval.max_new_tokens=8",
        "seed=0",
        *data,
    ]


def timed(command: list[str], timeout: float = 3600) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:6])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def figures(total_s: float, out: Path) -> dict[str, float]:
    rows = rundir.read_metrics(out)
    rounds = [r["wall_s"] for r in rows]
    before_last = rounds[:-1] or rounds
    return {
        "total_s": total_s,
        "startup_s": total_s - sum(rounds),
        "per_round_s": statistics.median(before_last),
        "rounds_s": rounds,
    }


def run_local(overrides: list[str], out: Path) -> dict[str, float]:
    return figures(timed([*FEDLPP, "run", *overrides, "--out", str(out), "--quiet"]), out)


def run_simulation(overrides: list[str], out: Path) -> dict[str, float]:
    return figures(timed([*FEDLPP, "run", "--engine", "flower", *overrides, "--out", str(out), "--quiet"]), out)


def run_deployment(overrides: list[str], work: Path) -> dict[str, object]:
    """SuperLink + one warm SuperNode per client on 127.0.0.1 (TLS, node auth); start-up counts from launching them.

    Besides the round times: each round's time outside the ClientApps (its wall time minus the
    slowest node's time answering its train message, read from the nodes' logs: the transport,
    the polls and the server's own step) and the number of model loads per node.
    """
    cfg = load_config(None, [*overrides, "flower.connect_timeout=300"])
    write_toml(cfg, work / "experiment.toml")
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(work / f"client-{k}.jsonl", part)
    start = time.perf_counter()
    with LocalDeployment(work / "federation", nodes=cfg.fl.num_clients) as federation:
        federation.start_superlink()
        for k in range(cfg.fl.num_clients):
            federation.start_node(k, work / f"client-{k}.jsonl", client_id=k)
        timed(federation.run_command(work / "experiment.toml", work / "run"))
        total = time.perf_counter() - start
        logs = [federation.log(f"node-{k}") for k in range(cfg.fl.num_clients)]
    row: dict[str, object] = dict(figures(total, work / "run"))
    row.update(outside_the_client_app(rundir.read_metrics(work / "run"), logs))
    row["model_loads_per_node"] = [log.count("model load ") for log in logs]
    return row


def outside_the_client_app(rows: list[dict], logs: list[str]) -> dict[str, object]:
    """Per round: wall time minus the slowest node's train answer; its median and range over the rounds."""
    slowest: dict[str, float] = {}
    for log in logs:
        for kind, group, seconds in ANSWERED.findall(log):
            if kind == "train":
                slowest[group] = max(slowest.get(group, 0.0), float(seconds))
    outside = [r["wall_s"] - slowest[str(r["round"])] for r in rows if str(r["round"]) in slowest]
    return {"outside_client_app_s": outside, "outside_client_app_median_s": statistics.median(outside) if outside else None}


def same_adapter(a: Path, b: Path) -> float:
    first, second = rundir.load_checkpoint(a)[0], rundir.load_checkpoint(b)[0]
    return max(float((first[n] - second[n]).abs().max()) for n in first)


class PeakMemory:
    """The largest summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, root: int, every: float = 0.2) -> None:
        self.root, self.every, self.peak = psutil.Process(root), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, sum(_rss(p) for p in tree))
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _rss(p: psutil.Process) -> int:
    try:
        return int(p.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def simulation_memory(overrides: list[str], out: Path) -> dict[str, float]:
    start = time.perf_counter()
    process = subprocess.Popen(
        [*FEDLPP, "run", "--engine", "flower", *overrides, "--out", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    meter = PeakMemory(process.pid)
    _, err = process.communicate(timeout=3600)
    peak = meter.stop()
    if process.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{err[-3000:]}")
    return {"peak_rss_mib": peak / 2**20, "total_s": time.perf_counter() - start}


def main() -> None:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="local steps E")
    parser.add_argument("--memory-clients", type=int, default=1000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--secagg", action="store_true", help="also: a deployment with and without SecAgg (3 nodes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    overrides = experiment(args.model, args.rounds, args.clients, args.per_round, args.steps)
    report: dict[str, object] = {
        "model": args.model,
        "rounds": args.rounds,
        "clients": args.clients,
        "per_round": args.per_round,
        "local_steps": args.steps,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    with TemporaryDirectory(prefix="fedlpp-bench-") as tmp:
        work = Path(tmp)
        (work / "deploy").mkdir()
        rows = {
            "local": run_local(overrides, work / "local"),
            "simulation": run_simulation(overrides, work / "simulation"),
            "deployment": run_deployment(overrides, work / "deploy"),
        }
        report["runtimes"] = rows
        report["max_abs_adapter_difference"] = {
            "simulation": same_adapter(work / "local", work / "simulation"),
            "deployment": same_adapter(work / "local", work / "deploy" / "run"),
        }
        report["per_round_ratio"] = ratios(rows, args.model)
        print_table(rows)
        print(f"adapters equal to the local engine's within {max(report['max_abs_adapter_difference'].values()):.2g}")
        print(
            f"deployment: outside the ClientApps {_spread(rows['deployment']['outside_client_app_s'])} per round; "
            f"model loads per node {rows['deployment']['model_loads_per_node']}"
        )
        if args.secagg:
            report["secagg"] = secagg_deployment(args, work)
        if not args.skip_memory:
            report["memory"] = memory(args, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "code": code_version()}, indent=2))
    print(f"wrote {args.out}")


def ratios(rows: dict[str, dict], model: str) -> dict[str, dict[str, object]]:
    out = {}
    for name, target in (("simulation", ROUND_TARGET), ("deployment", DEPLOY_TARGET.get(model))):
        value = rows[name]["per_round_s"] / rows["local"]["per_round_s"]
        out[name] = {"value": value, "target": target, "holds": None if target is None else value <= target}
    return out


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'runtime':<11} {'start-up':>9} {'per round':>10} {'rounds before the last':>26} {'ratio':>7}")
    for name, row in rows.items():
        print(
            f"{name:<11} {row['startup_s']:8.2f}s {row['per_round_s']:9.2f}s {_spread(row['rounds_s'][:-1] or row['rounds_s']):>26} "
            f"{row['per_round_s'] / rows['local']['per_round_s']:6.2f}x"
        )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f}, n={len(values)})" if values else "-"


def secagg_deployment(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """The deployment with and without secure aggregation, 3 nodes, all 3 per round (SecAgg needs >= 3)."""
    base = experiment(args.model, args.rounds, 3, 3, args.steps)
    plain = run_deployment(base, _fresh(work / "secagg-plain"))
    secure = run_deployment([*base, "secagg.enabled=true"], _fresh(work / "secagg-on"))
    ratio = secure["per_round_s"] / plain["per_round_s"]
    print(
        f"secure aggregation over a deployment (3 nodes): {_spread(secure['rounds_s'][:-1])} per round against "
        f"{_spread(plain['rounds_s'][:-1])} plain, ratio {ratio:.2f}x (target <= {SECAGG_TARGET})"
    )
    return {"plain": plain, "secagg": secure, "ratio": ratio, "target": SECAGG_TARGET, "holds": ratio <= SECAGG_TARGET}


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def memory(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Peak memory of the simulation with many virtual clients vs. with 10 (same data, 10 per round)."""
    base = [
        "model.name=tiny-llama",
        "algorithm.name=fedlpp",
        "fl.rounds=3",
        "fl.clients_per_round=10",
        "fl.local_steps=2",
        "train.batch_size=4",
        f"data.num_train={4 * args.memory_clients}",
        "data.num_eval=2",
        "eval.max_new_tokens=2",
        "model.max_length=48",
        "eval.every=3",
        "seed=0",
        "flower.connect_timeout=600",
    ]
    few = simulation_memory([*base, "fl.num_clients=10"], work / "memory-10")
    many = simulation_memory([*base, f"fl.num_clients={args.memory_clients}"], work / f"memory-{args.memory_clients}")
    ratio = many["peak_rss_mib"] / few["peak_rss_mib"]
    print(
        f"peak memory: {args.memory_clients} clients {many['peak_rss_mib']:.0f} MiB, 10 clients {few['peak_rss_mib']:.0f} MiB, "
        f"ratio {ratio:.3f} (target <= {MEMORY_TARGET}); run time {many['total_s']:.0f} s vs {few['total_s']:.0f} s"
    )
    return {
        "clients": args.memory_clients,
        "many": many,
        "ten": few,
        "ratio": ratio,
        "target": MEMORY_TARGET,
        "holds": ratio <= MEMORY_TARGET,
    }


if __name__ == "__main__":
    main()
