"""The local engine: every client in one process, sharing one backbone in memory.

Its transport (``LocalTransport``) only moves messages: the server's broadcast to each
sampled client's ``LocalClient`` (which runs ``client_step``, swapping only the adapter, so
memory does not grow with N) and the clients' replies back, as plain fields — the same
fields a Flower node answers with. What the replies hold (update bytes, or a SecAgg
advertisement and the protocol's later steps) is decided by the steps composed at setup.
The rounds, evaluation, accountant and run directory are the server's loop
(``engine/server.py``), shared with the Flower engine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedlpp import rundir
from fedlpp.algorithms.steps import ClientData, ClientRecipe, UploadError, client_step
from fedlpp.config import ExperimentConfig
from fedlpp.engine.secure import SecAggClient
from fedlpp.engine.server import LEDGER_KEY, serve
from fedlpp.engine.setup import LocalRun, ServerContext, build_run, client_recipe, protocol_params
from fedlpp.engine.transport import Fields, MessageError, Replies, require
from fedlpp.models.lora import PeftModel
from fedlpp.progress import Bar
from fedlpp.provenance import code_version
from fedlpp.secagg import SecAggError

log = logging.getLogger(__name__)

__all__ = ["LEDGER_KEY", "LocalClient", "LocalTransport", "local_transport", "run_experiment"]

# Called with (client id, bytes) for every message the server sends: tests record them.
OnSend = Callable[[int, bytes], None]


class Participant(Protocol):
    """What a client's reply carries after training, and how it answers the steps that follow (SecAgg)."""

    def reply(self, client_id: int, fields: Fields, upload: Any) -> Fields: ...

    def answer(self, fields: Fields) -> Fields: ...


class PlainUpload:
    """The update bytes go back as they are; nothing follows training."""

    def reply(self, client_id: int, fields: Fields, upload: Any) -> Fields:
        return {"upload": upload}

    def answer(self, fields: Fields) -> Fields:
        raise MessageError("this client has no step after training")


@dataclass
class LocalClient:
    """One simulated client: its data, its recipe (by the noise multiplier it is sent) and its participant."""

    data: ClientData
    recipe_for: Callable[[float, bool], ClientRecipe]  # (sigma, uniform weight) -> what the client does with a broadcast
    participant: Participant

    def train(self, model: PeftModel, payload: bytes, fields: Fields, on_step: Callable[[], None] | None) -> Fields:
        recipe = self.recipe_for(require(fields, "sigma", float), fields.get("weighting") == "uniform")
        out = client_step(model, payload, self.data, recipe, on_step)
        loss = math.nan if out.loss is None else out.loss
        answer = self.participant.reply(self.data.client_id, fields, out.upload)
        return {"num_examples": out.num_examples, "loss": loss, "peak_memory": out.peak_memory, **answer}


@dataclass
class LocalTransport:
    """Calls each sampled client's ``LocalClient`` in this process, on the server's model."""

    model: PeftModel
    clients: list[LocalClient]
    on_send: OnSend | None = None

    def train(self, payload: bytes, clients: Sequence[int], round_: int, fields: Mapping[str, Any], bar: Bar | None) -> Replies:
        replies = Replies()
        for client in clients:
            if self.on_send is not None:
                self.on_send(client, payload)
            message = {**fields, "round": round_, "client_id": client}
            on_step = bar.update if bar is not None else None
            answer(replies, client, round_, functools.partial(self.clients[client].train, self.model, payload, message, on_step))
        return replies

    def ask(self, action: str, round_: int, messages: Mapping[int, Fields]) -> Replies:
        replies = Replies()
        for client, message in messages.items():
            answer(replies, client, round_, functools.partial(self.clients[client].participant.answer, dict(message)))
        return replies

    @property
    def verify_keys(self) -> dict[int, bytes]:
        """Each client's SecAgg verify key (the clients that have one)."""
        return {k: c.participant.verify_key for k, c in enumerate(self.clients) if isinstance(c.participant, SecAggClient)}


def answer(replies: Replies, client: int, round_: int, work: Callable[[], Fields]) -> None:
    """A client's reply; a refusal of the protocol's (a bad message, a SecAgg check, an update the encoding cannot
    carry) fails that client alone, as a node's error reply does. Anything else is a bug and stops the run."""
    try:
        replies.answers[client] = work()
    except (MessageError, SecAggError, UploadError) as e:
        replies.failed[client] = f"error reply: {e}"
        log.warning("round %d: client %d failed: %s", round_, client, e)


def local_transport(run: LocalRun, on_send: OnSend | None = None) -> LocalTransport:
    """The clients of a local run, each with its own SecAgg identity when secagg.enabled."""
    ctx = run.server
    recipe_for = functools.lru_cache(maxsize=4)(functools.partial(_recipe, ctx))
    participant: Callable[[], Participant] = PlainUpload
    if ctx.secure is not None:
        participant = functools.partial(SecAggClient, protocol_params(ctx.cfg))
    return LocalTransport(ctx.model, [LocalClient(data, recipe_for, participant()) for data in run.clients], on_send)


def _recipe(ctx: ServerContext, sigma: float, uniform_weight: bool) -> ClientRecipe:
    return client_recipe(ctx.cfg, ctx.side, ctx.spec, sigma, ctx.secure, uniform_weight)


def run_experiment(
    cfg: ExperimentConfig, out: Path, resume: bool = False, progress: bool = True, on_send: OnSend | None = None
) -> dict[str, Any]:
    """Run (or continue) an experiment into ``out`` with the local engine and return its summary."""
    code_version()  # the commit this process starts with, which summary.json records
    if not resume:
        rundir.check_new(out)
    run = build_run(cfg)  # data and model errors surface before anything is written
    transport = local_transport(run, on_send)
    ctx = dataclasses.replace(run.server, verify_keys=transport.verify_keys)
    return serve(ctx, transport, out, resume, progress)
