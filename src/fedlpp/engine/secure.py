"""Secure aggregation's ends of a round, whatever carries its messages.

A client's input vector comes from its ``client_step`` (SecAgg's encoder,
``algorithms.secure.SecureInput``); ``SecAggClient`` then holds its session for the round
(the local engine's clients; a deployed node keeps the same in its Flower state,
``engine/flower/secure.py``). The server's side runs the protocol over the transport
(``engine/aggregation.SecureAggregation``) and ``finish_round`` applies the mean delta that
``SecureMean`` derives from the sum — the server never holds an individual update.
``secure_aggregate`` runs a whole round in process (the benchmark's reference).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.algorithms import round as rnd
from fedlpp.algorithms.secure import SecureEncoding, SumCombiner
from fedlpp.algorithms.spec import AlgorithmSpec
from fedlpp.engine.transport import Fields, MessageError, require
from fedlpp.models.lora import Adapter, copy_adapter
from fedlpp.secagg import (
    AggregateResult,
    ClientSession,
    InProcess,
    Parties,
    SecAggAbort,
    SecAggError,
    SecAggParams,
    Traffic,
    generate_signing_key,
    run_local_round,
    verify_key_bytes,
)
from fedlpp.secagg.local import answer_step

log = logging.getLogger(__name__)

ACTION = "secagg"  # the transport's ``ask`` action of the protocol's steps after the advertisement


def registry_text(registry: Mapping[int, bytes]) -> str:
    """The round's registry {client id: verify key} as it travels in a train message."""
    return json.dumps({str(c): key.hex() for c, key in sorted(registry.items())})


def registry_from_text(text: str) -> dict[int, bytes]:
    return {int(c): bytes.fromhex(key) for c, key in json.loads(text).items()}


@dataclass
class SecAggClient:
    """One client's side of SecAgg held in memory: its long-term identity and the session of the round it is in.

    A client opens one session per round, ever: two sums over different sets of clients for
    one round would reveal its input by subtraction.
    """

    params: SecAggParams
    identity: Ed25519PrivateKey = field(default_factory=generate_signing_key)  # OS CSPRNG
    session: ClientSession | None = None
    vector: np.ndarray | None = None  # the round's input, kept until unmask
    joined: int = 0  # the last round it opened a session for

    @property
    def verify_key(self) -> bytes:
        return verify_key_bytes(self.identity)

    def reply(self, client_id: int, fields: Fields, vector: np.ndarray | None) -> Fields:
        """After training: its advertisement, or ``out_of_range`` when its vector cannot be encoded."""
        round_ = require(fields, "round", int)
        if self.joined >= round_:
            raise MessageError(f"this client already took part in secure aggregation for round {self.joined}; refusing {round_}")
        self.joined, self.session, self.vector = round_, None, None
        if vector is None:
            return {"out_of_range": True}
        registry = registry_from_text(require(fields, "registry", str))
        self.session = ClientSession(client_id, self.identity, registry, self.params, round_, vector.size)
        self.vector = vector
        return {"message": self.session.advertise()}

    def answer(self, fields: Fields) -> Fields:
        """One protocol step; the session is forgotten after unmask."""
        step, round_ = require(fields, "step", str), require(fields, "round", int)
        if self.session is None or self.vector is None or self.joined != round_:
            raise MessageError(f"no SecAgg session for round {round_} on this client")
        reply = answer_step(self.session, step, require(fields, "message", bytes), self.vector)
        if step == "unmask":
            self.session, self.vector = None, None
        return {"message": reply}


@dataclass(frozen=True)
class SecureAggregator:
    encoding: SecureEncoding  # protocol parameters and the public weight bound n_max
    identities: dict[int, Ed25519PrivateKey]  # long-term signing key of every client (OS CSPRNG)


@dataclass(frozen=True)
class SecureOutcome:
    adapter: Adapter | None  # None: keep the global adapter
    survivors: tuple[int, ...]
    bytes_up: int
    bytes_down: int
    notes: dict[str, Any]  # what a metrics row should say about the round (drops, abort)

    def next_adapter(self, adapter: Mapping[str, torch.Tensor]) -> Adapter:
        """The round's result, or a copy of ``adapter`` when the round was void."""
        return self.adapter if self.adapter is not None else copy_adapter(adapter)

    def row(self) -> dict[str, Any]:
        """What the round's metrics row says about the exchange."""
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "secagg_survivors": list(self.survivors), **self.notes}


def make_aggregator(encoding: SecureEncoding, num_clients: int) -> SecureAggregator:
    return SecureAggregator(encoding, {c: generate_signing_key() for c in range(num_clients)})


ClientInput = Callable[[], "np.ndarray | None"]  # a client's work that yields its protocol input (None: drops out)


def secure_aggregate(
    agg: SecureAggregator,
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    inputs: Mapping[int, ClientInput],
    round_: int,
    combiner: SumCombiner,
    parties: Parties | None = None,
) -> SecureOutcome:
    """Run the protocol over the clients' input vectors and apply the server step to the sum.

    ``parties`` runs each client's and the server's share of the work (the benchmark times them).
    """
    run = parties or InProcess()
    vectors = {c: run.client(c, make) for c, make in sorted(inputs.items())}
    run.end_step()
    present = {c: v for c, v in vectors.items() if v is not None}
    notes: dict[str, Any] = {}
    for client in sorted(set(vectors) - set(present)):
        notes.setdefault("out_of_range", []).append(client)
        log.warning(
            "round %d: client %d's update is not finite or exceeds secagg.clip_range=%g; it drops out of the round",
            round_,
            client,
            agg.encoding.params.clip_range,
        )
    traffic = Traffic()
    if not present:
        return void_round(SecAggAbort("masked input", "no client is in range", 0, 1), round_, notes, traffic)
    protocol = partial(
        run_local_round,
        agg.encoding.params,
        {c: agg.identities[c] for c in present},
        present,
        round_,
        traffic=traffic,
        parties=run,
    )
    return finish_round(protocol, spec, adapter, round_, combiner, notes, traffic, run)


def finish_round(
    protocol: Callable[[], AggregateResult],
    spec: AlgorithmSpec,
    adapter: Mapping[str, torch.Tensor],
    round_: int,
    combiner: SumCombiner,
    notes: dict[str, Any],
    traffic: Traffic,
    run: Parties | None = None,
) -> SecureOutcome:
    """Run the protocol (in process or over a network) and apply the server step to its sum; an abort keeps the adapter."""
    run = run or InProcess()
    try:
        result = protocol()
    except (SecAggAbort, SecAggError) as e:
        return void_round(e, round_, notes, traffic)
    step = run.server(partial(rnd.server_step, spec, adapter, result, round_, combiner))
    notes.update(step.notes)
    new = step.adapter if step.accepted else None
    return SecureOutcome(new, result.survivors, sum(traffic.up.values()), sum(traffic.down.values()), notes)


def void_round(error: Exception, round_: int, notes: dict[str, Any], traffic: Traffic) -> SecureOutcome:
    log.warning("round %d: secure aggregation aborted (%s); the global adapter is unchanged", round_, error)
    notes["secagg_abort"] = str(error)
    return SecureOutcome(None, (), sum(traffic.up.values()), sum(traffic.down.values()), notes)
