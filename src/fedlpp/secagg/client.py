"""The client side of one SecAgg round: bytes in, bytes out, secrets kept inside.

Message flow for client u (Bonawitz et al. 2017, Fig. 4; neighbours from SecAgg+):
    advertise()                          -> ADVERTISE            (round 0: AdvertiseKeys)
    share_keys(KEY_LIST)                 -> SHARES               (round 1: ShareKeys)
    masked_input(ROUTED_SHARES, values)  -> MASKED_INPUT         (round 2: MaskedInputCollection)
    sign_survivors(SURVIVORS)            -> SURVIVORS_SIGNATURE  (round 3: ConsistencyCheck)
    unmask(UNMASK_REQUEST)               -> UNMASK_RESPONSE      (round 4: Unmasking)
A session is used for one round only; each step succeeds once, in this order (a step that
raised may be retried, e.g. with values brought into range).

Everything up to ``share_keys`` is independent of the client's data, including the mask
expansion (one PRG stream per neighbour plus the self mask), which ``share_keys`` does
ahead of time: a runtime can run key setup before or during local training, and after
training ``masked_input`` costs one encode and one addition.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlpp.secagg import shamir, wire
from fedlpp.secagg.crypto import (
    KEY_BYTES,
    Prg,
    decrypt,
    encrypt,
    exchange,
    generate_key_pair,
    key_pair_from_private,
    load_verify_key,
    random_bytes,
    sign,
    verify,
)
from fedlpp.secagg.errors import SERVER_ID, SecAggAbort, SecAggError
from fedlpp.secagg.fixedpoint import to_field
from fedlpp.secagg.graph import NeighbourGraph, build_graph
from fedlpp.secagg.masking import (
    add_pairwise,
    pairwise_key,
    remove_pairwise,
    seed_commitment,
    self_mask_key,
    share_associated_data,
    share_key,
)
from fedlpp.secagg.params import SecAggParams
from fedlpp.secagg.wire import MessageType, ShareKind, ShareReveal, SignedKeys, Survivors

SHARE_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES  # share of b_u || share of s_sk_u
_STEPS = ("advertise", "share_keys", "masked_input", "sign_survivors", "unmask", "done")


class ClientSession:
    """Client u's secrets and view of one round.

    Args:
        client_id: This client's id (< 2^32 - 1).
        signing_key: Its long-term Ed25519 identity key.
        registry: Every client's 32-byte Ed25519 verify key, by id (a PKI, as SecAgg assumes).
        params: Protocol parameters, identical to the server's.
        round_: The round number, bound into every message and key.
        dim: Length d of the vector this client will send.
    """

    def __init__(
        self,
        client_id: int,
        signing_key: Ed25519PrivateKey,
        registry: Mapping[int, bytes],
        params: SecAggParams,
        round_: int,
        dim: int,
    ) -> None:
        wire.check_session(round_, dim)
        self.client_id = client_id
        self.round = round_
        self.dim = dim
        self.params = params
        self._signing_key = signing_key
        self._registry = registry
        # Fresh per round, all from the OS CSPRNG: c for share boxes, s for pairwise masks,
        # b for the self mask (Bonawitz et al. 2017, sec. 4, round 0 and 1).
        self._c = generate_key_pair()
        self._s = generate_key_pair()
        self._b = random_bytes(KEY_BYTES)
        self._step = 0
        self._graph: NeighbourGraph | None = None
        self._peers: dict[int, SignedKeys] = {}  # neighbours' advertised keys
        self._box_secrets: dict[int, bytes] = {}  # v -> X25519(c_sk_u, c_pk_v)
        self._mask_secrets: dict[int, bytes] = {}  # v -> X25519(s_sk_u, s_pk_v)
        self._masks: npt.NDArray[np.unsignedinteger] | None = None  # PRG(b_u) + every neighbour's pairwise mask
        self._held: dict[int, tuple[int, int]] = {}  # v -> (share of b_v, share of s_sk_v)
        self._view: Survivors | None = None
        self._view_signature = b""  # what this client signed in sign_survivors
        self._graph_source: tuple[tuple[int, ...], bytes] = ((), b"")  # (participants, graph seed) of the key list

    @property
    def graph(self) -> NeighbourGraph | None:
        """The round's neighbour graph as this client derived it (after ``share_keys``)."""
        return self._graph

    # ------------------------------------------------------------ steps

    def advertise(self) -> bytes:
        """Step 0: the signed public keys (c_pk, s_pk) of this round."""
        self._expect("advertise")
        commitment = seed_commitment(self._b, self.round, self.client_id)
        unsigned = SignedKeys(self.client_id, self._c.public, self._s.public, commitment, b"")
        signature = sign(self._signing_key, wire.advert_signed_bytes(unsigned, self.round))
        keys = dataclasses.replace(unsigned, signature=signature)
        return self._done(self._pack(MessageType.ADVERTISE, wire.encode_advertise(keys)))

    def share_keys(self, key_list: bytes) -> bytes:
        """Step 1: check the neighbours' signed keys, Shamir-share b_u and s_sk_u to them, expand the masks.

        Raises:
            SecAggError: Bad framing, parameter mismatch, wrong neighbour set, a bad signature
                or an invalid (low-order) public key.
            SecAggAbort: Fewer neighbours than the threshold.
        """
        self._expect("share_keys")
        reader = self._unpack(key_list, MessageType.KEY_LIST)
        keys = wire.decode_key_list(reader)
        graph = self._check_key_list(keys)
        self._graph, self._graph_source = graph, (keys.participants, keys.graph_seed)
        self._peers = {a.client: a for a in keys.adverts}
        self._box_secrets, self._mask_secrets = self._agree(keys.adverts)
        boxes = self._share_boxes(sorted(self._peers), graph.thresholds[self.client_id])
        self._masks = self._expand_masks()
        return self._done(self._pack(MessageType.SHARES, wire.encode_ciphertexts(boxes)))

    def masked_input(self, routed_shares: bytes, values: npt.ArrayLike) -> bytes:
        """Step 2: keep the neighbours' shares, then send y_u = x_u + masks (mod 2^32).

        Args:
            routed_shares: The server's ROUTED_SHARES message.
            values: This client's (weighted) vector, shape (dim,), each |x| <= clip_range; or its input as field
                elements already (unsigned integers, ``fixedpoint.field_elements``).

        Returns:
            MASKED_INPUT: the 22-byte header and 4 d bytes (ceil(d b / 8) in a b-bit field).

        Raises:
            SecAggRangeError: A value is out of the declared range (nothing is sent).
            SecAggError: Bad framing or a share box that fails authentication.
            SecAggAbort: Fewer neighbours left than the threshold.
            ValueError: ``values`` does not have ``dim`` elements (nothing is sent).
        """
        self._expect("masked_input")
        if np.size(values) != self.dim:
            raise ValueError(f"client {self.client_id}: got {np.size(values)} values, the session was made for {self.dim}")
        boxes = wire.decode_ciphertexts(self._unpack(routed_shares, MessageType.ROUTED_SHARES))
        encoded = to_field(values, self.params, self.client_id)  # range error before any share is used
        self._held = self._open_boxes(boxes)
        message = self._pack(MessageType.MASKED_INPUT, wire.encode_masked(self._mask(encoded), self.params.modulus_bits))
        # The masks and the secrets behind them are not needed again: free d words per client.
        self._masks, self._box_secrets, self._mask_secrets = None, {}, {}
        return self._done(message)

    def sign_survivors(self, survivors: bytes) -> bytes:
        """Step 3: check and sign the server's survivor/dropped view (consistency check).

        Raises:
            SecAggError: The view lists a client as both survived and dropped (the server
                would get both shares and unmask it), omits a neighbour, or drops us.
            SecAggAbort: Fewer survivors than the threshold.
        """
        self._expect("sign_survivors")
        view = wire.decode_survivors(self._unpack(survivors, MessageType.SURVIVORS))
        self._check_view(view)
        self._view = view
        self._view_signature = sign(self._signing_key, wire.survivors_signed_bytes(self.round, view))
        return self._done(self._pack(MessageType.SURVIVORS_SIGNATURE, self._view_signature))

    def unmask(self, request: bytes) -> bytes:
        """Step 4: after checking that enough clients signed the same view, reveal one share per neighbour.

        For a surviving neighbour the share of b_v, for a dropped one the share of s_sk_v,
        never both (the view was checked to be a partition in ``sign_survivors``).

        Raises:
            SecAggError: A forwarded signature does not verify (a bad signer, or server
                equivocation), or this client's own signature comes back altered.
            SecAggAbort: Fewer signers than the threshold.
        """
        self._expect("unmask")
        signatures = wire.decode_signatures(self._unpack(request, MessageType.UNMASK_REQUEST))
        self._check_signatures(signatures)
        assert self._view is not None
        survivors = set(self._view.survivors)
        reveals = [self._reveal(v, v in survivors) for v in sorted(self._held)]
        return self._done(self._pack(MessageType.UNMASK_RESPONSE, wire.encode_reveals(reveals)))

    # ------------------------------------------------------------ checks

    def _expect(self, step: str) -> None:
        # Each step succeeds once, in order: a second unmask request is refused, so a server
        # cannot collect b_v and s_sk_v shares in two passes. A step that raised (e.g. a
        # range error) may be retried; nothing was sent and the state did not move.
        expected = _STEPS[self._step]
        if step != expected:
            raise SecAggError(SERVER_ID, f"out-of-order request for {step}; client is at {expected}")

    def _done(self, message: bytes) -> bytes:
        self._step += 1
        return message

    def _unpack(self, data: bytes, kind: MessageType) -> wire.Reader:
        _, reader = wire.unpack(data, kind, self.round, self.client_id, origin=SERVER_ID)
        return reader

    def _pack(self, kind: MessageType, body: bytes | memoryview) -> bytes:
        return wire.pack(kind, self.round, self.client_id, SERVER_ID, body)

    # ------------------------------------------------------------ between messages

    def export_state(self) -> bytes:
        """This session's secrets and view, for a runtime that starts a process per message (Flower).

        Holds private keys and shares: it must stay on the client (Flower keeps it in the
        node's own ``context.state``). The expanded masks are not kept; ``masked_input``
        expands them again from the secrets.
        """
        peers = [
            [a.client, a.c_public.hex(), a.s_public.hex(), a.seed_commitment.hex(), a.signature.hex()]
            for a in self._peers.values()
        ]
        state = {
            "client": self.client_id,
            "round": self.round,
            "dim": self.dim,
            "step": self._step,
            "c": self._c.private_bytes().hex(),
            "s": self._s.private_bytes().hex(),
            "b": self._b.hex(),
            "participants": list(self._graph_source[0]),
            "graph_seed": self._graph_source[1].hex(),
            "peers": peers,
            "box": {str(v): k.hex() for v, k in self._box_secrets.items()},
            "mask": {str(v): k.hex() for v, k in self._mask_secrets.items()},
            "held": {str(v): [str(b), str(sk)] for v, (b, sk) in self._held.items()},
            "view": None if self._view is None else [list(self._view.survivors), list(self._view.dropped)],
            "view_signature": self._view_signature.hex(),
        }
        return json.dumps(state).encode()

    @classmethod
    def restore(
        cls, data: bytes, signing_key: Ed25519PrivateKey, registry: Mapping[int, bytes], params: SecAggParams
    ) -> ClientSession:
        """The session ``export_state`` saved, ready for its next step."""
        state = json.loads(data)
        session = cls(state["client"], signing_key, registry, params, state["round"], state["dim"])
        session._step = state["step"]
        session._c, session._s = (
            key_pair_from_private(bytes.fromhex(state["c"])),
            key_pair_from_private(bytes.fromhex(state["s"])),
        )
        session._b = bytes.fromhex(state["b"])
        if state["participants"]:
            session._graph_source = (tuple(state["participants"]), bytes.fromhex(state["graph_seed"]))
            session._graph = build_graph(session._graph_source[0], session._graph_source[1], params)
        session._peers = {int(c): SignedKeys(int(c), *(bytes.fromhex(x) for x in rest)) for c, *rest in state["peers"]}
        session._box_secrets = {int(v): bytes.fromhex(k) for v, k in state["box"].items()}
        session._mask_secrets = {int(v): bytes.fromhex(k) for v, k in state["mask"].items()}
        session._held = {int(v): (int(b), int(sk)) for v, (b, sk) in state["held"].items()}
        if state["view"] is not None:
            session._view = Survivors(tuple(state["view"][0]), tuple(state["view"][1]))
        session._view_signature = bytes.fromhex(state["view_signature"])
        return session

    def _check_key_list(self, keys: wire.KeyList) -> NeighbourGraph:
        if keys.params_fingerprint != self.params.fingerprint():
            raise SecAggError(SERVER_ID, "protocol parameters differ between server and client")
        if self.client_id not in keys.participants or len(keys.participants) > self.params.max_clients:
            raise SecAggError(
                SERVER_ID,
                f"participant list has {len(keys.participants)} clients, "
                f"must include this one and not exceed max_clients={self.params.max_clients}",
            )
        graph = build_graph(keys.participants, keys.graph_seed, self.params)
        mine = graph.neighbours[self.client_id]
        if tuple(a.client for a in keys.adverts) != tuple(sorted(mine)):
            raise SecAggError(SERVER_ID, "advertised keys do not match this client's neighbours in the graph")
        for advert in keys.adverts:
            self._verify_advert(advert)
        self._check_distinct_keys(keys.adverts)
        threshold = graph.thresholds[self.client_id]
        if len(mine) < threshold:
            raise SecAggAbort("ShareKeys", f"neighbours of client {self.client_id}", len(mine), threshold)
        return graph

    def _verify_advert(self, advert: SignedKeys) -> None:
        if advert.client not in self._registry:
            raise SecAggError(advert.client, "not in the client registry (forwarded by the server)")
        signed = wire.advert_signed_bytes(advert, self.round)
        if not verify(load_verify_key(self._registry[advert.client]), advert.signature, signed):
            raise SecAggError(
                advert.client,
                "advertisement signature does not verify (forwarded unchecked by "
                "the server: the client sent a bad one, or the server altered it)",
            )

    def _check_distinct_keys(self, adverts: tuple[SignedKeys, ...]) -> None:
        # Bonawitz et al. 2017, round 1: a repeated key would mean a replayed advertisement.
        publics = [self._c.public, self._s.public] + [k for a in adverts for k in (a.c_public, a.s_public)]
        if len(set(publics)) != len(publics):
            raise SecAggError(SERVER_ID, "key list repeats a public key")

    def _check_view(self, view: Survivors) -> None:
        both = set(view.survivors) & set(view.dropped)
        if both:
            raise SecAggError(
                SERVER_ID,
                f"lists client(s) {sorted(both)} as both survived and dropped: revealing "
                "both shares would unmask an individual input; refused",
            )
        if self.client_id not in view.survivors:
            raise SecAggError(SERVER_ID, f"omits client {self.client_id} from the survivors although it sent its input")
        listed = set(view.survivors) | set(view.dropped)
        missing = sorted(set(self._held) - listed)
        if missing:
            raise SecAggError(SERVER_ID, f"says neither survived nor dropped for neighbour(s) {missing}")
        threshold = max(self._own_threshold(), self.params.min_survivors)  # min_survivors: what DP was priced for
        if len(view.survivors) < threshold:
            raise SecAggAbort("ConsistencyCheck", "survivors", len(view.survivors), threshold)

    def _check_signatures(self, signatures: dict[int, bytes]) -> None:
        assert self._view is not None
        signed = wire.survivors_signed_bytes(self.round, self._view)
        for signer, signature in signatures.items():
            if signer not in self._view.survivors or signer not in self._registry:
                raise SecAggError(SERVER_ID, f"forwards a signature of client {signer}, which is not a survivor")
            if signer == self.client_id:  # our own: what we sent, or the server altered it
                if signature != self._view_signature:
                    raise SecAggError(SERVER_ID, "forwards this client's own signature altered")
            elif not verify(load_verify_key(self._registry[signer]), signature, signed):
                raise SecAggError(
                    signer,
                    "signature of the survivor list does not verify (forwarded unchecked by "
                    "the server: the signer sent a bad one, or the server altered it or is showing "
                    "clients different views)",
                )
        threshold = self._own_threshold()
        if len(signatures) < threshold:
            raise SecAggAbort("Unmasking", "clients that signed the survivor list", len(signatures), threshold)

    def _own_threshold(self) -> int:
        assert self._graph is not None
        return self._graph.thresholds[self.client_id]

    # ------------------------------------------------------------ crypto

    def _agree(self, adverts: tuple[SignedKeys, ...]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """One X25519 exchange per neighbour and key pair; every key with v is derived from these."""
        boxes, masks = {}, {}
        for advert in adverts:
            try:
                boxes[advert.client] = exchange(self._c.private, advert.c_public)
                masks[advert.client] = exchange(self._s.private, advert.s_public)
            except ValueError as err:
                raise SecAggError(advert.client, "advertises an invalid (low-order) X25519 public key") from err
        return boxes, masks

    def _share_boxes(self, holders: list[int], threshold: int) -> dict[int, bytes]:
        b_shares = shamir.split(self._b, threshold, holders)
        sk_shares = shamir.split(self._s.private_bytes(), threshold, holders)
        boxes: dict[int, bytes] = {}
        for v in holders:
            plaintext = shamir.share_to_bytes(b_shares[v]) + shamir.share_to_bytes(sk_shares[v])
            key = share_key(self._box_secrets[v], self.round, self.client_id, v)
            boxes[v] = encrypt(key, plaintext, share_associated_data(self.round, self.client_id, v))
        return boxes

    def _open_boxes(self, boxes: dict[int, bytes]) -> dict[int, tuple[int, int]]:
        strangers = sorted(set(boxes) - set(self._peers))
        if strangers:
            raise SecAggError(SERVER_ID, f"routes shares from non-neighbours {strangers}")
        threshold = self._own_threshold()
        if len(boxes) < threshold:
            raise SecAggAbort("MaskedInputCollection", "neighbours that shared keys", len(boxes), threshold)
        return {v: self._open_box(v, box) for v, box in boxes.items()}

    def _open_box(self, sender: int, box: bytes) -> tuple[int, int]:
        key = share_key(self._box_secrets[sender], self.round, sender, self.client_id)
        try:
            plaintext = decrypt(key, box, share_associated_data(self.round, sender, self.client_id))
        except (InvalidTag, ValueError) as err:
            raise SecAggError(sender, "share ciphertext fails authentication (routed by the server)") from err
        try:
            if len(plaintext) != SHARE_PLAINTEXT_BYTES:
                raise ValueError("wrong length")
            half = shamir.SHARE_BYTES
            return shamir.share_from_bytes(plaintext[:half]), shamir.share_from_bytes(plaintext[half:])
        except ValueError as err:
            raise SecAggError(sender, f"share plaintext is malformed: {err}") from err

    def _expand_masks(self) -> npt.NDArray[np.unsignedinteger]:
        """PRG(b_u) plus u's side of the mask with every neighbour: data-independent, done before the input."""
        prg = Prg(self.dim, self.params.prg, self.params.word)
        total = prg.expand(self_mask_key(self._b, self.round, self.client_id)).copy()
        for v in sorted(self._peers):
            add_pairwise(total, prg.expand(self._pairwise_key(v)), self.client_id, v)
        return total

    def _pairwise_key(self, v: int) -> bytes:
        return pairwise_key(self._mask_secrets[v], self.round, self.client_id, v)

    def _mask(self, encoded: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.unsignedinteger]:
        if self._masks is None:  # a restored session: expand the masks now
            self._masks = self._expand_masks()
        total = np.add(encoded, self._masks, out=encoded)  # encoded is this call's own array
        # Mask only with neighbours that shared keys (U2): masks with a neighbour that
        # vanished before ShareKeys could never be removed, so take them out again.
        gone = sorted(set(self._peers) - set(self._held))
        if gone:
            prg = Prg(self.dim, self.params.prg, self.params.word)
            for v in gone:
                remove_pairwise(total, prg.expand(self._pairwise_key(v)), self.client_id, v)
        return total

    def _reveal(self, v: int, survived: bool) -> ShareReveal:
        b_share, sk_share = self._held[v]
        if survived:
            return ShareReveal(v, ShareKind.SELF_MASK_SEED, b_share)
        return ShareReveal(v, ShareKind.MASKING_KEY, sk_share)
