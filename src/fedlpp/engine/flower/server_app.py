"""The ServerApp: the server's loop (``engine/server.py``) over a Flower ``Grid``.

Start-up waits until the expected population of nodes is connected (round-1 sampling
otherwise races their registration), asks each node its client id and number of
examples, and builds the server's side: config, model, evaluation set, public counts —
never a client's data. Each round sends the broadcast to the sampled clients' nodes and
combines the replies with ``round.server_step``; a node that fails, times out or answers
with an error is listed under ``failed`` in the round's metrics row and the round goes on
with the others.

Deployed (``flwr run``), the run config names the experiment file and the run directory:
``config`` (a path on the server's machine), ``out`` and optionally ``resume = true``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import partial
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedlpp.algorithms.secure import SecureMean
from fedlpp.config import ConfigError, ExperimentConfig, load_config, to_tree
from fedlpp.engine import rundir
from fedlpp.engine.flower.messages import POLL_S, QUERY, TRAIN, MessageError, content, exchange, fields_of, require
from fedlpp.engine.flower.secure import ProtocolOverGrid, registry_text
from fedlpp.engine.local import PlainExchange
from fedlpp.engine.secure import finish_round, void_round
from fedlpp.engine.server import Exchanged, serve
from fedlpp.engine.setup import ServerContext, build_model, build_server, check_privacy, load_task_data, server_combiner
from fedlpp.models.lora import Adapter, copy_adapter
from fedlpp.secagg import SecAggAbort, Traffic

log = logging.getLogger(__name__)

UNASSIGNED = -1

app = ServerApp()


class FlowerRunError(RuntimeError):
    """The federation cannot run as configured (too few nodes, duplicate client ids, ...)."""


@dataclass(frozen=True)
class Roster:
    """Which node holds which client, and each client's number of examples (public counts)."""

    node_of: dict[int, int]  # client id -> Flower node id
    sizes: list[int]  # by client id
    verify_keys: dict[int, bytes] = field(default_factory=dict)  # client id -> SecAgg verify key (secagg.enabled)


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """The connected node ids once ``expected`` have registered; a clear error after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise FlowerRunError(f"only {len(nodes)} of the {expected} expected nodes (fl.num_clients) connected "
                                 f"within flower.connect_timeout={timeout:g} s")
        time.sleep(POLL_S)


def query_nodes(grid: Grid, nodes: Sequence[int], config_text: str, timeout: float) -> Roster:
    """Ask every node who it is; nodes without a client id get the free ids in node-id order."""
    asks = {n: Message(content(config=config_text), dst_node_id=n, message_type=QUERY) for n in nodes}
    answers: dict[int, tuple[int, int]] = {}
    keys: dict[int, bytes] = {}
    for node, reply in exchange(grid, asks, timeout).items():
        if reply.has_error():
            raise FlowerRunError(f"node {node} cannot take part: {reply.error.reason}")
        fields = fields_of(reply)
        answers[node] = (require(fields, "client_id", int), require(fields, "num_examples", int))
        if "verify_key" in fields:
            keys[node] = require(fields, "verify_key", bytes)
    missing = sorted(set(nodes) - set(answers))
    if missing:
        raise FlowerRunError(f"nodes {missing} did not answer within {timeout:g} s")
    roster = assign_clients(answers, len(nodes))
    return Roster(roster.node_of, roster.sizes, {c: keys[n] for c, n in roster.node_of.items() if n in keys})


def assign_clients(answers: Mapping[int, tuple[int, int]], num_clients: int) -> Roster:
    """Client ids from the nodes' answers {node: (client id or -1, examples)}; each id in [0, N) once."""
    node_of: dict[int, int] = {}
    for node, (client, _) in sorted(answers.items()):
        if client == UNASSIGNED:
            continue
        if not 0 <= client < num_clients or client in node_of:
            raise FlowerRunError(f"node {node} says it is client {client}: ids must be distinct and in [0, {num_clients})")
        node_of[client] = node
    free = iter(c for c in range(num_clients) if c not in node_of)
    for node, (client, _) in sorted(answers.items()):
        if client == UNASSIGNED:
            node_of[next(free)] = node
    sizes = [answers[node_of[c]][1] for c in range(num_clients)]
    return Roster(node_of, sizes)


@dataclass
class FlowerFederation:
    """Sends each round's broadcast to the sampled clients' nodes and combines the replies."""

    grid: Grid
    roster: Roster
    config_text: str
    kind: str
    num_labels: int
    round_timeout: float

    def round_trip(self, ctx: ServerContext, adapter: Adapter, payload: bytes, clients: Sequence[int], round_: int,
                   bar: tqdm | None) -> Exchanged:
        sigma = float(ctx.privacy.noise_multiplier) if ctx.privacy is not None else 0.0
        messages = {c: self._train_message(ctx, payload, c, clients, sigma, round_) for c in clients}
        replies = exchange(self.grid, messages, self.round_timeout)
        answers, losses, failed = {}, [], {}
        for client in clients:
            try:
                answers[client], loss = self._read_reply(replies.get(client))
            except (MessageError, FlowerRunError) as e:
                failed[client] = str(e)
                log.warning("round %d: client %d failed: %s", round_, client, e)
                continue
            losses.append(loss)
            if bar is not None:
                bar.update(ctx.cfg.fl.local_steps)
        combine = self._secure if ctx.secure is not None else self._plain
        new, row = combine(ctx, adapter, answers, round_, failed)
        if failed:
            row["failed"] = {str(c): reason for c, reason in sorted(failed.items())}
        return Exchanged(new, row, losses, delivered=len(clients))

    def _plain(self, ctx: ServerContext, adapter: Adapter, answers: Mapping[int, dict[str, Any]], round_: int,
               failed: dict[int, str]) -> tuple[Adapter, dict[str, Any]]:
        uploads = {}
        for client, fields in answers.items():
            try:
                uploads[client] = require(fields, "upload", bytes)
            except MessageError as e:
                failed[client] = str(e)
        return PlainExchange().server_side(ctx, adapter, uploads, round_)

    def _secure(self, ctx: ServerContext, adapter: Adapter, answers: Mapping[int, dict[str, Any]], round_: int,
                failed: dict[int, str]) -> tuple[Adapter, dict[str, Any]]:
        """The clients' advertisements came with their training replies; the protocol's other steps follow."""
        assert ctx.secure is not None
        notes: dict[str, Any] = {}
        adverts = {}
        for client, fields in answers.items():
            if fields.get("out_of_range"):
                notes.setdefault("out_of_range", []).append(client)
                continue
            try:
                adverts[client] = require(fields, "message", bytes)
            except MessageError as e:
                failed[client] = str(e)
        traffic = Traffic()
        protocol = ProtocolOverGrid(self.grid, self.roster.node_of, round_, self.round_timeout, adverts, traffic, failed)
        registry = {c: self.roster.verify_keys[c] for c in adverts}
        dim = sum(math.prod(ctx.shapes[n]) for n in ctx.trained) + 1  # the delta, then the weight coordinate
        combiner = server_combiner(ctx, round_)
        assert isinstance(combiner, SecureMean)
        if not adverts:
            out = void_round(SecAggAbort("advertise", "clients that trained and are in range", 0, 1), round_, notes, traffic)
        else:
            out = finish_round(partial(protocol.run, ctx.secure.params, registry, dim), ctx.spec, adapter, round_, combiner,
                               notes, traffic)
        row: dict[str, Any] = {"bytes_up": out.bytes_up, "bytes_down": out.bytes_down, "secagg_survivors": list(out.survivors),
                               **out.notes}
        return (out.adapter if out.adapter is not None else copy_adapter(adapter)), row

    def _train_message(self, ctx: ServerContext, payload: bytes, client: int, clients: Sequence[int], sigma: float,
                       round_: int) -> Message:
        extra: dict[str, Any] = {}
        if ctx.secure is not None:
            extra = {"registry": registry_text({c: self.roster.verify_keys[c] for c in clients}),
                     "weight_bound": ctx.secure.weight_bound}
        fields = content(config=self.config_text, kind=self.kind, num_labels=self.num_labels, client_id=client, sigma=sigma,
                         round=round_, payload=payload, **extra)
        return Message(fields, dst_node_id=self.roster.node_of[client], message_type=TRAIN, group_id=str(round_))

    def _read_reply(self, reply: Message | None) -> tuple[dict[str, Any], float | None]:
        if reply is None:
            raise FlowerRunError(f"no reply within flower.round_timeout={self.round_timeout:g} s")
        if reply.has_error():
            raise FlowerRunError(f"error reply: {reply.error.reason}")
        fields = fields_of(reply)
        loss = require(fields, "loss", float)
        return fields, (None if math.isnan(loss) else loss)


def serve_on_grid(grid: Grid, cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = False) -> dict[str, Any]:
    """The whole run on a Grid: wait for the nodes, build the server's side, run the rounds into ``out``."""
    if not resume:
        rundir.check_new(out)
    task = load_task_data(cfg)  # the server keeps only the evaluation examples
    config_text = tomli_w.dumps(to_tree(cfg))
    nodes = wait_for_nodes(grid, cfg.fl.num_clients, cfg.flower.connect_timeout)
    roster = query_nodes(grid, nodes, config_text, cfg.flower.round_timeout)
    plan = check_privacy(cfg, roster.sizes)
    ctx = build_server(cfg, task, build_model(cfg, task.kind, task.num_labels), roster.sizes, plan)
    federation = FlowerFederation(grid, roster, config_text, task.kind, task.num_labels, cfg.flower.round_timeout)
    return serve(ctx, federation, out, resume, progress)


class RecordingGrid:
    """A Grid that shows every message the ServerApp sends to ``on_message`` first (tests record them)."""

    def __init__(self, grid: Grid, on_message: Callable[[Message], None]) -> None:
        self._grid = grid
        self._on_message = on_message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            self._on_message(message)
        return self._grid.push_messages(messages)


class AuditLog:
    """Writes every message the ServerApp sends into a folder, as sent: what a model owner can audit."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.count = directory, 0

    def __call__(self, message: Message) -> None:
        self.count += 1
        stem = f"{self.count:06d}-{message.metadata.message_type}-node{message.metadata.dst_node_id}"
        plain = {}
        for name, value in fields_of(message).items():
            if isinstance(value, bytes):
                (self.directory / f"{stem}.{name}.bin").write_bytes(value)
            else:
                plain[name] = value
        (self.directory / f"{stem}.json").write_text(json.dumps(plain))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployed: ``flwr run`` with run config ``config`` (experiment file), ``out``, ``resume`` and ``audit``."""
    run_config = context.run_config
    path, out, audit = run_config.get("config", ""), run_config.get("out", ""), run_config.get("audit", "")
    if not isinstance(path, str) or not path or not isinstance(out, str) or not out:
        raise ConfigError("the run config needs config='<experiment TOML on the server>' and out='<run directory>'")
    resume = bool(run_config.get("resume", False))
    cfg = rundir.load_run_config(Path(out), []) if resume else load_config(path)
    if isinstance(audit, str) and audit:
        grid = RecordingGrid(grid, AuditLog(Path(audit)))  # type: ignore[assignment]
    summary = serve_on_grid(grid, cfg, Path(out), resume)
    log.info("fedlpp: run finished into %s: %s", out, {k: summary[k] for k in ("rounds", "global", "proxy")})
