"""The server side of one SecAgg round: it routes messages and learns only the sum.

For each step the server ``receive_*``s one message per client (raising ``SecAggError``
naming the sender for a bad one; the caller may treat that client as dropped) and then
``finish_*``es the step, which returns {client id: message bytes} for the next step or
raises ``SecAggAbort`` when too few clients remain (Bonawitz et al. 2017, Fig. 4):
    receive_advertisement*    finish_advertise()      -> KEY_LIST per client
    receive_shares*           finish_share_keys()     -> ROUTED_SHARES per client
    receive_masked_input*     finish_masked_input()   -> SURVIVORS per client
    receive_signature*        finish_consistency()    -> UNMASK_REQUEST per client
    receive_unmask*           finish_unmask()         -> AggregateResult
Masked inputs are summed on arrival; no individual vector is kept.

The server checks what it handles itself: framing, sizes, who may speak at each step, and
the shares it uses. Signatures (on the advertised keys and on the survivor view) protect
the clients from the server, so the clients verify them, as in Bonawitz et al.: the server
forwards them unverified, and a bad one makes every client that receives it fail the
round with an error naming the signer (or the server, which may have altered it).
Checking them here too would not make the round robust against a misbehaving client,
which can already fail the round in ways the server cannot check (a share box only its
neighbour can open, a corrupt revealed share); it would put 2 n verifications on every
round's critical path. The runtime must therefore pass the authenticated transport sender
as ``origin``: a forged message in client X's name would otherwise be taken first, and
the round would fail naming X.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedlpp.secagg import shamir, wire
from fedlpp.secagg.crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    SIGNATURE_BYTES,
    Prg,
    exchange,
    key_pair_from_private,
    random_bytes,
)
from fedlpp.secagg.errors import SERVER_ID, SecAggAbort, SecAggError
from fedlpp.secagg.fixedpoint import decode_sum
from fedlpp.secagg.graph import NeighbourGraph, build_graph
from fedlpp.secagg.masking import pairwise_key, remove_pairwise, seed_commitment, self_mask_key
from fedlpp.secagg.params import MIN_CLIENTS, SecAggParams, SecAggParamsError
from fedlpp.secagg.wire import MessageType, ShareKind, ShareReveal, SignedKeys, Survivors

_BOX_BYTES = NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16  # nonce || two shares || Poly1305 tag
_STEPS = ("advertise", "share_keys", "masked_input", "consistency", "unmask", "done")


@dataclass(frozen=True)
class AggregateResult:
    """What the server learns: the sum over survivors, and who they were."""

    encoded: npt.NDArray[np.unsignedinteger]  # (d,) sum of the encodings mod 2^b, in the protocol's words
    values: npt.NDArray[np.float64]  # (d,) the same sum decoded: sum_u round(x_u * scale) / scale
    survivors: tuple[int, ...]  # U3: clients whose input is in the sum
    dropped: tuple[int, ...]  # clients that shared keys but whose input is not


class ServerSession:
    """The server's state for one round.

    Args:
        params: Protocol parameters, identical to the clients'.
        registry: Every client's 32-byte Ed25519 verify key, by id (the server uses only the ids:
            who may take part; the keys are for the clients).
        round_: The round number.
        dim: Length d of the vectors being summed.
    """

    def __init__(self, params: SecAggParams, registry: Mapping[int, bytes], round_: int, dim: int) -> None:
        wire.check_session(round_, dim)
        self.params = params
        self.round = round_
        self.dim = dim
        self._registry = registry
        self._step = 0
        self._adverts: dict[int, SignedKeys] = {}  # U1
        self._graph: NeighbourGraph | None = None
        self._boxes: dict[int, dict[int, bytes]] = {}  # U2: sender -> {recipient: box}
        self._masked_from: dict[int, tuple[int, ...]] = {}  # u -> neighbours u masked with
        self._total = np.zeros(dim, dtype=params.word)  # running sum of masked inputs
        self._arrived: set[int] = set()  # U3
        self._view: Survivors | None = None
        self._signatures: dict[int, bytes] = {}  # U4
        self._reveals: dict[int, tuple[ShareReveal, ...]] = {}  # U5

    @property
    def graph(self) -> NeighbourGraph | None:
        """The round's neighbour graph (after ``finish_advertise``)."""
        return self._graph

    # ------------------------------------------------------------ step 0: AdvertiseKeys

    def receive_advertisement(self, data: bytes, origin: int | None = None) -> None:
        """Accept one registered client's signed keys; ``origin`` is the transport's sender id, if known.

        The signature and the keys are checked by the neighbours they are forwarded to.
        """
        self._at("advertise", data, origin)
        sender, reader = self._unpack(data, MessageType.ADVERTISE, origin, self._registry, self._adverts)
        self._adverts[sender] = wire.decode_advertise(reader, sender)

    def finish_advertise(self) -> dict[int, bytes]:
        """Build the round's graph over the advertisers; send each its neighbours' keys."""
        self._close("advertise")
        participants = tuple(sorted(self._adverts))
        _require(len(participants), MIN_CLIENTS, "AdvertiseKeys", "clients that advertised keys")
        if len(participants) > self.params.max_clients:
            raise SecAggParamsError(
                f"secagg.max_clients: {len(participants)} clients advertised, the fixed-point "
                f"headroom allows {self.params.max_clients}"
            )
        # The seed is public; drawing it from the CSPRNG keeps the graph unpredictable to clients.
        seed = random_bytes(KEY_BYTES)
        graph = build_graph(participants, seed, self.params)
        for u in participants:
            _require(graph.degree(u), graph.thresholds[u], "AdvertiseKeys", f"neighbours of client {u}")
        self._graph = graph
        return {u: self._key_list(u, seed) for u in participants}

    def _key_list(self, u: int, seed: bytes) -> bytes:
        graph = self._require_graph()
        adverts = tuple(self._adverts[v] for v in sorted(graph.neighbours[u]))
        keys = wire.KeyList(self.params.fingerprint(), seed, graph.nodes, adverts)
        return self._pack(MessageType.KEY_LIST, u, wire.encode_key_list(keys))

    # ------------------------------------------------------------ step 1: ShareKeys

    def receive_shares(self, data: bytes, origin: int | None = None) -> None:
        """Accept one client's encrypted shares: exactly one box per neighbour."""
        self._at("share_keys", data, origin)
        sender, reader = self._unpack(data, MessageType.SHARES, origin, self._adverts, self._boxes)
        boxes = wire.decode_ciphertexts(reader)
        neighbours = self._require_graph().neighbours[sender]
        if set(boxes) != neighbours:
            raise SecAggError(sender, f"shares addressed to {sorted(boxes)}, its neighbours are {sorted(neighbours)}")
        bad = [v for v, box in boxes.items() if len(box) != _BOX_BYTES]
        if bad:
            raise SecAggError(sender, f"share ciphertexts for {bad} are not {_BOX_BYTES} bytes")
        self._boxes[sender] = boxes

    def finish_share_keys(self) -> dict[int, bytes]:
        """Route to each sharer the boxes its neighbours addressed to it."""
        self._close("share_keys")
        graph = self._require_graph()
        routed: dict[int, bytes] = {}
        for u in sorted(self._boxes):
            senders = sorted(v for v in graph.neighbours[u] if v in self._boxes)
            # u's secrets are held by these neighbours only; below t they could not be rebuilt.
            _require(len(senders), graph.thresholds[u], "ShareKeys", f"neighbours of client {u} that shared keys")
            self._masked_from[u] = tuple(senders)
            routed[u] = self._pack(MessageType.ROUTED_SHARES, u, wire.encode_ciphertexts({v: self._boxes[v][u] for v in senders}))
        return routed

    # ------------------------------------------------------------ step 2: MaskedInputCollection

    def receive_masked_input(self, data: bytes, origin: int | None = None) -> None:
        """Add one client's masked vector y_u to the running sum (mod the words' 2^16 or 2^32; the field Z_{2^b} is its
        low b bits)."""
        self._at("masked_input", data, origin)
        sender, reader = self._unpack(data, MessageType.MASKED_INPUT, origin, self._masked_from, self._arrived)
        np.add(self._total, wire.decode_masked(reader, self.dim, self.params.modulus_bits, self.params.word), out=self._total)
        self._arrived.add(sender)

    def finish_masked_input(self) -> dict[int, bytes]:
        """Fix survivors U3 and dropped U2 \\ U3; ask survivors to sign that view."""
        self._close("masked_input")
        survivors = tuple(sorted(self._arrived))
        dropped = tuple(sorted(set(self._masked_from) - self._arrived))
        self._view = Survivors(survivors, dropped)
        _require(len(survivors), self.params.min_survivors, "MaskedInputCollection", "survivors (secagg min_survivors)")
        self._check_recoverable(set(survivors), "MaskedInputCollection")
        body = wire.encode_survivors(self._view)
        return {u: self._pack(MessageType.SURVIVORS, u, body) for u in survivors}

    def _check_recoverable(self, holders: set[int], step: str) -> None:
        """Abort early unless every secret to rebuild has >= t live share holders."""
        graph = self._require_graph()
        for u in self._secrets_needed():
            alive = len(set(self._masked_from[u]) & holders)
            _require(alive, graph.thresholds[u], step, f"live holders of client {u}'s shares")

    def _secrets_needed(self) -> list[int]:
        # b_u of every survivor; s_sk_v of every dropped v that some survivor masked with.
        assert self._view is not None
        survivors = set(self._view.survivors)
        return list(self._view.survivors) + [v for v in self._view.dropped if self._survivors_masked_with(v, survivors)]

    def _survivors_masked_with(self, v: int, survivors: set[int]) -> list[int]:
        return [u for u in sorted(survivors) if v in self._masked_from[u]]

    # ------------------------------------------------------------ step 3: ConsistencyCheck

    def receive_signature(self, data: bytes, origin: int | None = None) -> None:
        """Accept one survivor's signature of the survivor/dropped view (verified by the clients it is forwarded to)."""
        self._at("consistency", data, origin)
        assert self._view is not None
        sender, reader = self._unpack(data, MessageType.SURVIVORS_SIGNATURE, origin, self._view.survivors, self._signatures)
        signature = reader.take(SIGNATURE_BYTES, "signature")
        reader.finish()
        self._signatures[sender] = signature

    def finish_consistency(self) -> dict[int, bytes]:
        """Forward all signatures to every signer, who checks them before revealing shares."""
        self._close("consistency")
        signers = set(self._signatures)
        graph = self._require_graph()
        for u in signers:
            _require(len(signers), graph.thresholds[u], "ConsistencyCheck", "clients that signed the survivor list")
        self._check_recoverable(signers, "ConsistencyCheck")
        body = wire.encode_signatures(self._signatures)
        return {u: self._pack(MessageType.UNMASK_REQUEST, u, body) for u in sorted(signers)}

    # ------------------------------------------------------------ step 4: Unmasking

    def receive_unmask(self, data: bytes, origin: int | None = None) -> None:
        """Accept one client's shares: b_v for surviving neighbours, s_sk_v for dropped ones."""
        self._at("unmask", data, origin)
        sender, reader = self._unpack(data, MessageType.UNMASK_RESPONSE, origin, self._signatures, self._reveals)
        reveals = wire.decode_reveals(reader)
        expected = self._expected_reveals(sender)
        if {(r.about, r.kind) for r in reveals} != expected or len(reveals) != len(expected):
            raise SecAggError(sender, "revealed shares do not match its neighbours' survived/dropped status")
        self._reveals[sender] = reveals

    def _expected_reveals(self, holder: int) -> set[tuple[int, ShareKind]]:
        assert self._view is not None
        survivors = set(self._view.survivors)
        return {(v, ShareKind.SELF_MASK_SEED if v in survivors else ShareKind.MASKING_KEY) for v in self._masked_from[holder]}

    def finish_unmask(self) -> AggregateResult:
        """Rebuild the secrets, remove the remaining masks and decode the sum.

        Raises:
            SecAggAbort: A secret has fewer than t shares, or rebuilt keys are inconsistent.
        """
        self._close("unmask")
        assert self._view is not None
        total = self._total  # the session is finished: no copy needed
        prg = Prg(self.dim, self.params.prg, self.params.word)
        for u in self._view.survivors:
            seed = self._rebuild(u, ShareKind.SELF_MASK_SEED)
            if seed_commitment(seed, self.round, u) != self._adverts[u].seed_commitment:
                raise SecAggAbort(
                    "Unmasking",
                    f"rebuilt self-mask seed of client {u} does not match its commitment: some revealed share is corrupt",
                )
            np.subtract(total, prg.expand(self_mask_key(seed, self.round, u)), out=total)
        survivors = set(self._view.survivors)
        for v in self._view.dropped:
            self._remove_dropped(total, prg, v, self._survivors_masked_with(v, survivors))
        if self.params.modulus_bits < 8 * total.itemsize:
            np.bitwise_and(total, self.params.modulus_mask, out=total)  # the field is the low b bits
        return AggregateResult(total, decode_sum(total, self.params), self._view.survivors, self._view.dropped)

    def _remove_dropped(self, total: npt.NDArray[np.unsignedinteger], prg: Prg, v: int, peers: list[int]) -> None:
        """Remove the masks survivors shared with dropped client v, via its rebuilt s_sk_v."""
        if not peers:
            return
        keys = key_pair_from_private(self._rebuild(v, ShareKind.MASKING_KEY))
        if keys.public != self._adverts[v].s_public:
            raise SecAggAbort(
                "Unmasking",
                f"rebuilt masking key of client {v} does not match its advertised key: some revealed share is corrupt",
            )
        for u in peers:
            try:
                shared = exchange(keys.private, self._adverts[u].s_public)
            except ValueError as err:  # its neighbours, who must refuse such a key, did not
                raise SecAggAbort(
                    "Unmasking", f"client {u} advertised an invalid (low-order) masking key and its neighbours used it"
                ) from err
            remove_pairwise(total, prg.expand(pairwise_key(shared, self.round, v, u)), u, v)

    def _rebuild(self, about: int, kind: ShareKind) -> bytes:
        shares = {
            holder: r.share for holder, reveals in self._reveals.items() for r in reveals if r.about == about and r.kind == kind
        }
        threshold = self._require_graph().thresholds[about]
        _require(len(shares), threshold, "Unmasking", f"shares of client {about}'s {kind.name.lower()}")
        try:
            return shamir.reconstruct(shares, threshold)
        except ValueError as err:
            raise SecAggAbort("Unmasking", f"shares of client {about} are inconsistent: {err}") from err

    # ------------------------------------------------------------ plumbing

    def _at(self, step: str, data: bytes, origin: int | None) -> None:
        if _STEPS[self._step] != step:
            who = origin if origin is not None else wire.peek_sender(data)
            raise SecAggError(who, f"{step} message arrived while the server is at {_STEPS[self._step]}")

    def _close(self, step: str) -> None:
        if _STEPS[self._step] != step:
            raise RuntimeError(f"finish_{step} called while the server is at {_STEPS[self._step]}")
        self._step += 1

    def _unpack(
        self, data: bytes, kind: MessageType, origin: int | None, allowed: Iterable[int], seen: Iterable[int]
    ) -> tuple[int, wire.Reader]:
        header, reader = wire.unpack(data, kind, self.round, SERVER_ID, origin)
        if header.sender not in allowed:
            raise SecAggError(header.sender, f"is not expected at this step ({kind.name})")
        if header.sender in seen:
            raise SecAggError(header.sender, f"sent a second {kind.name} message")
        return header.sender, reader

    def _pack(self, kind: MessageType, recipient: int, body: bytes) -> bytes:
        return wire.pack(kind, self.round, SERVER_ID, recipient, body)

    def _require_graph(self) -> NeighbourGraph:
        assert self._graph is not None
        return self._graph


def _require(count: int, threshold: int, step: str, what: str) -> None:
    if count < threshold:
        raise SecAggAbort(step, what, count, threshold)
