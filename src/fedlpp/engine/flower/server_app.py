"""The ServerApp: the server's loop (``engine/server.py``) over a Flower ``Grid``.

Start-up waits until the expected population of nodes is connected (round-1 sampling
otherwise races their registration), asks each node its client id and number of
examples, and builds the server's side: config, model, evaluation set, public counts —
never a client's data. Each round sends the broadcast to the sampled clients' nodes and
combines the replies with ``round.server_step``; a node that fails, times out or answers
with an error is listed under ``failed`` in the round's metrics row and the round goes on
with the others.

Deployed (``flwr run``), the run config names the experiment file and the run directory:
``config`` (a path on the server's machine), ``out``, and optionally ``resume = true`` and
``audit`` (a folder for a copy of every message sent). Who takes part is ``roster.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tomli_w
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlpp.config import ConfigError, ExperimentConfig, load_config, to_tree
from fedlpp.engine import rundir
from fedlpp.engine.flower import pinned
from fedlpp.engine.flower.audit import AuditLog, RecordingGrid
from fedlpp.engine.flower.messages import TRAIN, MessageError, content, exchange, fields_of, require
from fedlpp.engine.flower.roster import FlowerRunError, Roster, query_nodes, wait_for_nodes
from fedlpp.engine.flower.secure import SecureAggregation
from fedlpp.engine.server import Exchanged, PlainExchange, serve
from fedlpp.engine.setup import ServerContext, build_model, build_server, check_privacy, eval_only, load_task_data
from fedlpp.models.lora import Adapter
from fedlpp.progress import Bar

log = logging.getLogger(__name__)

app = ServerApp()


class Aggregation(Protocol):
    """How a round's training replies become the next adapter: as update bytes, or through SecAgg (chosen once)."""

    def train_fields(self, ctx: ServerContext, roster: Roster, clients: Sequence[int]) -> dict[str, Any]:
        """What every train message of the round carries besides the broadcast."""
        ...

    def read(self, fields: Mapping[str, Any]) -> None:
        """Refuse (MessageError) a training reply that lacks what ``combine`` needs."""
        ...

    def combine(
        self,
        federation: FlowerFederation,
        ctx: ServerContext,
        adapter: Adapter,
        answers: Mapping[int, dict[str, Any]],
        round_: int,
        failed: dict[int, str],
    ) -> tuple[Adapter, dict[str, Any]]:
        """The next adapter and the exchange's part of the metrics row; adds to ``failed``."""
        ...


class PlainAggregation:
    """Every client's update bytes are combined by ``round.server_step``."""

    def train_fields(self, ctx: ServerContext, roster: Roster, clients: Sequence[int]) -> dict[str, Any]:
        return {}

    def read(self, fields: Mapping[str, Any]) -> None:
        require(fields, "upload", bytes)

    def combine(
        self,
        federation: FlowerFederation,
        ctx: ServerContext,
        adapter: Adapter,
        answers: Mapping[int, dict[str, Any]],
        round_: int,
        failed: dict[int, str],
    ) -> tuple[Adapter, dict[str, Any]]:
        uploads = {c: fields["upload"] for c, fields in answers.items()}
        return PlainExchange().server_side(ctx, adapter, uploads, round_)


@dataclass
class FlowerFederation:
    """Sends each round's broadcast to the sampled clients' nodes and combines the replies."""

    grid: Grid
    roster: Roster
    config_text: str
    kind: str
    num_labels: int
    round_timeout: float
    aggregation: Aggregation

    def round_trip(
        self, ctx: ServerContext, adapter: Adapter, payload: bytes, clients: Sequence[int], round_: int, bar: Bar | None
    ) -> Exchanged:
        extra = self.aggregation.train_fields(ctx, self.roster, clients)
        messages = {c: self._train_message(payload, c, float(ctx.sigma), round_, extra) for c in clients}
        replies = exchange(self.grid, messages, self.round_timeout)
        answers, losses, peaks, failed = {}, [], [], {}
        for client in clients:
            try:
                answers[client], loss = self._read_reply(replies.get(client))
                peaks.append(_peak_memory(answers[client]))
            except (MessageError, FlowerRunError) as e:
                failed[client] = str(e)
                log.warning("round %d: client %d failed: %s", round_, client, e)
                continue
            losses.append(loss)
            if bar is not None:
                bar.update(ctx.cfg.fl.local_steps)
        new, row = self.aggregation.combine(self, ctx, adapter, answers, round_, failed)
        if failed:
            row["failed"] = {str(c): reason for c, reason in sorted(failed.items())}
        return Exchanged(new, row, losses, delivered=len(clients), peak_memory=peaks)

    def _train_message(self, payload: bytes, client: int, sigma: float, round_: int, extra: Mapping[str, Any]) -> Message:
        fields = content(
            config=self.config_text,
            kind=self.kind,
            num_labels=self.num_labels,
            client_id=client,
            sigma=sigma,
            round=round_,
            payload=payload,
            **extra,
        )
        return Message(
            fields, dst_node_id=self.roster.node_of[client], message_type=TRAIN, group_id=str(round_), ttl=self.round_timeout
        )  # a late node never trains a round that is over

    def _read_reply(self, reply: Message | None) -> tuple[dict[str, Any], float | None]:
        if reply is None:
            raise FlowerRunError(f"no reply within flower.round_timeout={self.round_timeout:g} s")
        if reply.has_error():
            raise FlowerRunError(f"error reply: {reply.error.reason}")
        fields = fields_of(reply)
        loss = require(fields, "loss", float)
        self.aggregation.read(fields)
        return fields, (None if math.isnan(loss) else loss)


def _peak_memory(fields: Mapping[str, Any]) -> int:
    """What a node reports of its step's peak memory (0 from a node that reports none): shown, never trusted."""
    value = fields.get("peak_memory", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def serve_on_grid(grid: Grid, cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = False) -> dict[str, Any]:
    """The whole run on a Grid: wait for the nodes, build the server's side, run the rounds into ``out``."""
    if not resume:
        rundir.check_new(out)
    task = eval_only(load_task_data(cfg))  # before waiting for nodes: a bad data path fails at once
    config_text = tomli_w.dumps(to_tree(cfg))
    nodes = wait_for_nodes(grid, cfg.fl.num_clients, cfg.flower.connect_timeout)
    roster = query_nodes(
        grid, nodes, config_text, cfg.flower.round_timeout, secure=cfg.secagg.enabled, kind=task.kind, num_labels=task.num_labels
    )
    ctx = build_server(cfg, task, build_model(cfg, task.kind, task.num_labels), roster.sizes, check_privacy(cfg, roster.sizes))
    aggregation: Aggregation = SecureAggregation() if ctx.secure is not None else PlainAggregation()
    federation = FlowerFederation(grid, roster, config_text, ctx.side.kind, ctx.num_labels, cfg.flower.round_timeout, aggregation)
    return serve(ctx, federation, out, resume, progress)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployed: ``flwr run`` with run config ``config`` (experiment file), ``out``, ``resume``, ``overrides`` and ``audit``."""
    pinned.shorten_pull_backoff()  # a reply is visible before its objects have all arrived: Flower would wait 1 s or more
    run_config = context.run_config
    path, out, audit = run_config.get("config", ""), run_config.get("out", ""), run_config.get("audit", "")
    if not isinstance(path, str) or not path or not isinstance(out, str) or not out:
        raise ConfigError("the run config needs config='<experiment TOML on the server>' and out='<run directory>'")
    resume = bool(run_config.get("resume", False))
    overrides = str(run_config.get("overrides", "")).split()
    cfg = rundir.resumed_config(Path(out), overrides) if resume else load_config(path, overrides)
    if cfg.privacy.enabled and not cfg.privacy.secure_noise:
        raise ConfigError(
            "privacy.secure_noise: a deployment needs true — the clients' DP noise must come from their own "
            "OS CSPRNG, not from the run's seed, which the server knows"
        )
    if isinstance(audit, str) and audit:
        grid = RecordingGrid(grid, AuditLog(Path(audit), prefix=str(context.run_id)))  # type: ignore[assignment]
    summary = serve_on_grid(grid, cfg, Path(out), resume)
    log.info("fedlpp: run finished into %s: %s", out, {k: summary[k] for k in ("rounds", "global", "proxy")})
    from fedlpp.reporting import write_report

    try:  # the run directory is a run like any other: report.md and the plots
        log.info("fedlpp: report: %s", ", ".join(p.name for p in write_report([Path(out)], Path(out))))
    except Exception as e:  # noqa: BLE001 - the run itself is done and saved; `fedlpp report` can write it later
        log.warning("fedlpp: the run is complete but its report could not be written (%s); run `fedlpp report %s`", e, out)
