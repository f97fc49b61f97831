"""The ServerApp: the server's loop (``engine/server.py``) over a Flower ``Grid``.

Start-up waits until the expected population of nodes is connected (round-1 sampling
otherwise races their registration), asks each node its client id and number of
examples, and builds the server's side: config, model, evaluation set, public counts —
never a client's data. ``FlowerTransport`` then carries each round's messages to the
sampled clients' nodes and back, and the server's loop (``engine/server.py``) combines the
replies; a node that fails, times out or answers with an error is listed under ``failed``
in the round's metrics row and the round goes on with the others.

Deployed (``flwr run``), the run config names the experiment file and the run directory:
``config`` (a path on the server's machine), ``out``, and optionally ``resume = true`` and
``audit`` (a folder for a copy of every message sent). Who takes part is ``roster.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlpp import rundir
from fedlpp.config import ConfigError, ExperimentConfig, load_config, to_tree
from fedlpp.engine.flower import pinned
from fedlpp.engine.flower.audit import AuditLog, RecordingGrid
from fedlpp.engine.flower.messages import TRAIN, content, exchange, fields_of
from fedlpp.engine.flower.roster import FlowerRunError, Roster, query_nodes, wait_for_nodes
from fedlpp.engine.server import serve
from fedlpp.engine.setup import build_model, build_server, check_privacy, distributed_dp, eval_only, load_task_data
from fedlpp.engine.transport import Fields, MessageError, Replies, require
from fedlpp.progress import Bar
from fedlpp.provenance import code_version

log = logging.getLogger(__name__)

app = ServerApp()


@dataclass
class FlowerTransport:
    """Sends each round's messages to the sampled clients' nodes and brings their replies back."""

    grid: Grid
    roster: Roster
    config_text: str
    kind: str
    num_labels: int
    round_timeout: float
    local_steps: int  # each trained reply advances the progress bar by this many steps

    def train(self, payload: bytes, clients: Sequence[int], round_: int, fields: Mapping[str, Any], bar: Bar | None) -> Replies:
        setup = {"config": self.config_text, "kind": self.kind, "num_labels": self.num_labels}
        messages = {c: {**setup, "client_id": c, **fields, "round": round_, "payload": payload} for c in clients}
        replies = self._exchange(TRAIN, round_, messages)
        for client, answer in list(replies.answers.items()):
            try:
                require(answer, "loss", float)
            except MessageError as e:
                replies.refuse(client, str(e))
                continue
            if bar is not None:
                bar.update(self.local_steps)
        for client, reason in replies.failed.items():
            log.warning("round %d: client %d failed: %s", round_, client, reason)
        return replies

    def ask(self, action: str, round_: int, messages: Mapping[int, Fields]) -> Replies:
        return self._exchange(f"{TRAIN}.{action}", round_, messages)

    def _exchange(self, message_type: str, round_: int, messages: Mapping[int, Mapping[str, Any]]) -> Replies:
        out = {
            c: Message(
                content(**fields),
                dst_node_id=self.roster.node_of[c],
                message_type=message_type,
                group_id=str(round_),
                ttl=self.round_timeout,  # a late node never answers a round that is over
            )
            for c, fields in messages.items()
        }
        received = exchange(self.grid, out, self.round_timeout)
        replies = Replies()
        for client in messages:
            try:
                replies.answers[client] = self._read(received.get(client))
            except (MessageError, FlowerRunError) as e:
                replies.failed[client] = str(e)  # logged by whoever asked (train, or the SecAgg driver)
        return replies

    def _read(self, reply: Message | None) -> Fields:
        if reply is None:
            raise FlowerRunError(f"no reply within flower.round_timeout={self.round_timeout:g} s")
        if reply.has_error():
            raise FlowerRunError(f"error reply: {reply.error.reason}")
        return fields_of(reply)


def serve_on_grid(
    grid: Grid, cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = False, data_assigned: bool = True
) -> dict[str, Any]:
    """The whole run on a Grid: wait for the nodes, build the server's side, run the rounds into ``out``.

    ``data_assigned``: the clients' data is the partition the server cut (simulation); a deployment's nodes bring
    their own, and their example counts are only what they declare (fl.weighting=auto then weighs them the same).
    """
    code_version()  # the commit this process starts with (before waiting for nodes), which summary.json records
    if not resume:
        rundir.check_new(out)
    task = eval_only(load_task_data(cfg))  # before waiting for nodes: a bad data path fails at once
    config_text = tomli_w.dumps(to_tree(cfg))
    nodes = wait_for_nodes(grid, cfg.fl.num_clients, cfg.flower.connect_timeout)
    roster = query_nodes(
        grid, nodes, config_text, cfg.flower.round_timeout, secure=cfg.secagg.enabled, kind=task.kind, num_labels=task.num_labels
    )
    side = build_model(cfg, task.kind, task.num_labels)
    ctx = build_server(cfg, task, side, roster.sizes, check_privacy(cfg, roster.sizes), roster.verify_keys, data_assigned)
    transport = FlowerTransport(
        grid, roster, config_text, side.kind, ctx.num_labels, cfg.flower.round_timeout, cfg.fl.local_steps
    )
    return serve(ctx, transport, out, resume, progress)


def check_deployable_privacy(cfg: ExperimentConfig) -> None:
    """A deployed run's DP noise must come from each party's own OS CSPRNG, not from the run's seed, which the
    server knows: privacy.secure_noise=true. Distributed DP needs no such setting: its noise shares and its rounding
    draws always come from each node's OS CSPRNG (its rotation signs are public by design, and it claims no
    amplification by sampling)."""
    if cfg.privacy.enabled and not cfg.privacy.secure_noise and not distributed_dp(cfg):
        raise ConfigError(
            "privacy.secure_noise: a deployment needs true — the clients' DP noise must come from their own "
            "OS CSPRNG, not from the run's seed, which the server knows"
        )


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
    check_deployable_privacy(cfg)
    if isinstance(audit, str) and audit:
        grid = RecordingGrid(grid, AuditLog(Path(audit), prefix=str(context.run_id)))  # type: ignore[assignment]
    summary = serve_on_grid(grid, cfg, Path(out), resume, data_assigned=False)  # the nodes' data is their own
    log.info("fedlpp: run finished into %s: %s", out, {k: summary[k] for k in ("rounds", "global", "proxy")})
    from fedlpp.evaluation.report import write_report

    try:  # the run directory is a run like any other: report.md and the plots
        log.info("fedlpp: report: %s", ", ".join(p.name for p in write_report([Path(out)], Path(out))))
    except Exception as e:  # noqa: BLE001 - the run itself is done and saved; `fedlpp report` can write it later
        log.warning("fedlpp: the run is complete but its report could not be written (%s); run `fedlpp report %s`", e, out)
