"""Overhead of one local-engine round against a bare PyTorch loop doing the same local steps.

Usage:
    HF_HUB_OFFLINE=1 .venv/bin/python bench/overhead.py --model tiny-llama        # seconds
    HF_HUB_OFFLINE=1 .venv/bin/python bench/overhead.py --steps 10 --reps 3       # SmolLM2-135M
    ... --algorithm fedavg_lora --out bench/results/overhead.json (the default)

Engine side: exactly what ``fedlpp.engine.local.run_round`` does for one sampled client,
minus evaluation: ``make_broadcast`` -> ``train_one_client`` (decode, E AdamW steps, encode
the update) -> ``aggregate`` (decode, validate, server step). Bare side: the same model
object, the same E batches (``client_batches`` with the same seed), ``torch.optim.AdamW``
over the trained adapter parameters, ``example_losses(...).mean()``, backward, step, and
nothing else. Both start from the same adapter (set outside the timer for the bare loop).
Repetitions are interleaved (engine, bare, engine, bare, ...) after one warm-up of each;
the report gives the medians and the ratio engine / bare. Torch keeps its default number
of threads, which is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.client import shuffled_batches
from fedlpp.config import load_config
from fedlpp.engine.local import local_transport
from fedlpp.engine.server import start_round_steps
from fedlpp.engine.setup import LocalRun, build_run
from fedlpp.models.lora import Adapter, adapter_parameters, set_adapter, set_trainable
from fedlpp.models.objective import example_losses
from fedlpp.provenance import code_version
from fedlpp.seeding import derive_seed

DEFAULT_OUT = Path(__file__).parent / "results" / "overhead.json"
ROUND = 1
CLIENT = 0
TARGET = 1.05


def starting_adapter(run: LocalRun) -> Adapter:
    """The run's initial adapter with B small and non-zero, as after a few rounds."""
    adapter = run.server.initial_adapter()
    gen = torch.Generator().manual_seed(7)
    for name, t in adapter.items():
        if ".lora_B." in name:
            adapter[name] = torch.randn(t.shape, generator=gen) * 0.01
    return adapter


def engine_round(run: LocalRun, adapter: Adapter) -> Adapter:
    """One round for one client, as the server's run_round does it, without evaluation."""
    ctx = run.server
    payload = rnd.make_broadcast(ctx.spec, adapter, ctx.a_seed, ROUND)
    steps = start_round_steps(ctx, Path(), resume=False)
    transport = local_transport(run)  # client_step: decode, E steps, encode; then validate, aggregate
    replies = transport.train(payload, [CLIENT], ROUND, {"sigma": ctx.sigma}, None)
    return steps.optimizer.step(adapter, steps.aggregation.combine(adapter, replies, ROUND, transport).adapter)


def prepare_bare(run: LocalRun, start: Adapter) -> None:
    """Untimed: load the engine's starting point and mark the trained tensors."""
    set_adapter(run.server.model, start)
    set_trainable(run.server.model, run.server.trained(ROUND))


def bare_loop(run: LocalRun) -> None:
    """E plain AdamW steps on the same batches the engine's client sees."""
    ctx, data = run.server, run.clients[CLIENT]
    cfg = ctx.cfg
    params = adapter_parameters(ctx.model)
    optimizer = torch.optim.AdamW([params[n] for n in ctx.trained(ROUND)], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    seed = derive_seed(cfg.seed, "batches", ROUND, CLIENT)
    ctx.model.train()
    for batch in shuffled_batches(data.features, cfg.fl.local_steps, cfg.train.batch_size, data.pad_id, seed):
        loss = example_losses(ctx.model, batch, ctx.side.kind).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ctx.model.eval()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(run: LocalRun, reps: int) -> dict[str, list[float]]:
    """Warm up each side once, then alternate engine and bare ``reps`` times."""
    adapter = starting_adapter(run)
    start = rnd.proxy_point(run.server.spec, adapter)  # what the engine's client starts from
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    for rep in range(reps + 1):
        t_engine = timed(lambda: engine_round(run, adapter))
        prepare_bare(run, start)
        t_bare = timed(lambda: bare_loop(run))
        label = "warm-up" if rep == 0 else f"rep {rep}"
        print(f"{label:<8} engine {t_engine:8.3f} s   bare {t_bare:8.3f} s   ratio {t_engine / t_bare:6.3f}", flush=True)
        if rep > 0:
            times["engine"].append(t_engine)
            times["bare"].append(t_bare)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, Any]:
    engine, bare = statistics.median(times["engine"]), statistics.median(times["bare"])
    ratio = engine / bare
    pairwise = statistics.median(e / b for e, b in zip(times["engine"], times["bare"], strict=True))
    return {
        "engine_median_s": engine,
        "bare_median_s": bare,
        "ratio": ratio,
        "pairwise_ratio_median": pairwise,
        "target": TARGET,
        "holds": ratio <= TARGET,
        "engine_s": times["engine"],
        "bare_s": times["bare"],
    }


def main() -> None:
    code_version()  # the commit as the benchmark starts, not as it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="short name, e.g. smollm2-135m or tiny-llama")
    parser.add_argument("--algorithm", default="fedlpp")
    parser.add_argument("--steps", type=int, default=10, help="local steps E")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each side (after one warm-up)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            f"algorithm.name={args.algorithm}",
            "fl.rounds=1",
            # One client per round: the "mean" rule refuses K=1 (it would hand that client the server's adapter).
            "fl.clients_per_round=1",
            "algorithm.server_rule=delta",
            f"fl.local_steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            "eval.every=1000000",
            "data.num_eval=8",
        ],
    )
    threads = torch.get_num_threads()
    print(f"torch threads: {threads} (torch's default; os.cpu_count()={os.cpu_count()})")
    run = build_run(cfg)
    ctx = run.server
    q = ctx.spec.quant
    print(f"model {args.model}, {ctx.spec.name} ({q}), E={args.steps}, batch {args.batch_size}, reps {args.reps}")
    summary = summarise(measure(run, args.reps))
    print(
        f"median engine {summary['engine_median_s']:.3f} s, bare {summary['bare_median_s']:.3f} s, "
        f"ratio {summary['ratio']:.3f} (pairwise median {summary['pairwise_ratio_median']:.3f}); "
        f"target <= {TARGET}: {'HOLDS' if summary['holds'] else 'FAILS'}"
    )
    report = {
        "model": args.model,
        "algorithm": ctx.spec.name,
        "quant": repr(q),
        "local_steps": args.steps,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        **summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "code": code_version()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
