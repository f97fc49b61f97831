"""The local engine: every client in one process, sharing one backbone in memory.

It only moves bytes: the server's broadcast to each sampled client's ``client_step``
(swapping only the adapter, so memory does not grow with N), and the clients' uploads to
the server — as they are (``PlainExchange``) or through the SecAgg protocol run in process
(``SecAggExchange``). The rounds, evaluation, ledger and run directory are the server's
loop (``engine/server.py``), shared with the Flower engine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedlpp.algorithms.steps import ClientData, client_step
from fedlpp.config import ExperimentConfig
from fedlpp.engine import rundir
from fedlpp.engine.secure import SecureAggregator, make_aggregator, secure_aggregate
from fedlpp.engine.server import LEDGER_KEY, Exchange, Exchanged, PlainExchange, serve
from fedlpp.engine.setup import ServerContext, build_run, client_recipe, secure_combiner
from fedlpp.models.lora import Adapter
from fedlpp.progress import Bar

log = logging.getLogger(__name__)

__all__ = ["LEDGER_KEY", "LocalFederation", "PlainExchange", "run_experiment"]

T = TypeVar("T")

# Called with (client id, bytes) for every message the server sends: tests record them.
OnSend = Callable[[int, bytes], None]


@dataclass(frozen=True)
class SecAggExchange:
    """The clients' input vectors go through the SecAgg protocol; the server only ever holds the sum."""

    aggregator: SecureAggregator

    def server_side(
        self, ctx: ServerContext, adapter: Adapter, uploads: Mapping[int, Any], round_: int
    ) -> tuple[Adapter, dict[str, Any]]:
        inputs = {c: functools.partial(_given, v) for c, v in uploads.items()}
        out = secure_aggregate(self.aggregator, ctx.spec, adapter, inputs, round_, secure_combiner(ctx))
        return out.next_adapter(adapter), out.row()


def _given(value: T) -> T:
    return value


@dataclass
class LocalFederation:
    """Every sampled client's ``client_step`` in this process, on the server's model."""

    clients: list[ClientData]
    exchange: Exchange
    on_send: OnSend | None = None

    def round_trip(
        self, ctx: ServerContext, adapter: Adapter, payload: bytes, clients: Sequence[int], round_: int, bar: Bar | None
    ) -> Exchanged:
        recipe = client_recipe(ctx.cfg, ctx.side, ctx.spec, ctx.sigma, ctx.secure)
        uploads, losses, peaks = {}, [], []
        for client in clients:
            if self.on_send is not None:
                self.on_send(client, payload)
            out = client_step(ctx.model, payload, self.clients[client], recipe, bar.update if bar is not None else None)
            uploads[client] = out.upload
            losses.append(out.loss)
            peaks.append(out.peak_memory)
        new, row = self.exchange.server_side(ctx, adapter, uploads, round_)
        return Exchanged(new, row, losses, delivered=len(clients), peak_memory=peaks)


def make_exchange(ctx: ServerContext) -> Exchange:
    if ctx.secure is None:
        return PlainExchange()
    return SecAggExchange(make_aggregator(ctx.secure, ctx.cfg.fl.num_clients))


def run_experiment(
    cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = True, on_send: OnSend | None = None
) -> dict[str, Any]:
    """Run (or continue) an experiment into ``out`` with the local engine and return its summary."""
    if not resume:
        rundir.check_new(out)
    run = build_run(cfg)  # data and model errors surface before anything is written
    federation = LocalFederation(run.clients, make_exchange(run.server), on_send)
    return serve(run.server, federation, out, resume, progress)
