"""The server's run, whatever carries the messages: rounds, evaluation, accountant, run directory.

A round (``run_round``) reads top to bottom: broadcast (the algorithm) -> the transport moves
it to the sampled clients and their replies back (local, simulation or deployment) -> the
aggregation pipeline combines them (decode, [client-level DP], [SecAgg], mean, server rule)
-> the server optimizer -> the next adapter, evaluated when due. The steps are chosen once
when the run starts (``RoundSteps``); the loop (``_serve``) asks the privacy accountant
before each round and checkpoints after it. All randomness derives from (seed, round,
client), so ``--resume`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlpp import rundir
from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.server_opt import ServerOptimizer, make_server_optimizer
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.algorithms.steps import mean_finite
from fedlpp.config import MIN_NOISE
from fedlpp.engine.aggregation import Aggregation, Proposal
from fedlpp.engine.setup import ServerContext, client_selection, make_aggregation
from fedlpp.engine.transport import Replies, Transport
from fedlpp.evaluation.evaluate import evaluate_adapter, evaluation_unit, evaluation_work
from fedlpp.models.lora import Adapter, save_peft_adapter
from fedlpp.privacy.accountant import LEDGER_KEY, Accountant, LedgerAccountant, NoPrivacy
from fedlpp.privacy.accounting import SIGMA_MAX
from fedlpp.privacy.plan import Ledger, PrivacyPlan
from fedlpp.progress import Bar, Show, open_bar, shower
from fedlpp.provenance import code_version

log = logging.getLogger(__name__)

__all__ = ["LEDGER_KEY", "RoundSteps", "run_round", "serve"]


WEIGHTING = {True: "uniform", False: "examples"}  # what the train message tells the clients their update weighs


@dataclass
class RoundSteps:
    """A run's round, as steps chosen once when it starts (or resumes)."""

    select: Callable[[int], list[int]]  # round -> its clients
    aggregation: Aggregation  # replies -> the proposed adapter
    optimizer: ServerOptimizer  # the proposed step -> the step taken (state clients never see)
    accountant: Accountant  # privacy: may the round run, what it spent


@dataclass
class RoundOutcome:
    adapter: Adapter
    row: dict[str, Any]
    broadcast: bytes  # what the round's clients received


def run_round(
    ctx: ServerContext,
    steps: RoundSteps,
    transport: Transport,
    adapter: Adapter,
    round_: int,
    clients: Sequence[int],
    show: Show | None = None,
) -> RoundOutcome:
    """One round: broadcast, the transport's exchange, the aggregation, the server optimizer, evaluation when due."""
    t0 = time.perf_counter()
    payload = rnd.make_broadcast(ctx.spec, adapter, ctx.a_seed, round_)
    fields = {
        "sigma": float(ctx.sigma),
        "weighting": WEIGHTING[ctx.uniform_weights],
        **steps.aggregation.train_fields(round_, clients),
    }
    with _progress(show, len(clients) * ctx.cfg.fl.local_steps, f"round {round_} client steps") as bar:
        replies = transport.train(payload, clients, round_, fields, bar)
    proposal = steps.aggregation.combine(adapter, replies, round_, transport)
    new = steps.optimizer.step(adapter, proposal.adapter)
    row = round_row(round_, clients, proposal, replies, len(payload), steps.accountant.shows_training_loss)
    if round_ % ctx.cfg.eval.every == 0 or round_ == ctx.cfg.fl.rounds:
        row.update(evaluate_round(ctx, new, show, f"round {round_} evaluation"))
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    return RoundOutcome(new, row, payload)


def round_row(
    round_: int, clients: Sequence[int], proposal: Proposal, replies: Replies, broadcast_bytes: int, with_loss: bool
) -> dict[str, Any]:
    """The round's metrics row: who took part, what failed, the training loss (not under DP), bytes, peak memory."""
    row = {"round": round_, "clients": list(clients), **proposal.row}
    if proposal.void:
        row["void"] = True  # the adapter is the previous round's: nothing was combined
    if replies.failed:
        row["failed"] = {str(c): reason for c, reason in sorted(replies.failed.items())}
    if with_loss:  # under DP the clients' loss is computed from their data without noise: it is not released
        row["train_loss"] = mean_finite([v for f in replies.answers.values() if isinstance(v := f.get("loss"), float)])
    row["bytes_down"] = row.get("bytes_down", 0) + broadcast_bytes * len(clients)
    peaks = [_peak_memory(f) for f in replies.answers.values()]
    if peaks:
        row["client_peak_memory_bytes"] = max(peaks)
    return row


def _peak_memory(fields: Mapping[str, Any]) -> int:
    """What a client reports of its step's peak memory (0 when it reports none): shown, never trusted."""
    value = fields.get("peak_memory", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@contextlib.contextmanager
def _progress(show: Show | None, total: int, desc: str) -> Iterator[Bar | None]:
    if show is None:
        yield None
        return
    with show(total, desc) as bar:
        yield bar


def evaluate_round(
    ctx: ServerContext, adapter: Mapping[str, torch.Tensor], show: Show | None = None, desc: str = "evaluation"
) -> dict[str, dict[str, float]]:
    """Global (server's full-precision) and proxy (what clients can build) side by side."""
    tok = ctx.side.backbone.tokenizer
    proxy = rnd.proxy_point(ctx.spec, adapter)
    same = all(torch.equal(proxy[n], adapter[n]) for n in adapter)
    total = (1 if same else 2) * evaluation_work(ctx.evalset)
    with (
        contextlib.nullcontext()
        if show is None
        else show(total, f"{desc}{'' if same else ', global then proxy'} ({evaluation_unit(ctx.evalset)})") as bar
    ):
        on_batch = bar.update if bar is not None else None
        machine = ctx.side.machine
        global_metrics = evaluate_adapter(ctx.model, adapter, ctx.evalset, tok, ctx.decoding, on_batch, machine)
        proxy_metrics = (
            dict(global_metrics)
            if same
            else evaluate_adapter(ctx.model, proxy, ctx.evalset, tok, ctx.decoding, on_batch, machine)
        )
    return {"global": global_metrics, "proxy": proxy_metrics}


def open_run_dir(out: Path, ctx: ServerContext, resume: bool) -> None:
    """Write the config of a new run, or check (writing nothing) that a resumed one may grow to fl.rounds."""
    if resume:
        rundir.check_extends(out, ctx.cfg.fl.rounds)
    else:
        rundir.prepare_new(out, ctx.cfg)


def commit_resume(out: Path, ctx: ServerContext, last: int) -> None:
    """Once every check of a resume has passed: the config with its new fl.rounds, metrics cut to the checkpoint.
    A refused resume writes nothing."""
    rundir.truncate_metrics(out, last)
    rundir.save_config(out, ctx.cfg)


def serve(ctx: ServerContext, transport: Transport, out: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the rounds into the run directory ``out`` and return the summary.

    The directory is held for the whole run (``rundir.exclusive``): a second process on it is refused.
    """
    with rundir.exclusive(out):
        open_run_dir(out, ctx, resume)  # refuses a folder holding another run before anything is written
        try:
            return _serve(ctx, transport, out, resume, progress)
        except BaseException:
            if not resume:
                rundir.discard_unstarted(out)  # this new run never finished a round: it leaves nothing behind
            raise


def _serve(ctx: ServerContext, transport: Transport, out: Path, resume: bool, show_progress: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    adapter, last, rows = start_or_resume(ctx, out, resume)
    steps = start_round_steps(ctx, out, resume, rows)
    if resume:
        commit_resume(out, ctx, last)
    history = rundir.MetricsDigest(rows)  # each checkpoint records the digest of every row so far
    stopped = None
    rounds_bar = open_bar(cfg.fl.rounds, "rounds", enabled=show_progress, initial=last)
    show = shower(show_progress)
    try:
        for round_ in range(last + 1, cfg.fl.rounds + 1):
            clients = steps.select(round_)
            stopped = steps.accountant.admit(round_, clients)
            if stopped is not None:
                break
            outcome = run_round(ctx, steps, transport, adapter, round_, clients, show)
            steps.accountant.commit(outcome.row.get("secagg_survivors"))  # whose inputs the released sum holds
            adapter = outcome.adapter
            outcome.row.update(steps.accountant.row())
            rows.append(outcome.row)
            history.add(outcome.row)
            record_round(out, ctx, steps, outcome, round_, history.hexdigest())
            rounds_bar.set_postfix(_postfix(outcome.row), refresh=False)
            rounds_bar.update(1)
    finally:
        rounds_bar.close()
    return finish(ctx, out, adapter, rows, steps.accountant, stopped)


def start_round_steps(ctx: ServerContext, out: Path, resume: bool, rows: Sequence[Mapping[str, Any]] = ()) -> RoundSteps:
    """The round's steps; on resume the accountant and the server optimizer continue from the checkpoint.

    The accountant comes first: a resumed run keeps the noise multiplier it was calibrated with,
    which the aggregation's DP steps then use.
    """
    accountant = start_accountant(ctx, out, resume, rows)
    return RoundSteps(client_selection(ctx.cfg), make_aggregation(ctx), start_server_optimizer(ctx, out, resume), accountant)


def record_round(out: Path, ctx: ServerContext, steps: RoundSteps, outcome: RoundOutcome, round_: int, history: str) -> None:
    """The round's broadcast, metrics row and checkpoint (adapter, config, accountant, server optimizer state, the
    digest of every metrics row so far)."""
    rundir.save_broadcast(out, round_, outcome.broadcast)
    rundir.append_metrics(out, outcome.row)
    metadata = {
        rundir.CONFIG_KEY: rundir.config_record(ctx.cfg),
        **steps.accountant.checkpoint(),
        rundir.METRICS_DIGEST_KEY: history,
    }
    rundir.save_checkpoint(out, outcome.adapter, round_, metadata, steps.optimizer.state())


def fedavg_reference_bytes(ctx: ServerContext, adapter: Adapter) -> dict[str, int]:
    """Bytes per client per round that FedAvg+LoRA (float32) would send for this adapter."""
    fedavg = AlgorithmSpec("fedavg_lora", quant=None)
    down = len(rnd.make_broadcast(fedavg, adapter, ctx.a_seed, 1))
    up = len(rnd.make_update({n: torch.zeros(s) for n, s in ctx.shapes.items()}, 1, 1))
    return {"down": down, "up": up}


def start_or_resume(ctx: ServerContext, out: Path, resume: bool) -> tuple[Adapter, int, list[dict[str, Any]]]:
    """The adapter to start from, the last finished round, and the metrics rows kept."""
    ckpt = rundir.load_checkpoint(out) if resume else None
    if ckpt is None:
        # A kill between round 1's metrics row and its checkpoint leaves a row and no checkpoint: that run
        # restarts. A row of a later round means a checkpoint existed and is gone.
        if resume and any(r["round"] >= 2 for r in rundir.read_metrics(out)):
            raise rundir.RunDirError(
                f"{out / rundir.CHECKPOINT} is missing but {rundir.METRICS} records finished rounds: "
                "resuming would silently restart the run (and any privacy accounting) from round 0"
            )
        return ctx.initial_adapter(), 0, []
    adapter, last = ckpt
    rundir.check_checkpoint_config(out, ctx.cfg)
    check_adapter_shapes(out, adapter, ctx.shapes)
    rows = rundir.metrics_up_to(out, last)
    rundir.check_metrics(out, rows)
    log.info("resuming %s after round %d", out, last)
    return adapter, last, rows


def check_adapter_shapes(out: Path, adapter: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The checkpoint's adapter must be this run's: the same tensor names and shapes, float32."""
    path = out / rundir.CHECKPOINT
    if set(adapter) != set(shapes):
        extra, missing = sorted(set(adapter) - set(shapes)), sorted(set(shapes) - set(adapter))
        raise rundir.RunDirError(
            f"{path} does not hold this run's adapter: "
            + (f"unexpected tensor {extra[0]}" if extra else f"no tensor {missing[0]}")
        )
    for name, tensor in adapter.items():
        if tuple(tensor.shape) != tuple(shapes[name]) or tensor.dtype != torch.float32:
            raise rundir.RunDirError(
                f"{path}: {name} is {tuple(tensor.shape)} {tensor.dtype}, this run's adapter has "
                f"{tuple(shapes[name])} torch.float32"
            )


def start_server_optimizer(ctx: ServerContext, out: Path, resume: bool) -> ServerOptimizer:
    """The server optimizer, with the state it had at the checkpoint when resuming."""
    optimizer = make_server_optimizer(ctx.cfg.algorithm)
    if resume:
        try:
            optimizer.load(rundir.load_server_state(out))
            optimizer.check(ctx.shapes)
        except ValueError as e:
            raise rundir.RunDirError(f"{out / rundir.CHECKPOINT}: {e}") from None
    return optimizer


def start_accountant(ctx: ServerContext, out: Path, resume: bool, rows: Sequence[Mapping[str, Any]] = ()) -> Accountant:
    """The privacy accountant. On resume its ledger is replayed from the rounds the run recorded (each round's
    clients in metrics.jsonl, which the checkpoint's digest ties to it) and must equal the ledger the checkpoint
    holds: epsilon is computed, never read back, and an edited ledger is refused rather than believed."""
    plan = ctx.privacy
    if plan is None:
        return NoPrivacy()
    stored = rundir.load_checkpoint_metadata(out).get(LEDGER_KEY) if resume else None
    if stored is None:
        if resume and (out / rundir.CHECKPOINT).exists():
            raise rundir.RunDirError(
                f"{out / rundir.CHECKPOINT} has no privacy ledger: the rounds it finished "
                "could not be accounted for, so the run cannot continue under DP"
            )
        return LedgerAccountant.start(plan)
    ledger = _stored_ledger(out, stored)
    _check_sigma(out, ledger.noise_multiplier, plan)
    if ledger.noise_multiplier != plan.noise_multiplier:
        # fl.rounds grew: sigma stays what the run was calibrated with (the budget then stops it).
        ctx.privacy = plan = dataclasses.replace(plan, noise_multiplier=ledger.noise_multiplier)
    charged = "secagg_survivors" if plan.distributed is not None else "clients"  # distributed DP: the sum's shares
    replayed = LedgerAccountant.replayed(plan, [row.get(charged, row["clients"]) for row in rows])
    if replayed.ledger.histories != ledger.histories:
        unit = next(
            u
            for u in sorted(set(ledger.histories) | set(replayed.ledger.histories))
            if ledger.histories.get(u) != replayed.ledger.histories.get(u)
        )
        raise rundir.RunDirError(
            f"{out / rundir.CHECKPOINT}: its privacy ledger does not match the rounds {rundir.METRICS} records "
            f"(epsilon {ledger.epsilon:.4g} stored, {replayed.ledger.epsilon:.4g} from the rounds run; first difference: "
            f"unit {unit!r}, stored {ledger.histories.get(unit)} against {replayed.ledger.histories.get(unit)} — a changed "
            "ledger, or a client whose number of examples, and so its sampling rate, changed): the run cannot continue under DP"
        )
    return replayed


def _check_sigma(out: Path, stored: float, plan: PrivacyPlan) -> None:
    """The ledger's noise multiplier must be the one this config gives: the same when sigma is given; when it is
    calibrated, no more than the config's (calibrated for fl.rounds now, which a resume may only raise: more rounds
    need more noise). A larger sigma would account the past rounds as noisier than they were."""
    given = plan.calibrated_for == 0
    if (given and stored != plan.noise_multiplier) or (not given and stored > plan.noise_multiplier * (1 + 1e-9)):
        raise rundir.RunDirError(
            f"{out / rundir.CHECKPOINT}: its privacy ledger holds noise multiplier {stored:g}, but this run's config "
            f"{'gives' if given else 'calibrates at most'} {plan.noise_multiplier:g}: the past rounds cannot be "
            "accounted with a noise they did not have"
        )


def _stored_ledger(out: Path, stored: str) -> Ledger:
    """The checkpoint's ledger, whose noise multiplier must be one a run could have used."""
    try:
        ledger = Ledger.from_json(stored)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise rundir.RunDirError(f"{out / rundir.CHECKPOINT}: its privacy ledger is damaged ({e})") from None
    sigma = ledger.noise_multiplier
    if not (math.isfinite(sigma) and MIN_NOISE <= sigma <= SIGMA_MAX):
        raise rundir.RunDirError(
            f"{out / rundir.CHECKPOINT}: its privacy ledger holds noise multiplier {sigma}, which no run uses"
        )
    return ledger


def _postfix(row: Mapping[str, Any]) -> dict[str, str]:
    post = {} if row.get("train_loss") is None else {"train_loss": f"{row['train_loss']:.3f}"}
    if "global" in row:
        post["global_loss"] = f"{row['global']['loss']:.3f}"
        post["proxy_loss"] = f"{row['proxy']['loss']:.3f}"
    return post


def finish(
    ctx: ServerContext,
    out: Path,
    adapter: Adapter,
    rows: list[dict[str, Any]],
    accountant: Accountant | None = None,
    stopped: str | None = None,
) -> dict[str, Any]:
    """Save the final adapter in peft format and the broadcast a next round would send; write summary.json."""
    rundir.save_private_folder(
        out / rundir.ADAPTER, lambda folder: save_peft_adapter(ctx.model, adapter, folder, ctx.side.backbone.source)
    )
    last = rows[-1]["round"] if rows else 0
    rundir.save_broadcast(out, rundir.FINAL_BROADCAST, rnd.make_broadcast(ctx.spec, adapter, ctx.a_seed, last + 1))
    reference = fedavg_reference_bytes(ctx, adapter)
    final_round, final_eval = final_evaluation(ctx, adapter, rows)
    k = max(1, len(rows[-1]["clients"])) if rows else 1  # Poisson client sampling: the round's own count
    down = rows[-1]["bytes_down"] / k if rows else 0.0
    up = rows[-1]["bytes_up"] / k if rows else 0.0
    summary = {
        "algorithm": ctx.spec.name,
        "model": ctx.cfg.model.name,
        "task": ctx.task_name,
        "rounds": len(rows),
        "final_round": final_round,
        "global": final_eval["global"],
        "proxy": final_eval["proxy"],
        "bytes_per_client_per_round": {"down": down, "up": up},
        "fedavg_lora_bytes_per_client_per_round": reference,
        "ratio_to_fedavg_lora": {"down": down / reference["down"], "up": up / reference["up"]},
        "total_bytes": {"down": sum(r["bytes_down"] for r in rows), "up": sum(r["bytes_up"] for r in rows)},
        "wall_s": round(sum(r["wall_s"] for r in rows), 3),
        **peak_memory_summary(ctx, rows),
        "adapter_dir": rundir.ADAPTER,
        "code": code_version(),
    }
    summary.update((accountant or NoPrivacy()).summary())
    if stopped is not None:
        summary["stopped"] = stopped
    rundir.write_summary(out, summary)
    return summary


def peak_memory_summary(ctx: ServerContext, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest peak memory a client reported for its step (a GPU client: CUDA's peak allocation; a CPU one: its
    process's peak RSS during the step), the server process's peak while it loaded the model, and the server's machine
    (in the local engine, the clients' too)."""
    machine = ctx.side.machine
    summary: dict[str, Any] = {
        "machine": {
            "device": machine.device,
            "precision": machine.precision,
            "quantize": machine.quantize,
            "gradient_checkpointing": machine.gradient_checkpointing,
        },
        "model_load_peak_memory_bytes": ctx.side.load_peak_memory,
    }
    peaks = [r["client_peak_memory_bytes"] for r in rows if "client_peak_memory_bytes" in r]
    if peaks:
        summary["client_peak_memory_bytes"] = max(peaks)
        summary["client_peak_memory"] = f"{max(peaks) / 2**30:.2f} GiB"
    return summary


def final_evaluation(ctx: ServerContext, adapter: Adapter, rows: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """The last evaluated round; a run stopped early (privacy budget) evaluates the adapter it stopped with."""
    last = rows[-1]["round"] if rows else 0
    evaluated = next((r for r in reversed(rows) if "global" in r), None)
    if evaluated is not None and evaluated["round"] == last:
        return last, evaluated
    return last, evaluate_round(ctx, adapter)
