"""Run a whole round in one process: the reference driver for tests, the benchmark and the local engine.

It only moves bytes between ``ClientSession`` and ``ServerSession`` objects, as a network
would, and can make chosen clients vanish before any step to exercise dropout recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.secagg.client import ClientSession
from fedlpp.secagg.crypto import verify_key_bytes
from fedlpp.secagg.params import SecAggParams
from fedlpp.secagg.server import AggregateResult, ServerSession


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
) -> AggregateResult:
    """One complete SecAgg round over in-process sessions.

    Args:
        params: Protocol parameters.
        signing_keys: Long-term identity of every participating client.
        inputs: Each client's vector, shape (d,), all of the same length.
        round_: Round number.
        dropouts: Who vanishes before which message.
        traffic: If given, every message's length is added to it.

    Returns:
        The server's aggregate over the clients whose masked input arrived.

    Raises:
        SecAggAbort, SecAggError, SecAggRangeError: As raised by the sessions.
    """
    registry = registry_of(signing_keys)
    dim = np.asarray(next(iter(inputs.values()))).size
    server = ServerSession(params, registry, round_, dim)
    clients = {c: ClientSession(c, k, registry, params, round_) for c, k in signing_keys.items()}
    t = traffic if traffic is not None else Traffic()

    def up(receive: Callable[[bytes, int], None], messages: Mapping[int, bytes]) -> None:
        t.count(t.up, messages)
        _send(receive, messages)

    def down(messages: dict[int, bytes]) -> dict[int, bytes]:
        t.count(t.down, messages)
        return messages

    up(server.receive_advertisement, {c: s.advertise() for c, s in _alive(clients, dropouts.advertise).items()})
    key_lists = down(server.finish_advertise())
    up(server.receive_shares, {c: clients[c].share_keys(m) for c, m in _route(key_lists, dropouts.shares)})
    routed = down(server.finish_share_keys())
    up(server.receive_masked_input,
       {c: clients[c].masked_input(m, inputs[c]) for c, m in _route(routed, dropouts.masked_input)})
    views = down(server.finish_masked_input())
    up(server.receive_signature, {c: clients[c].sign_survivors(m) for c, m in _route(views, dropouts.signature)})
    requests = down(server.finish_consistency())
    up(server.receive_unmask, {c: clients[c].unmask(m) for c, m in _route(requests, dropouts.unmask)})
    return server.finish_unmask()


def _alive(clients: Mapping[int, ClientSession], gone: frozenset[int]) -> dict[int, ClientSession]:
    return {c: s for c, s in clients.items() if c not in gone}


def _route(messages: Mapping[int, bytes], gone: frozenset[int]) -> list[tuple[int, bytes]]:
    return [(c, m) for c, m in sorted(messages.items()) if c not in gone]


def _send(receive: Callable[[bytes, int], None], messages: Mapping[int, bytes]) -> None:
    for client, message in messages.items():
        receive(message, client)
