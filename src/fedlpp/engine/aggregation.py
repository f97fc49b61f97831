"""What the server makes of a round's replies: a proposed next adapter, by a pipeline chosen once at setup.

- ``PlainAggregation``: each reply's update bytes -> decode and validate -> [client-level DP:
  clip, noise over the public count] -> the example-weighted mean -> the algorithm's server rule.
- ``SecureAggregation``: each reply is a SecAgg advertisement -> the protocol's remaining steps,
  carried by the transport's ``ask`` -> the unmasked sum -> [client-level DP: the missing noise]
  -> the mean -> the algorithm's server rule. The server never holds an individual update.

The combiners (``algorithms/round.py``: ``WeightedMean``, ``ClientDpMean``;
``algorithms/secure.py``: ``SecureMean``) and ``round.server_step`` do the arithmetic; these
classes only say which run in which order and what the round's metrics row records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.secure import SecureEncoding, SumCombiner
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.engine.secure import ACTION, finish_round, registry_text, void_round
from fedlpp.engine.transport import Fields, MessageError, Replies, Transport, require
from fedlpp.models.lora import Adapter
from fedlpp.secagg import AggregateResult, SecAggAbort, SecAggParams, ServerSession, Traffic
from fedlpp.secagg.local import drive_round

log = logging.getLogger(__name__)

Uploads = Sequence[tuple[int, bytes]]  # (client id, update bytes)
CombinerFor = Callable[[int], rnd.Combiner[Uploads]]  # round -> that round's combiner


@dataclass
class Proposal:
    """What the server's pipeline proposes for the round, before the server optimizer."""

    adapter: Adapter  # the next adapter (a copy of the old one when the round is void)
    row: dict[str, Any]  # the exchange's part of the metrics row: bytes up, rejections, SecAgg survivors
    void: bool = False  # nothing was combined (every update refused, a SecAgg abort): the adapter is the old one


class Aggregation(Protocol):
    """The server's side of a round's exchange, after the transport brought the replies."""

    def train_fields(self, round_: int, clients: Sequence[int]) -> Fields:
        """What every train message of the round carries besides the broadcast."""
        ...

    def combine(self, adapter: Mapping[str, torch.Tensor], replies: Replies, round_: int, transport: Transport) -> Proposal:
        """The proposed next adapter; a reply it cannot use is moved to ``replies.failed``."""
        ...


def refuse(replies: Replies, client: int, reason: str, round_: int) -> None:
    """A reply the pipeline cannot use: the client failed this round (logged, and listed in the metrics row)."""
    replies.refuse(client, reason)
    log.warning("round %d: client %d failed: %s", round_, client, reason)


@dataclass(frozen=True)
class PlainAggregation:
    """Every client's update bytes reach the server, which combines them (``round.server_step``)."""

    spec: AlgorithmSpec
    combiner_for: CombinerFor  # the weighted mean, or client-level DP's clipped and noised mean

    def train_fields(self, round_: int, clients: Sequence[int]) -> Fields:
        return {}

    def combine(self, adapter: Mapping[str, torch.Tensor], replies: Replies, round_: int, transport: Transport) -> Proposal:
        uploads = []
        for client, fields in list(replies.answers.items()):
            try:
                uploads.append((client, require(fields, "upload", bytes)))
            except MessageError as e:
                refuse(replies, client, str(e), round_)
        result = rnd.server_step(self.spec, adapter, uploads, round_, self.combiner_for(round_))
        row: dict[str, Any] = {"bytes_up": sum(len(u) for _, u in uploads)}
        if result.rejected:
            row["rejected"] = {str(k): v for k, v in result.rejected.items()}
        return Proposal(result.adapter, row, void=not result.accepted)


@dataclass(frozen=True)
class SecureAggregation:
    """The replies are SecAgg advertisements; the rest of the protocol runs over the transport."""

    spec: AlgorithmSpec
    encoding: SecureEncoding  # the protocol's parameters and the public weight bound
    combiner: SumCombiner  # the (DP-noised, or rotated) mean from the protocol's sum
    verify_keys: Mapping[int, bytes]  # client id -> its long-term verify key (announced when it joined)
    shapes: Mapping[str, tuple[int, ...]]

    def train_fields(self, round_: int, clients: Sequence[int]) -> Fields:
        fields: Fields = {
            "registry": registry_text({c: self.verify_keys[c] for c in clients}),
            "weight_bound": self.encoding.weight_bound,
        }
        if self.encoding.rotation is not None:
            fields["rotation_seed"] = self.encoding.rotation.seed  # public: every client and the server rotate alike
        return fields

    def combine(self, adapter: Mapping[str, torch.Tensor], replies: Replies, round_: int, transport: Transport) -> Proposal:
        adverts, notes = self._adverts(replies, round_)
        traffic = Traffic()
        if not adverts:
            out = void_round(SecAggAbort("advertise", "clients that trained and are in range", 0, 1), round_, notes, traffic)
            return Proposal(out.next_adapter(adapter), out.row(), void=True)
        protocol = ProtocolOverTransport(transport, round_, adverts, traffic, replies.failed)
        registry = {c: self.verify_keys[c] for c in adverts}
        dim = sum(math.prod(self.shapes[n]) for n in self.spec.trained_names(self.shapes, round_)) + 1  # delta, then weight
        run = partial(protocol.run, self.encoding.params, registry, dim)
        out = finish_round(run, self.spec, adapter, round_, self.combiner, notes, traffic)
        return Proposal(out.next_adapter(adapter), out.row(), void=out.adapter is None)

    def _adverts(self, replies: Replies, round_: int) -> tuple[dict[int, bytes], dict[str, Any]]:
        """Each in-range client's advertisement; the clients out of range are noted (they drop out)."""
        adverts, out_of_range = {}, []
        for client, fields in list(replies.answers.items()):
            if fields.get("out_of_range"):
                out_of_range.append(client)
                log.warning(
                    "round %d: client %d's update is not finite or exceeds secagg.clip_range=%g; it drops out of the round",
                    round_,
                    client,
                    self.encoding.params.clip_range,
                )
                continue
            try:
                adverts[client] = require(fields, "message", bytes)
            except MessageError as e:
                refuse(replies, client, str(e), round_)
        return adverts, ({"out_of_range": out_of_range} if out_of_range else {})


@dataclass
class ProtocolOverTransport:
    """Carries the protocol's steps after the advertisement as ``ask`` messages to the round's clients."""

    transport: Transport
    round_: int
    adverts: dict[int, bytes]  # what each client answered to the train message
    traffic: Traffic
    failed: dict[int, str]  # client -> why it dropped out (the round's failures, filled as steps go)

    def ask(self, step: str, inbox: Mapping[int, bytes]) -> dict[int, bytes]:
        if step == "advertise":
            self.traffic.count(self.traffic.up, self.adverts)
            return dict(self.adverts)
        self.traffic.count(self.traffic.down, inbox)
        replies = self.transport.ask(
            ACTION, self.round_, {c: {"step": step, "round": self.round_, "message": m} for c, m in inbox.items()}
        )
        answers = {}
        for client, reason in replies.failed.items():
            self._drop(client, step, reason)
        for client, fields in replies.answers.items():
            try:
                answers[client] = require(fields, "message", bytes)
            except MessageError as e:
                self._drop(client, step, str(e))
        self.traffic.count(self.traffic.up, answers)
        return answers

    def _drop(self, client: int, step: str, reason: str) -> None:
        self.failed[client] = f"secagg {step}: {reason}"
        log.warning("round %d: client %d dropped out of secure aggregation at %s: %s", self.round_, client, step, reason)

    def run(self, params: SecAggParams, registry: Mapping[int, bytes], dim: int) -> AggregateResult:
        server = ServerSession(params, registry, self.round_, dim)
        return drive_round(server, self.ask, sorted(self.adverts))
