"""``fedlpp attack RUN_DIR``: what a client can hold, scored beside the server's adapter θ and the broadcast Q(θ).

Acting as one client, with only what that client has — its own data, the broadcasts it
received (kept in ``RUN_DIR/broadcasts/``), the backbone, the run's public settings — it
builds (DESIGN 6):

- ``keep``: the adapter it held after its last local training (its last broadcast trained
  again with the same seeds: bit for bit what it had; no client adapter is stored);
- ``finetune-N``: the final broadcast Q(θ) trained further on its own data for N steps;
- ``alone``: a fresh adapter trained only on its own data for the steps it spent in the
  federation — what it could have had without joining;
- ``collude-M``: the attacker and the M - 1 clients that trained most recently average what
  they keep, weighted by their data sizes as the server weights them.

Only ``score`` reads θ (the checkpoint), to score it. The figure that matters is the share
of the federation's value a client takes: (attack − alone) / (θ − alone), per metric.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms import wire
from fedlpp.algorithms.client import LocalTraining, shuffled_batches, train_client
from fedlpp.algorithms.factors import trained_names
from fedlpp.algorithms.fedavg_lora import weighted_mean
from fedlpp.config import ExperimentConfig, to_tree
from fedlpp.engine.setup import LocalRun, build_run, client_recipe
from fedlpp.evaluation.evaluate import evaluate_adapter, evaluation_unit, evaluation_work
from fedlpp.models.lora import Adapter, initial_adapter
from fedlpp.progress import open_bar
from fedlpp.seeding import derive_seed

LAST = "last"  # the attacker by default: a client of the last round (it holds the freshest training)


@dataclass(frozen=True)
class AttackPlan:
    clients: tuple[int, ...]  # the attacker first; all of them collude
    finetune_steps: tuple[int, ...]  # steps of fine-tuning Q(theta) on the attacker's data


def rounds_joined(rows: Sequence[Mapping[str, Any]], client: int) -> list[int]:
    """The rounds the client trained in (it knows: it was sent the broadcast), failed ones left out."""
    return [r["round"] for r in rows if client in r["clients"] and str(client) not in r.get("failed", {})]


def trained_clients(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Every client that trained at least once, the most recent first (ties: lower id first)."""
    last: dict[int, int] = {}
    for row in rows:
        for c in row["clients"]:
            if str(c) not in row.get("failed", {}):
                last[c] = row["round"]
    return sorted(last, key=lambda c: (-last[c], c))


def resolve_attacker(rows: Sequence[Mapping[str, Any]], client: int | str) -> int:
    """``client``, or for "last" the first client of the last round that trained."""
    if client != LAST:
        return int(client)
    trained = trained_clients(rows)
    if not trained:
        raise ValueError("no client trained in this run: nothing to attack")
    return trained[0]


def default_plan(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]], client: int, collude: int) -> AttackPlan:
    """One round's and ten rounds' budget of fine-tuning; the attacker and the ``collude`` - 1 clients that
    trained most recently (under the ``mean`` rule the whole last round colluding holds theta itself)."""
    others = [c for c in trained_clients(rows) if c != client]
    return AttackPlan((client, *others[: max(1, collude) - 1]), (cfg.fl.local_steps, 10 * cfg.fl.local_steps))


def keep_adapter(run: LocalRun, out: Path, client: int, rows: Sequence[Mapping[str, Any]], sigma: float) -> Adapter:
    """The adapter the client held after its last local training (before anything it sent was clipped or masked)."""
    joined = rounds_joined(rows, client)
    if not joined:
        raise ValueError(f"client {client} never trained in this run")
    ctx = run.server
    start, round_ = rnd.read_broadcast(rundir.load_broadcast(out, joined[-1]), ctx.shapes)
    recipe = client_recipe(ctx.cfg, ctx.side, ctx.spec, sigma, None)
    return _moved(
        start,
        recipe.training.train(ctx.model, ctx.side.kind, start, recipe.trained(round_), run.clients[client], round_, None).delta,
    )


def finetune_adapter(run: LocalRun, out: Path, client: int, steps: int) -> Adapter:
    """The final broadcast Q(theta), trained ``steps`` more optimizer steps on the client's own data (no DP: it is its own)."""
    ctx = run.server
    start, _ = rnd.read_broadcast(rundir.load_broadcast(out, rundir.FINAL_BROADCAST), ctx.shapes)
    return _trained(run, client, start, ctx.spec.broadcast_names(ctx.shapes), steps, "finetune")


def alone_adapter(run: LocalRun, client: int, steps: int) -> Adapter:
    """A fresh LoRA adapter (A and B trained) on the client's own data only, for ``steps`` steps."""
    ctx = run.server
    start = initial_adapter(ctx.shapes, derive_seed(ctx.cfg.seed, "attack-alone-a", client) % (2**31))
    return _trained(run, client, start, trained_names(ctx.shapes, "both", 1), steps, "alone")


def _trained(run: LocalRun, client: int, start: Adapter, trained: Sequence[str], steps: int, purpose: str) -> Adapter:
    cfg, data = run.server.cfg, run.clients[client]
    opts = dataclasses.replace(LocalTraining.of(cfg.train), proximal_mu=0.0)  # an attacker is not bound by FedProx
    batches = shuffled_batches(
        data.features, steps, cfg.train.batch_size, data.pad_id, derive_seed(cfg.seed, f"attack-{purpose}", client, steps)
    )
    delta = train_client(
        run.server.model,
        run.server.side.kind,
        start,
        trained,
        batches,
        opts,
        derive_seed(cfg.seed, f"attack-{purpose}-dropout", client),
        machine=run.server.side.machine,
    ).delta
    return _moved(start, delta)


def _moved(start: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Adapter:
    """``start`` with the trained tensors moved by ``delta`` (frozen ones as they were)."""
    return {n: start[n] + delta[n] if n in delta else start[n] for n in start}


def mean_adapter(adapters: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Adapter:
    """The weighted mean, as the server computes it (``fedavg_lora.weighted_mean``; weights = numbers of examples)."""
    return {n: weighted_mean([a[n] for a in adapters], weights) for n in adapters[0]}


def alone_steps(cfg: ExperimentConfig, rows: Sequence[Mapping[str, Any]], client: int) -> int:
    """The local steps the client spent in the federation: the budget of ``alone``."""
    return len(rounds_joined(rows, client)) * cfg.fl.local_steps


def client_side_adapters(
    run: LocalRun,
    out: Path,
    plan: AttackPlan,
    rows: Sequence[Mapping[str, Any]],
    sigma: float,
    with_alone: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Adapter]:
    """Every adapter the attacker (and its colluders) can build, from client-side information only."""
    attacker = plan.clients[0]
    say(f"attack: client {attacker} retrains its last round (keep)")
    held = {"keep": keep_adapter(run, out, attacker, rows, sigma)}
    for steps in plan.finetune_steps:
        say(f"attack: fine-tuning Q(theta) for {steps} steps")
        held[f"finetune-{steps}"] = finetune_adapter(run, out, attacker, steps)
    if with_alone:
        say("attack: training alone")
        held["alone"] = alone_adapter(run, attacker, alone_steps(run.server.cfg, rows, attacker))
    if len(plan.clients) > 1:
        say(f"attack: clients {', '.join(map(str, plan.clients[1:]))} retrain their last rounds (collude)")
        kept = [held["keep"]] + [keep_adapter(run, out, c, rows, sigma) for c in plan.clients[1:]]
        sizes = [float(len(run.clients[c].features)) for c in plan.clients]
        held[f"collude-{len(plan.clients)}"] = mean_adapter(kept, sizes)
    return held


# Sections that do not change ``alone`` (it trains a fresh adapter on the client's data, without DP):
# runs that differ only in these share its score, so a grid of algorithms trains and scores it once.
ALONE_INDEPENDENT = ("algorithm", "quant", "secagg", "privacy", "flower")


def alone_key(cfg: ExperimentConfig, client: int, steps: int) -> str:
    """A fingerprint of everything ``alone``'s score depends on (the client's data, the model, training, evaluation)."""
    tree = {k: v for k, v in to_tree(cfg).items() if k not in ALONE_INDEPENDENT}
    tree["fl"] = {k: v for k, v in tree["fl"].items() if k in ("num_clients",)}
    tree["train"] = {k: v for k, v in tree["train"].items() if k != "proximal_mu"}  # the attacker trains without it
    text = json.dumps({"config": tree, "client": client, "steps": steps}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_alone(cache: Path | None, key: str) -> dict[str, float] | None:
    """The cached score, or None (also for a damaged cache file: it is simply recomputed)."""
    path = None if cache is None else cache / f"alone-{key}.json"
    try:
        scores = json.loads(path.read_text())["scores"] if path is not None and path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return scores if isinstance(scores, dict) else None


def cache_alone(cache: Path | None, key: str, scores: Mapping[str, float]) -> None:
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        rundir.write_json(cache / f"alone-{key}.json", {"key": key, "scores": dict(scores)})


def value_taken(attack: float, alone: float, theta: float) -> float | None:
    """(attack - alone) / (theta - alone): 0 = no more than alone, 1 = all the federation's value (None: no value)."""
    return None if theta == alone else (attack - alone) / (theta - alone)


def check_finished(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The run must be finished: its final broadcast is Q of the adapter after its last recorded round."""
    if not rows:
        raise rundir.RunDirError(f"{out}: no round finished, nothing to attack")
    _, meta = wire.decode(rundir.load_broadcast(out, rundir.FINAL_BROADCAST), rnd.BROADCAST)
    if meta.get("round") != rows[-1]["round"] + 1:
        raise rundir.RunDirError(
            f"{out}: the run has not finished (its final broadcast is from before round "
            f"{rows[-1]['round']}); finish it with `fedlpp run --resume {out}` first"
        )


def recorded_scores(out: Path, round_: int) -> dict[str, dict[str, float]] | None:
    """theta's and Q(theta)'s scores as the run recorded them at ``round_`` (its final evaluation), if it did."""
    summary = rundir.read_summary(out)
    if summary.get("final_round") != round_ or "global" not in summary or "proxy" not in summary:
        return None
    return {"theta": summary["global"], "proxy": summary["proxy"]}


def score(
    run: LocalRun, out: Path, held: Mapping[str, Adapter], alone: Mapping[str, float] | None = None, progress: bool = False
) -> dict[str, Any]:
    """Scores of theta (the checkpoint, read only here), Q(theta) and every held adapter; the value each takes.

    theta's and Q(theta)'s scores are the run's own final evaluation when it made one (the same
    computation); ``alone``'s are taken as given when a cached score is passed.
    """
    ctx = run.server
    tok = ctx.side.backbone.tokenizer
    checkpoint = rundir.load_checkpoint(out)
    if checkpoint is None:
        raise rundir.RunDirError(f"{out} has no checkpoint: no round finished, nothing to attack")
    theta, round_ = checkpoint
    scores = recorded_scores(out, round_) or {}
    if not scores:
        proxy, _ = rnd.read_broadcast(rundir.load_broadcast(out, rundir.FINAL_BROADCAST), ctx.shapes)
        held = {"theta": theta, "proxy": proxy, **held}
    for name, adapter in held.items():
        with open_bar(
            evaluation_work(ctx.evalset),
            f"attack: scoring {name} ({evaluation_unit(ctx.evalset)})",
            enabled=progress,
            nested=True,
        ) as bar:
            scores[name] = evaluate_adapter(ctx.model, adapter, ctx.evalset, tok, ctx.decoding, bar.update, ctx.side.machine)
    if alone is not None:
        scores["alone"] = dict(alone)
    taken = {
        name: {m: value_taken(scores[name][m], scores["alone"][m], scores["theta"][m]) for m in scores["theta"]}
        for name in scores
        if name not in ("theta", "alone")
    }
    return {"scores": scores, "value_taken": taken}


def run_attack(
    out: Path,
    client: int | str = LAST,
    finetune_steps: Sequence[int] | None = None,
    collude: int = 1,
    cache: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The whole check for one attacking client; written to RUN_DIR/attack-client-K.json.

    ``cache``: a folder where ``alone``'s score is kept under a fingerprint of what it depends
    on, so runs that differ only in algorithm, quantization or privacy train and score it once.
    ``progress``: say each stage and show each evaluation's progress on stderr.
    """
    with rundir.exclusive(out):  # no run may move the checkpoint or the broadcasts meanwhile
        return _attack(out, client, finetune_steps, collude, cache, progress)


def _attack(
    out: Path, client: int | str, finetune_steps: Sequence[int] | None, collude: int, cache: Path | None, progress: bool
) -> dict[str, Any]:
    cfg = rundir.load_run_config(out, [])
    rows = rundir.read_metrics(out)
    check_finished(out, rows)
    client = resolve_attacker(rows, client)
    if not 0 <= client < cfg.fl.num_clients:
        raise ValueError(f"--client {client}: the run has clients 0..{cfg.fl.num_clients - 1}")
    plan = default_plan(cfg, rows, client, collude)
    if finetune_steps:
        plan = AttackPlan(plan.clients, tuple(finetune_steps))
    sigma = float(
        rundir.read_summary(out).get("privacy", {}).get("noise_multiplier", 0.0)
    )  # sent to every client with the broadcasts
    budget = alone_steps(cfg, rows, client)
    key = alone_key(cfg, client, budget)
    alone = cached_alone(cache, key)
    run = build_run(cfg)
    report = {
        "client": client,
        "colluders": list(plan.clients),
        "finetune_steps": list(plan.finetune_steps),
        "requested": {"collude": collude, "steps": list(finetune_steps or [])},
        "rounds_joined": rounds_joined(rows, client),
        "alone_steps": budget,
        **score(
            run,
            out,
            client_side_adapters(
                run, out, plan, rows, sigma, with_alone=alone is None, say=_stderr if progress else lambda _: None
            ),
            alone,
            progress,
        ),
    }
    cache_alone(cache, key, report["scores"]["alone"])
    rundir.write_json(out / f"attack-client-{client}.json", report)
    return report


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def format_attack(report: Mapping[str, Any]) -> str:
    scores, taken = report["scores"], report["value_taken"]
    metrics = list(scores["theta"])
    lines = [
        f"client {report['client']} (trained in rounds {report['rounds_joined']}); value taken = (attack - alone) / (theta - alone)",
        "",
        f"{'adapter':<16}" + "".join(f"{m:>10}" for m in metrics) + "".join(f"{'taken ' + m:>16}" for m in metrics),
    ]
    for name, row in scores.items():
        shares = taken.get(name, {})
        cells = "".join(f"{'' if shares.get(m) is None else format(shares[m], '.2f'):>16}" for m in metrics) if shares else ""
        lines.append(f"{name:<16}" + "".join(f"{row[m]:>10.3f}" for m in metrics) + cells)
    return "\n".join(lines)
