"""Run a whole round in one process: the reference driver for tests, the benchmark and the local engine.

It only moves bytes between ``ClientSession`` and ``ServerSession`` objects, as a network
would, and can make chosen clients vanish before any step to exercise dropout recovery.
Every piece of work runs through a ``Parties`` object, which says whose work it is: the
default just runs it; the benchmark's times each party.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.secagg.client import ClientSession
from fedlpp.secagg.crypto import verify_key_bytes
from fedlpp.secagg.params import SecAggParams
from fedlpp.secagg.server import AggregateResult, ServerSession


T = TypeVar("T")


class Parties(Protocol):
    """Runs each piece of a round's work as the party that does it in a deployment."""

    def client(self, client: int, work: Callable[[], T]) -> T:
        """One client's work in the current step (clients of a step run in parallel)."""
        ...

    def end_step(self) -> None:
        """Every client has done its work of the current step."""
        ...

    def server(self, work: Callable[[], T]) -> T:
        """Server work (sequential)."""
        ...


class InProcess:
    """The default ``Parties``: everything runs here, one piece after another."""

    def client(self, client: int, work: Callable[[], T]) -> T:
        return work()

    def end_step(self) -> None:
        pass

    def server(self, work: Callable[[], T]) -> T:
        return work()


@dataclass(frozen=True)
class Dropouts:
    """Clients that vanish just before sending the named message (and never come back)."""

    advertise: frozenset[int] = field(default_factory=frozenset)
    shares: frozenset[int] = field(default_factory=frozenset)
    masked_input: frozenset[int] = field(default_factory=frozenset)
    signature: frozenset[int] = field(default_factory=frozenset)
    unmask: frozenset[int] = field(default_factory=frozenset)


@dataclass
class Traffic:
    """Bytes moved by a round: client -> server (up) and server -> client (down), per client."""

    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)

    def count(self, direction: dict[int, int], messages: Mapping[int, bytes]) -> None:
        for client, message in messages.items():
            direction[client] = direction.get(client, 0) + len(message)


def registry_of(signing_keys: Mapping[int, Ed25519PrivateKey]) -> dict[int, bytes]:
    """The server's registry {client id: 32-byte verify key} for these identities."""
    return {c: verify_key_bytes(k) for c, k in signing_keys.items()}


def run_local_round(
    params: SecAggParams,
    signing_keys: Mapping[int, Ed25519PrivateKey],
    inputs: Mapping[int, npt.ArrayLike],
    round_: int,
    dropouts: Dropouts = Dropouts(),
    traffic: Traffic | None = None,
    parties: Parties | None = None,
) -> AggregateResult:
    """One complete SecAgg round over in-process sessions.

    Args:
        params: Protocol parameters.
        signing_keys: Long-term identity of every participating client.
        inputs: Each client's vector, shape (d,), all of the same length.
        round_: Round number.
        dropouts: Who vanishes before which message.
        traffic: If given, every message's length is added to it.
        parties: Runs each client's and the server's work (default: ``InProcess``).

    Returns:
        The server's aggregate over the clients whose masked input arrived.

    Raises:
        SecAggAbort, SecAggError, SecAggRangeError: As raised by the sessions.
    """
    registry = registry_of(signing_keys)
    dim = np.asarray(next(iter(inputs.values()))).size
    run = parties or InProcess()
    t = traffic if traffic is not None else Traffic()
    server = run.server(partial(ServerSession, params, registry, round_, dim))
    # Each client draws its round keys when its session starts.
    clients = _step(run, {c: partial(ClientSession, c, k, registry, params, round_, dim) for c, k in signing_keys.items()})

    def exchange(calls: dict[int, Callable[[], bytes]], receive: Callable[[bytes, int], None],
                 inbox: Mapping[int, bytes]) -> None:
        """A step: the server's messages travel down, clients answer (in parallel), the server reads each."""
        t.count(t.down, inbox)
        sent = _step(run, calls)
        t.count(t.up, sent)
        for client, message in sent.items():
            run.server(partial(receive, message, client))

    exchange({c: s.advertise for c, s in _alive(clients, dropouts.advertise).items()}, server.receive_advertisement, {})
    key_lists = run.server(server.finish_advertise)
    exchange({c: partial(clients[c].share_keys, m) for c, m in _route(key_lists, dropouts.shares)},
             server.receive_shares, key_lists)
    routed = run.server(server.finish_share_keys)
    exchange({c: partial(clients[c].masked_input, m, inputs[c]) for c, m in _route(routed, dropouts.masked_input)},
             server.receive_masked_input, routed)
    views = run.server(server.finish_masked_input)
    exchange({c: partial(clients[c].sign_survivors, m) for c, m in _route(views, dropouts.signature)},
             server.receive_signature, views)
    requests = run.server(server.finish_consistency)
    exchange({c: partial(clients[c].unmask, m) for c, m in _route(requests, dropouts.unmask)},
             server.receive_unmask, requests)
    return run.server(server.finish_unmask)


def _step(run: Parties, calls: Mapping[int, Callable[[], T]]) -> dict[int, T]:
    out = {c: run.client(c, call) for c, call in calls.items()}
    run.end_step()
    return out


def _alive(clients: Mapping[int, ClientSession], gone: frozenset[int]) -> dict[int, ClientSession]:
    return {c: s for c, s in clients.items() if c not in gone}


def _route(messages: Mapping[int, bytes], gone: frozenset[int]) -> list[tuple[int, bytes]]:
    return [(c, m) for c, m in sorted(messages.items()) if c not in gone]
