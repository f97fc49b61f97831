"""Step-by-step driver for protocol tests: a server, n clients, and hooks between steps.

Unlike ``run_local_round`` it exposes every message so tests can drop, tamper with or
forge them, the way a faulty network or a malicious server would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.secagg import (
    AggregateResult,
    ClientSession,
    SecAggParams,
    ServerSession,
    encode,
    generate_signing_key,
    registry_of,
)


@dataclass
class Round:
    params: SecAggParams
    server: ServerSession
    clients: dict[int, ClientSession]
    inputs: dict[int, npt.NDArray[np.float64]]
    keys: dict[int, Ed25519PrivateKey]  # long-term identities, to forge signed messages in tests
    carry: Callable[[bytes], bytes] = bytes  # the transport every message crosses, both ways

    def advertise(self, skip: Iterable[int] = ()) -> dict[int, bytes]:
        gone = set(skip)
        for c, session in self.clients.items():
            if c not in gone:  # the first step: nothing comes down
                self.server.receive_advertisement(self.carry(session.advertise()), c)
        return self.server.finish_advertise()

    def share(self, key_lists: dict[int, bytes], skip: Iterable[int] = ()) -> dict[int, bytes]:
        self._exchange(key_lists, lambda c, m: self.clients[c].share_keys(m), self.server.receive_shares, skip)
        return self.server.finish_share_keys()

    def mask(self, routed: dict[int, bytes], skip: Iterable[int] = ()) -> dict[int, bytes]:
        self._exchange(
            routed, lambda c, m: self.clients[c].masked_input(m, self.inputs[c]), self.server.receive_masked_input, skip
        )
        return self.server.finish_masked_input()

    def sign(self, views: dict[int, bytes], skip: Iterable[int] = ()) -> dict[int, bytes]:
        self._exchange(views, lambda c, m: self.clients[c].sign_survivors(m), self.server.receive_signature, skip)
        return self.server.finish_consistency()

    def unmask(self, requests: dict[int, bytes], skip: Iterable[int] = ()) -> AggregateResult:
        self._exchange(requests, lambda c, m: self.clients[c].unmask(m), self.server.receive_unmask, skip)
        return self.server.finish_unmask()

    def _exchange(
        self,
        inbox: dict[int, bytes],
        answer: Callable[[int, bytes], bytes],
        receive: Callable[[bytes, int], None],
        skip: Iterable[int],
    ) -> None:
        """Each client not skipped gets its message over ``carry``, answers, and the answer crosses back."""
        gone = set(skip)
        for c, message in inbox.items():
            if c not in gone:
                receive(self.carry(answer(c, self.carry(message))), c)

    def run(self) -> AggregateResult:
        return self.unmask(self.sign(self.mask(self.share(self.advertise()))))

    def expected(self, included: Iterable[int]) -> npt.NDArray[np.uint32]:
        """Plain sum mod 2^b of the included clients' fixed-point encodings, without any mask."""
        total = np.zeros(len(next(iter(self.inputs.values()))), dtype=np.uint64)
        for c in included:
            total += encode(self.inputs[c], self.params, c)
        return (total % 2**self.params.modulus_bits).astype(np.uint32)


def make_round(n: int, dim: int = 64, params: SecAggParams | None = None, round_: int = 1, seed: int = 0) -> Round:
    """n clients (ids 0..n-1) with seeded uniform inputs in [-r/2, r/2]."""
    params = params or SecAggParams()
    keys = {c: generate_signing_key() for c in range(n)}
    registry = registry_of(keys)
    rng = np.random.default_rng(seed)  # test data only; the protocol's secrets come from the OS
    inputs = {c: rng.uniform(-params.clip_range / 2, params.clip_range / 2, dim) for c in range(n)}
    clients = {c: ClientSession(c, keys[c], registry, params, round_, dim) for c in range(n)}
    return Round(params, ServerSession(params, registry, round_, dim), clients, inputs, keys)


def flip(message: bytes, position: int) -> bytes:
    """The message with one bit flipped at ``position`` (negative counts from the end)."""
    data = bytearray(message)
    data[position] ^= 0x01
    return bytes(data)
