"""Run a whole round in one process: the reference driver for tests, the benchmark and the local engine.

It only moves bytes between ``ClientSession`` and ``ServerSession`` objects, as a network
would, and can make chosen clients vanish before any step to exercise dropout recovery.
Every piece of work runs through a ``Parties`` object, which says whose work it is: the
default just runs it; the benchmark's times each party.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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

    def ask(step: str, inbox: Mapping[int, bytes]) -> dict[int, bytes]:
        """A step: the server's messages travel down, the clients still there answer (in parallel)."""
        t.count(t.down, inbox)
        gone = getattr(dropouts, DROPOUT_FIELD[step])
        sent = _step(
            run, {c: partial(answer_step, clients[c], step, m, inputs[c]) for c, m in sorted(inbox.items()) if c not in gone}
        )
        t.count(t.up, sent)
        return sent

    return drive_round(server, ask, sorted(clients), run)


# The ``Dropouts`` field of each step: who vanishes before sending that step's message.
DROPOUT_FIELD = {
    "advertise": "advertise",
    "share_keys": "shares",
    "masked_input": "masked_input",
    "sign_survivors": "signature",
    "unmask": "unmask",
}
STEPS = tuple(DROPOUT_FIELD)
Ask = Callable[[str, Mapping[int, bytes]], Mapping[int, bytes]]  # (step, {client: server's message}) -> {client: reply}


def answer_step(session: ClientSession, step: str, message: bytes, values: npt.ArrayLike) -> bytes:
    """One client's answer to one step of the protocol (``message`` is empty for ``advertise``)."""
    if step == "advertise":
        return session.advertise()
    if step == "masked_input":
        return session.masked_input(message, values)
    calls: dict[str, Callable[[bytes], bytes]] = {
        "share_keys": session.share_keys,
        "sign_survivors": session.sign_survivors,
        "unmask": session.unmask,
    }
    return calls[step](message)


def drive_round(server: ServerSession, ask: Ask, clients: Sequence[int], run: Parties | None = None) -> AggregateResult:
    """The server's side of one round over any transport: ``ask`` carries each step's messages to the clients.

    A client that does not answer a step has dropped out from then on; the server
    session decides whether the round can still be unmasked (``SecAggAbort`` if not).
    """
    run = run or InProcess()
    receive = {
        "advertise": server.receive_advertisement,
        "share_keys": server.receive_shares,
        "masked_input": server.receive_masked_input,
        "sign_survivors": server.receive_signature,
        "unmask": server.receive_unmask,
    }
    finish = {
        "advertise": server.finish_advertise,
        "share_keys": server.finish_share_keys,
        "masked_input": server.finish_masked_input,
        "sign_survivors": server.finish_consistency,
    }
    inbox: Mapping[int, bytes] = dict.fromkeys(clients, b"")
    for step in STEPS:
        for client, message in ask(step, inbox).items():
            run.server(partial(receive[step], message, client))
        if step == "unmask":
            break
        inbox = run.server(finish[step])
    return run.server(server.finish_unmask)


def _step(run: Parties, calls: Mapping[int, Callable[[], T]]) -> dict[int, T]:
    out = {c: run.client(c, call) for c, call in calls.items()}
    run.end_step()
    return out
