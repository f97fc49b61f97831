"""The local engine: every client in one process, sharing one backbone in memory.

Each round: sample K clients, broadcast, train each client in turn on the shared model
(swapping only the adapter, so memory does not grow with N), aggregate, evaluate the
global and the proxy adapter, append a metrics row, checkpoint. All randomness derives
from (seed, round, client), so ``--resume`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.client import LocalTraining, train_client
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.config import ExperimentConfig
from fedlpp.engine import rundir
from fedlpp.engine.secure import secure_aggregate
from fedlpp.engine.setup import RunContext, build_run, client_batches, sample_clients
from fedlpp.evaluation.evaluate import evaluate_adapter
from fedlpp.models.lora import Adapter, copy_adapter, save_peft_adapter
from fedlpp.seeding import derive_seed

log = logging.getLogger(__name__)

# Called with (client id, bytes) for every message the server sends: tests record them.
OnSend = Callable[[int, bytes], None]


@dataclass
class RoundOutcome:
    adapter: Adapter
    row: dict[str, Any]


def train_one_client(ctx: RunContext, payload: bytes, client: int, round_: int, bar: tqdm | None) -> tuple[Adapter, int, float]:
    """Client side of a round: decode the broadcast, train E steps; (delta, n_k, mean loss)."""
    start, _ = rnd.read_broadcast(payload, ctx.shapes)
    cfg = ctx.cfg
    batches = client_batches(
        ctx.client_features[client], cfg.fl.local_steps, cfg.train.batch_size, ctx.pad_id,
        derive_seed(cfg.seed, "batches", round_, client),
    )
    if bar is not None:
        batches = _ticking(batches, bar)
    opts = LocalTraining(cfg.train.lr, cfg.train.weight_decay, cfg.train.max_grad_norm)
    result = train_client(ctx.model, ctx.task.kind, start, ctx.trained, batches, opts, derive_seed(cfg.seed, "dropout", round_, client))
    return result.delta, len(ctx.client_features[client]), sum(result.losses) / len(result.losses)


def _ticking(batches: Iterator[dict[str, torch.Tensor]], bar: tqdm) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        yield batch
        bar.update(1)


def evaluate_round(ctx: RunContext, adapter: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Global (server's full-precision) and proxy (what clients can build) side by side."""
    tok = ctx.backbone.tokenizer
    global_metrics = evaluate_adapter(ctx.model, adapter, ctx.evalset, tok, ctx.decoding)
    proxy = rnd.proxy_point(ctx.spec, adapter)
    same = all(torch.equal(proxy[n], adapter[n]) for n in adapter)
    proxy_metrics = dict(global_metrics) if same else evaluate_adapter(ctx.model, proxy, ctx.evalset, tok, ctx.decoding)
    return {"global": global_metrics, "proxy": proxy_metrics}


def run_round(ctx: RunContext, adapter: Adapter, round_: int, on_send: OnSend | None, bar: tqdm | None) -> RoundOutcome:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    clients = sample_clients(cfg.seed, round_, cfg.fl.num_clients, cfg.fl.clients_per_round)
    payload = rnd.make_broadcast(ctx.spec, adapter, ctx.a_seed, round_)
    deltas, losses = {}, []
    for client in clients:
        if on_send is not None:
            on_send(client, payload)
        delta, n, loss = train_one_client(ctx, payload, client, round_, bar)
        deltas[client] = (delta, n)
        losses.append(loss)
    new, row = (secure_server(ctx, adapter, deltas, round_) if ctx.secure else plain_server(ctx, adapter, deltas, round_))
    row = {"round": round_, "clients": clients, **row, "train_loss": sum(losses) / len(losses)}
    row["bytes_down"] += len(payload) * len(clients)
    if round_ % cfg.eval.every == 0 or round_ == cfg.fl.rounds:
        row.update(evaluate_round(ctx, new))
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    return RoundOutcome(new, row)


def plain_server(ctx: RunContext, adapter: Adapter, deltas: Mapping[int, tuple[Adapter, int]], round_: int) -> tuple[Adapter, dict[str, Any]]:
    """Every client sends its update; the server validates each one and aggregates."""
    updates = [(c, rnd.make_update(delta, n, round_)) for c, (delta, n) in deltas.items()]
    result = rnd.aggregate(ctx.spec, adapter, updates, round_)
    row: dict[str, Any] = {"bytes_down": 0, "bytes_up": sum(len(u) for _, u in updates)}
    if result.rejected:
        row["rejected"] = {str(k): v for k, v in result.rejected.items()}
    return result.adapter, row


def secure_server(ctx: RunContext, adapter: Adapter, deltas: Mapping[int, tuple[Adapter, int]], round_: int) -> tuple[Adapter, dict[str, Any]]:
    """The clients run SecAgg; the server only ever holds the sum (engine/secure.py)."""
    assert ctx.secure is not None
    out = secure_aggregate(ctx.secure, ctx.spec, adapter, deltas, round_)
    row: dict[str, Any] = {"bytes_down": out.bytes_down, "bytes_up": out.bytes_up, "secagg_survivors": list(out.survivors), **out.notes}
    return (out.adapter if out.adapter is not None else copy_adapter(adapter)), row


def fedavg_reference_bytes(ctx: RunContext, adapter: Adapter) -> dict[str, int]:
    """Bytes per client per round that FedAvg+LoRA (float32) would send for this adapter."""
    fedavg = AlgorithmSpec("fedavg_lora", quant=None, freeze_a=False)
    down = len(rnd.make_broadcast(fedavg, adapter, ctx.a_seed, 1))
    up = len(rnd.make_update({n: torch.zeros(s) for n, s in ctx.shapes.items()}, 1, 1))
    return {"down": down, "up": up}


def start_or_resume(ctx: RunContext, out: Path, resume: bool) -> tuple[Adapter, int, list[dict[str, Any]]]:
    """The adapter to start from, the last finished round, and the metrics rows kept."""
    ckpt = rundir.load_checkpoint(out) if resume else None
    if ckpt is None:
        return ctx.initial_adapter(), 0, (rundir.truncate_metrics(out, 0) if resume else [])
    adapter, last = ckpt
    log.info("resuming %s after round %d", out, last)
    return adapter, last, rundir.truncate_metrics(out, last)


def run_experiment(
    cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = True, on_send: OnSend | None = None
) -> dict[str, Any]:
    """Run (or continue) an experiment into ``out`` and return its summary."""
    if not resume:
        rundir.check_new(out)
    ctx = build_run(cfg)  # data and model errors surface before anything is written
    if resume:
        rundir.check_extends(out, cfg.fl.rounds)
        rundir.save_config(out, cfg)
    else:
        rundir.prepare_new(out, cfg)
    adapter, last, rows = start_or_resume(ctx, out, resume)
    steps_per_round = cfg.fl.clients_per_round * cfg.fl.local_steps
    rounds_bar = tqdm(range(last + 1, cfg.fl.rounds + 1), desc="rounds", initial=last, total=cfg.fl.rounds, disable=not progress, position=0)
    for round_ in rounds_bar:
        with tqdm(total=steps_per_round, desc=f"round {round_} client steps", leave=False, disable=not progress, position=1) as bar:
            outcome = run_round(ctx, adapter, round_, on_send, bar)
        adapter = outcome.adapter
        rundir.append_metrics(out, outcome.row)
        rundir.save_checkpoint(out, adapter, round_)
        rows.append(outcome.row)
        rounds_bar.set_postfix(_postfix(outcome.row))
    return finish(ctx, out, adapter, rows)


def _postfix(row: Mapping[str, Any]) -> dict[str, str]:
    post = {"train_loss": f"{row['train_loss']:.3f}"}
    if "global" in row:
        post["global_loss"] = f"{row['global']['loss']:.3f}"
        post["proxy_loss"] = f"{row['proxy']['loss']:.3f}"
    return post


def finish(ctx: RunContext, out: Path, adapter: Adapter, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Save the final adapter in peft format and write summary.json."""
    save_peft_adapter(ctx.model, adapter, out / rundir.ADAPTER, ctx.backbone.source)
    reference = fedavg_reference_bytes(ctx, adapter)
    k = ctx.cfg.fl.clients_per_round
    last_eval = next(r for r in reversed(rows) if "global" in r)
    down = rows[-1]["bytes_down"] / k
    up = rows[-1]["bytes_up"] / k
    summary = {
        "algorithm": ctx.spec.name,
        "model": ctx.cfg.model.name,
        "task": ctx.task.name,
        "rounds": len(rows),
        "final_round": last_eval["round"],
        "global": last_eval["global"],
        "proxy": last_eval["proxy"],
        "bytes_per_client_per_round": {"down": down, "up": up},
        "fedavg_lora_bytes_per_client_per_round": reference,
        "ratio_to_fedavg_lora": {"down": down / reference["down"], "up": up / reference["up"]},
        "total_bytes": {"down": sum(r["bytes_down"] for r in rows), "up": sum(r["bytes_up"] for r in rows)},
        "wall_s": round(sum(r["wall_s"] for r in rows), 3),
        "adapter_dir": rundir.ADAPTER,
    }
    rundir.write_summary(out, summary)
    return summary
