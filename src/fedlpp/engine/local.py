"""The local engine: every client in one process, sharing one backbone in memory.

Each round: sample K clients, broadcast, train each client in turn on the shared model
(swapping only the adapter, so memory does not grow with N), aggregate, evaluate the
global and the proxy adapter, append a metrics row, checkpoint. All randomness derives
from (seed, round, client), so ``--resume`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.client import LocalResult, LocalTraining, train_client
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.config import ExperimentConfig
from fedlpp.engine import rundir
from fedlpp.engine.secure import NoiseShares, secure_aggregate
from fedlpp.engine.setup import RunContext, build_run, client_batches, round_clients
from fedlpp.evaluation.evaluate import evaluate_adapter
from fedlpp.models.lora import Adapter, copy_adapter, save_peft_adapter
from fedlpp.privacy.client_dp import NoisedSum, clip_delta
from fedlpp.privacy.dp_sgd import DpSgd, poisson_batches, train_client_dp
from fedlpp.privacy.plan import Ledger, PrivacyPlan, guarantee
from fedlpp.privacy.randomness import randomness
from fedlpp.seeding import derive_seed

log = logging.getLogger(__name__)

T = TypeVar("T")
LEDGER_KEY = "privacy_ledger"  # checkpoint metadata: the accountant's history, saved with the adapter

# Called with (client id, bytes) for every message the server sends: tests record them.
OnSend = Callable[[int, bytes], None]


@dataclass
class RoundOutcome:
    adapter: Adapter
    row: dict[str, Any]


def train_one_client(ctx: RunContext, payload: bytes, client: int, round_: int, bar: tqdm | None) -> tuple[Adapter, int, float | None]:
    """Client side of a round: decode the broadcast, train E steps; (delta, n_k, mean loss)."""
    start, _ = rnd.read_broadcast(payload, ctx.shapes)
    cfg, plan = ctx.cfg, ctx.privacy
    opts = LocalTraining(cfg.train.lr, cfg.train.weight_decay, cfg.train.max_grad_norm)
    dropout_seed = derive_seed(cfg.seed, "dropout", round_, client)
    if plan is not None and plan.mode == "dp_sgd":
        result = train_dp_sgd(ctx, plan, start, client, round_, bar, opts, dropout_seed)
    else:
        batches = client_batches(
            ctx.client_features[client], cfg.fl.local_steps, cfg.train.batch_size, ctx.pad_id,
            derive_seed(cfg.seed, "batches", round_, client),
        )
        result = train_client(ctx.model, ctx.task.kind, start, ctx.trained, _ticking(batches, bar), opts, dropout_seed)
    delta = result.delta
    if plan is not None and plan.mode == "client_dp":
        delta = clip_delta(delta, plan.clip_norm)  # clipped before anything leaves the client
    return delta, len(ctx.client_features[client]), _mean(result.losses)


def train_dp_sgd(
    ctx: RunContext, plan: PrivacyPlan, start: Adapter, client: int, round_: int, bar: tqdm | None, opts: LocalTraining, seed: int
) -> LocalResult:
    cfg = ctx.cfg
    sampler = randomness(plan.secure_noise, derive_seed(cfg.seed, "poisson", round_, client))
    noise = randomness(plan.secure_noise, derive_seed(cfg.seed, "dp_noise", round_, client))
    features = ctx.client_features[client]
    batches = poisson_batches(features, cfg.fl.local_steps, plan.rates[str(client)], ctx.pad_id, sampler)
    dp = DpSgd(plan.noise_multiplier, plan.clip_norm, cfg.train.batch_size)
    return train_client_dp(ctx.model, ctx.task.kind, start, ctx.trained, _ticking(batches, bar), opts, dp, noise, seed)


def _mean(values: Sequence[float]) -> float | None:
    """Mean of the finite values (an empty DP-SGD batch has no loss), or None."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _ticking(batches: Iterator[T], bar: tqdm | None) -> Iterator[T]:
    for batch in batches:
        yield batch
        if bar is not None:
            bar.update(1)


def evaluate_round(ctx: RunContext, adapter: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Global (server's full-precision) and proxy (what clients can build) side by side."""
    tok = ctx.backbone.tokenizer
    global_metrics = evaluate_adapter(ctx.model, adapter, ctx.evalset, tok, ctx.decoding)
    proxy = rnd.proxy_point(ctx.spec, adapter)
    same = all(torch.equal(proxy[n], adapter[n]) for n in adapter)
    proxy_metrics = dict(global_metrics) if same else evaluate_adapter(ctx.model, proxy, ctx.evalset, tok, ctx.decoding)
    return {"global": global_metrics, "proxy": proxy_metrics}


def run_round(ctx: RunContext, adapter: Adapter, round_: int, clients: Sequence[int], on_send: OnSend | None, bar: tqdm | None) -> RoundOutcome:
    cfg = ctx.cfg
    t0 = time.perf_counter()
    payload = rnd.make_broadcast(ctx.spec, adapter, ctx.a_seed, round_)
    deltas, losses = {}, []
    for client in clients:
        if on_send is not None:
            on_send(client, payload)
        delta, n, loss = train_one_client(ctx, payload, client, round_, bar)
        deltas[client] = (delta, n)
        losses.append(loss)
    new, row = (secure_server(ctx, adapter, deltas, round_) if ctx.secure else plain_server(ctx, adapter, deltas, round_))
    row = {"round": round_, "clients": list(clients), **row}
    if ctx.privacy is None:  # the clients' training loss is computed from their data without noise
        row["train_loss"] = _mean([v for v in losses if v is not None])
    row["bytes_down"] += len(payload) * len(clients)
    if round_ % cfg.eval.every == 0 or round_ == cfg.fl.rounds:
        row.update(evaluate_round(ctx, new))
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    return RoundOutcome(new, row)


def plain_server(ctx: RunContext, adapter: Adapter, deltas: Mapping[int, tuple[Adapter, int]], round_: int) -> tuple[Adapter, dict[str, Any]]:
    """Every client sends its update; the server validates each one and aggregates."""
    updates = [(c, rnd.make_update(delta, n, round_)) for c, (delta, n) in deltas.items()]
    noised = noised_sum(ctx, round_)
    if noised is None:
        result = rnd.aggregate(ctx.spec, adapter, updates, round_)
    else:
        result = rnd.aggregate_private(ctx.spec, adapter, updates, round_, noised)
    row: dict[str, Any] = {"bytes_down": 0, "bytes_up": sum(len(u) for _, u in updates)}
    if result.rejected:
        row["rejected"] = {str(k): v for k, v in result.rejected.items()}
    return result.adapter, row


def noised_sum(ctx: RunContext, round_: int) -> NoisedSum | None:
    """Client-level DP's server step for this round, or None without it."""
    plan = ctx.privacy
    if plan is None or plan.mode != "client_dp":
        return None
    rng = randomness(plan.secure_noise, derive_seed(ctx.cfg.seed, "client_dp_noise", round_))
    return NoisedSum(plan.clip_norm, plan.noise_multiplier, plan.expected_clients, rng)


def secure_server(ctx: RunContext, adapter: Adapter, deltas: Mapping[int, tuple[Adapter, int]], round_: int) -> tuple[Adapter, dict[str, Any]]:
    """The clients run SecAgg; the server only ever holds the sum (engine/secure.py)."""
    assert ctx.secure is not None
    plan = ctx.privacy
    shares = None
    if plan is not None and plan.mode == "client_dp":
        shares = NoiseShares(plan.clip_norm, plan.noise_multiplier, plan.expected_clients)
    out = secure_aggregate(ctx.secure, ctx.spec, adapter, deltas, round_, shares)
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


def start_ledger(ctx: RunContext, out: Path, resume: bool) -> Ledger | None:
    """The privacy ledger so far: restored from the checkpoint on resume, never restarted from zero."""
    plan = ctx.privacy
    if plan is None:
        return None
    stored = rundir.load_checkpoint_metadata(out).get(LEDGER_KEY) if resume else None
    if stored is None:
        return Ledger(plan.noise_multiplier)
    ledger = Ledger.from_json(stored)
    if ledger.noise_multiplier != plan.noise_multiplier:
        # fl.rounds grew: sigma stays what the run was calibrated with (the budget then stops it).
        ctx.privacy = dataclasses.replace(plan, noise_multiplier=ledger.noise_multiplier)
    return ledger


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
    ledger = start_ledger(ctx, out, resume)
    stopped = None
    rounds_bar = tqdm(range(last + 1, cfg.fl.rounds + 1), desc="rounds", initial=last, total=cfg.fl.rounds, disable=not progress, position=0)
    for round_ in rounds_bar:
        clients = round_clients(cfg, round_)
        spent = ledger.after_round(ctx.privacy, clients) if ledger is not None else None
        if spent is not None and spent.exceeds(ctx.privacy):
            stopped = budget_stop(ctx.privacy, ledger, spent, round_)
            break
        with tqdm(total=len(clients) * cfg.fl.local_steps, desc=f"round {round_} client steps", leave=False, disable=not progress, position=1) as bar:
            outcome = run_round(ctx, adapter, round_, clients, on_send, bar)
        adapter, ledger = outcome.adapter, spent
        if ledger is not None:
            outcome.row.update(privacy_row(ctx.privacy, ledger))
        rundir.append_metrics(out, outcome.row)
        rundir.save_checkpoint(out, adapter, round_, {LEDGER_KEY: ledger.to_json()} if ledger is not None else None)
        rows.append(outcome.row)
        rounds_bar.set_postfix(_postfix(outcome.row))
    rounds_bar.close()
    return finish(ctx, out, adapter, rows, ledger, stopped)


def budget_stop(plan: PrivacyPlan, ledger: Ledger, spent: Ledger, round_: int) -> str:
    reason = (f"privacy budget: round {round_} would raise epsilon from {ledger.epsilon:.4g} to {spent.epsilon:.4g}, "
              f"above {plan.stop_at:g}; stopped after round {round_ - 1} with its checkpoint")
    log.warning("%s", reason)
    return reason


def privacy_row(plan: PrivacyPlan, ledger: Ledger) -> dict[str, Any]:
    """epsilon (cumulative, at delta) for the metrics row; per client under DP-SGD."""
    row: dict[str, Any] = {"epsilon": ledger.epsilon, "delta": plan.accounting.delta}
    if plan.mode == "dp_sgd":
        row["epsilon_per_client"] = dict(sorted(ledger.epsilons.items(), key=lambda kv: int(kv[0])))
    return row


def _postfix(row: Mapping[str, Any]) -> dict[str, str]:
    post = {} if row.get("train_loss") is None else {"train_loss": f"{row['train_loss']:.3f}"}
    if "global" in row:
        post["global_loss"] = f"{row['global']['loss']:.3f}"
        post["proxy_loss"] = f"{row['proxy']['loss']:.3f}"
    return post


def finish(
    ctx: RunContext, out: Path, adapter: Adapter, rows: list[dict[str, Any]], ledger: Ledger | None = None, stopped: str | None = None
) -> dict[str, Any]:
    """Save the final adapter in peft format and write summary.json."""
    save_peft_adapter(ctx.model, adapter, out / rundir.ADAPTER, ctx.backbone.source)
    reference = fedavg_reference_bytes(ctx, adapter)
    final_round, final_eval = final_evaluation(ctx, adapter, rows)
    k = max(1, len(rows[-1]["clients"])) if rows else 1  # Poisson client sampling: the round's own count
    down = rows[-1]["bytes_down"] / k if rows else 0.0
    up = rows[-1]["bytes_up"] / k if rows else 0.0
    summary = {
        "algorithm": ctx.spec.name,
        "model": ctx.cfg.model.name,
        "task": ctx.task.name,
        "rounds": len(rows),
        "final_round": final_round,
        "global": final_eval["global"],
        "proxy": final_eval["proxy"],
        "bytes_per_client_per_round": {"down": down, "up": up},
        "fedavg_lora_bytes_per_client_per_round": reference,
        "ratio_to_fedavg_lora": {"down": down / reference["down"], "up": up / reference["up"]},
        "total_bytes": {"down": sum(r["bytes_down"] for r in rows), "up": sum(r["bytes_up"] for r in rows)},
        "wall_s": round(sum(r["wall_s"] for r in rows), 3),
        "adapter_dir": rundir.ADAPTER,
    }
    if ledger is not None and ctx.privacy is not None:
        summary["privacy"] = guarantee(ctx.privacy, ledger)
    if stopped is not None:
        summary["stopped"] = stopped
    rundir.write_summary(out, summary)
    return summary


def final_evaluation(ctx: RunContext, adapter: Adapter, rows: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The last evaluated round; a run stopped early (privacy budget) evaluates the adapter it stopped with."""
    last = rows[-1]["round"] if rows else 0
    evaluated = next((r for r in reversed(rows) if "global" in r), None)
    if evaluated is not None and evaluated["round"] == last:
        return last, evaluated
    return last, evaluate_round(ctx, adapter)
