"""Versioned byte format of every protocol message, parsed strictly.

Header (22 bytes, big-endian): magic "FLSA", version u8, message type u8, round u32,
sender u32, recipient u32, body length u32. The body layouts are in the ``encode_*``
functions; lists carry a u32 count, variable-size items a u32 length. Anything truncated,
trailing, out of order, from the wrong round or of the wrong type raises ``SecAggError``
naming the sender, so any transport (the local engine, Flower) can carry raw bytes.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from fedlpp.quant.packing import pack_uints, unpack_uints
from fedlpp.secagg.crypto import KEY_BYTES, SIGNATURE_BYTES
from fedlpp.secagg.errors import SecAggError, party_name
from fedlpp.secagg.shamir import SHARE_BYTES, share_from_bytes, share_to_bytes

MAGIC = b"FLSA"
# 2: a small field's rotation signs come from packed random bytes; 3: the rotation is the DCT-IV and a field of at
# most 16 bits reads its masks as 16-bit words. A party of another version would mask or rotate differently.
VERSION = 3
_HEADER = struct.Struct(">4sBBIIII")
HEADER_BYTES = _HEADER.size  # 22
_U32 = struct.Struct(">I")


class MessageType(IntEnum):
    ADVERTISE = 1  # client -> server: signed X25519 public keys (c, s)
    KEY_LIST = 2  # server -> client: graph seed, participants, neighbours' adverts
    SHARES = 3  # client -> server: encrypted Shamir shares, one per neighbour
    ROUTED_SHARES = 4  # server -> client: the ciphertexts addressed to it
    MASKED_INPUT = 5  # client -> server: y_u in Z_{2^b}, uint32 little-endian or b bits packed
    SURVIVORS = 6  # server -> client: who survived / dropped after masking
    SURVIVORS_SIGNATURE = 7  # client -> server: signature of that view
    UNMASK_REQUEST = 8  # server -> client: everyone's signatures of the same view
    UNMASK_RESPONSE = 9  # client -> server: one share per neighbour, b or s_sk


class ShareKind(IntEnum):
    SELF_MASK_SEED = 0  # share of b_v: v survived
    MASKING_KEY = 1  # share of s_sk_v: v dropped


@dataclass(frozen=True)
class Header:
    type: MessageType
    round: int
    sender: int
    recipient: int


@dataclass(frozen=True)
class SignedKeys:
    """One client's advertisement: its round keys and its signature over them."""

    client: int
    c_public: bytes  # X25519 key for share encryption
    s_public: bytes  # X25519 key for pairwise masks
    seed_commitment: bytes  # SHA-256 of b_u: lets the server detect corrupt shares of b_u
    signature: bytes  # Ed25519 over ``advert_signed_bytes``


@dataclass(frozen=True)
class KeyList:
    params_fingerprint: bytes
    graph_seed: bytes
    participants: tuple[int, ...]  # U1, sorted: the nodes of the graph
    adverts: tuple[SignedKeys, ...]  # the recipient's neighbours, sorted by id


@dataclass(frozen=True)
class Survivors:
    survivors: tuple[int, ...]  # U3: masked input arrived
    dropped: tuple[int, ...]  # U2 \ U3: shared keys, then vanished


@dataclass(frozen=True)
class ShareReveal:
    about: int  # the neighbour whose secret this is a share of
    kind: ShareKind
    share: int


# ---------------------------------------------------------------- framing


def check_session(round_: int, dim: int) -> None:
    """Refuse a round number the header cannot carry (u32) or a negative vector length."""
    if not 0 <= round_ < 2**32:
        raise ValueError(f"round {round_} must be in [0, 2^32): it travels as a u32 in every header")
    if dim < 0:
        raise ValueError(f"vector length {dim} must be >= 0")


def pack(kind: MessageType, round_: int, sender: int, recipient: int, body: bytes | memoryview) -> bytes:
    """Frame a body with the versioned header (one copy of the body)."""
    return _HEADER.pack(MAGIC, VERSION, int(kind), round_, sender, recipient, memoryview(body).nbytes) + body


class Reader:
    """Cursor over a message body; every read failure names the sender."""

    def __init__(self, body: bytes | memoryview, sender: int | str) -> None:
        self._body = memoryview(body)
        self._pos = 0
        self.sender = sender

    def error(self, reason: str) -> SecAggError:
        """A ``SecAggError`` from this message's sender."""
        return SecAggError(self.sender, reason)

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes, or an error naming the truncated field."""
        if self._pos + n > len(self._body):
            raise self.error(f"truncated {what}: needs {n} bytes, {len(self._body) - self._pos} left")
        out = bytes(self._body[self._pos : self._pos + n])
        self._pos += n
        return out

    def u32(self, what: str) -> int:
        """The next big-endian u32."""
        return int(_U32.unpack(self.take(4, what))[0])

    def ids(self, what: str) -> tuple[int, ...]:
        """A u32 count then that many strictly increasing client ids."""
        count = self.u32(f"{what} count")
        out = tuple(self.u32(what) for _ in range(count))
        _check_increasing(self, out, what)
        return out

    def rest(self) -> memoryview:
        """All bytes not read yet."""
        out = self._body[self._pos :]
        self._pos = len(self._body)
        return out

    def finish(self) -> None:
        """Refuse trailing bytes."""
        if self._pos != len(self._body):
            raise self.error(f"{len(self._body) - self._pos} unexpected trailing bytes")


def _check_increasing(reader: Reader, ids: Sequence[int], what: str) -> None:
    if any(b <= a for a, b in itertools.pairwise(ids)):
        raise reader.error(f"{what} are not strictly increasing (duplicate or unordered ids)")


def unpack(data: bytes, kind: MessageType, round_: int, recipient: int, origin: int | None = None) -> tuple[Header, Reader]:
    """Check a message's header and return it with a reader over the body.

    Args:
        data: The raw message.
        kind: The message type expected at this step.
        round_: The current round.
        recipient: Our id (``SERVER_ID`` on the server).
        origin: Who the transport says sent it, if known; must match the header.

    Returns:
        The header and a ``Reader`` positioned at the body.

    Raises:
        SecAggError: On any mismatch, naming the sender.
    """
    if len(data) < HEADER_BYTES:
        who = origin if origin is not None else "an unknown sender"
        raise SecAggError(who, f"truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, type_, rnd, sender, to, length = _HEADER.unpack_from(data)
    who = origin if origin is not None else sender
    _check_header(who, magic, version, length, len(data))
    if origin is not None and sender != origin:
        raise SecAggError(who, f"header claims to come from {party_name(sender)}")
    if type_ != kind:
        raise SecAggError(who, f"wrong message type {_type_name(type_)}, expected {kind.name}")
    if rnd != round_:
        raise SecAggError(who, f"wrong round {rnd}, expected {round_}")
    if to != recipient:
        raise SecAggError(who, f"addressed to {party_name(to)}, not to {party_name(recipient)}")
    return Header(MessageType(type_), rnd, sender, to), Reader(memoryview(data)[HEADER_BYTES:], who)


def peek_sender(data: bytes) -> int | str:
    """The sender id a message claims, without checking anything else (for error messages)."""
    if len(data) < HEADER_BYTES:
        return "an unknown sender"
    return int(_HEADER.unpack_from(data)[4])


def _check_header(who: int, magic: bytes, version: int, length: int, total: int) -> None:
    if magic != MAGIC:
        raise SecAggError(who, f"bad magic {magic!r}, not a fedlpp secagg message")
    if version != VERSION:
        raise SecAggError(who, f"unsupported version {version}, expected {VERSION}")
    if length != total - HEADER_BYTES:
        raise SecAggError(who, f"body length field says {length} bytes, message carries {total - HEADER_BYTES}")


def _type_name(value: int) -> str:
    try:
        return MessageType(value).name
    except ValueError:
        return f"#{value}"


# ---------------------------------------------------------------- bodies


def advert_signed_bytes(keys: SignedKeys, round_: int) -> bytes:
    """What a client signs when advertising its round keys (binds round and identity)."""
    ids = struct.pack(">II", round_, keys.client)
    return b"fedlpp-secagg/advertise/v1" + ids + keys.c_public + keys.s_public + keys.seed_commitment


def survivors_signed_bytes(round_: int, view: Survivors) -> bytes:
    """What a client signs to confirm the server's survivor/dropped view (consistency check)."""
    return b"fedlpp-secagg/survivors/v1" + struct.pack(">I", round_) + encode_survivors(view)


def _encode_ids(ids: Sequence[int]) -> bytes:
    return _U32.pack(len(ids)) + b"".join(_U32.pack(i) for i in ids)


def encode_advertise(keys: SignedKeys) -> bytes:
    """Body: c_pk (32) || s_pk (32) || commitment to b_u (32) || signature (64)."""
    return keys.c_public + keys.s_public + keys.seed_commitment + keys.signature


def decode_advertise(reader: Reader, client: int) -> SignedKeys:
    """Parse an advertisement body from ``client``."""
    keys = decode_advertise_fields(reader, client)
    reader.finish()
    return keys


def encode_key_list(keys: KeyList) -> bytes:
    """Body: fingerprint (32) || seed (32) || ids(U1) || count || (id || advertisement body)*."""
    entries = b"".join(_U32.pack(a.client) + encode_advertise(a) for a in keys.adverts)
    head = keys.params_fingerprint + keys.graph_seed + _encode_ids(keys.participants)
    return head + _U32.pack(len(keys.adverts)) + entries


def decode_key_list(reader: Reader) -> KeyList:
    """Parse a key list body."""
    fingerprint = reader.take(32, "parameter fingerprint")
    seed = reader.take(32, "graph seed")
    participants = reader.ids("participant ids")
    count = reader.u32("advertisement count")
    adverts = tuple(_decode_signed_keys(reader) for _ in range(count))
    _check_increasing(reader, [a.client for a in adverts], "advertisement ids")
    reader.finish()
    return KeyList(fingerprint, seed, participants, adverts)


def _decode_signed_keys(reader: Reader) -> SignedKeys:
    client = reader.u32("advertisement id")
    return decode_advertise_fields(reader, client)


def decode_advertise_fields(reader: Reader, client: int) -> SignedKeys:
    """Parse an advertisement's fields without requiring the end of the body."""
    c_pk = reader.take(KEY_BYTES, "encryption public key")
    s_pk = reader.take(KEY_BYTES, "masking public key")
    commitment = reader.take(KEY_BYTES, "self-mask seed commitment")
    return SignedKeys(client, c_pk, s_pk, commitment, reader.take(SIGNATURE_BYTES, "signature"))


def encode_ciphertexts(items: dict[int, bytes]) -> bytes:
    """Body of SHARES / ROUTED_SHARES: count || (peer id || length || ciphertext)* by peer id."""
    parts = [_U32.pack(peer) + _U32.pack(len(ct)) + ct for peer, ct in sorted(items.items())]
    return _U32.pack(len(items)) + b"".join(parts)


def decode_ciphertexts(reader: Reader) -> dict[int, bytes]:
    """Parse a SHARES / ROUTED_SHARES body into {peer: ciphertext}."""
    count = reader.u32("ciphertext count")
    pairs = [_decode_ciphertext(reader) for _ in range(count)]
    _check_increasing(reader, [peer for peer, _ in pairs], "ciphertext peer ids")
    reader.finish()
    return dict(pairs)


def _decode_ciphertext(reader: Reader) -> tuple[int, bytes]:
    peer = reader.u32("peer id")
    return peer, reader.take(reader.u32("ciphertext length"), f"ciphertext of {party_name(peer)}")


def encode_masked(values: npt.NDArray[np.unsignedinteger], bits: int = 32) -> memoryview | bytes:
    """Body: the masked vector in Z_{2^bits}: each value's low ``bits`` bits, packed least-significant bit first
    (ceil(d bits / 8) bytes); at 32 and 16 bits that is plain little-endian uint32 or uint16 (4 bytes a value is
    1.0x float32).

    At 32 or 16 bits, from words of that width, a view of ``values`` (no copy on little-endian machines): ``pack``
    copies it once into the message.
    """
    if bits in (16, 32) and values.dtype.itemsize * 8 == bits:
        words = np.ascontiguousarray(values, dtype=f"<u{bits // 8}")
        return memoryview(words).cast("B")  # type: ignore[arg-type]  # an ndarray is a buffer
    return pack_uints(values, bits)


def masked_nbytes(dim: int, bits: int = 32) -> int:
    """Bytes of a masked vector of ``dim`` values in Z_{2^bits}."""
    return -(-dim * bits // 8)


def decode_masked(reader: Reader, dim: int, bits: int = 32, word: np.dtype | str = "<u4") -> npt.NDArray[np.unsignedinteger]:
    """Parse a masked vector of exactly ``dim`` values in Z_{2^bits} as ``word``s (a read-only view, no copy, when
    the words are ``bits`` wide)."""
    body = reader.rest()
    expected = masked_nbytes(dim, bits)
    if len(body) != expected:
        raise reader.error(f"masked input has {len(body)} bytes, expected {expected} ({dim} values of {bits} bits)")
    word = np.dtype(word)
    if word.itemsize * 8 == bits:
        return np.frombuffer(body, dtype=word)
    try:
        return unpack_uints(body, bits, dim).astype(word)
    except ValueError as error:
        raise reader.error(f"masked input: {error}") from None


def encode_survivors(view: Survivors) -> bytes:
    """Body: ids(survivors) || ids(dropped)."""
    return _encode_ids(view.survivors) + _encode_ids(view.dropped)


def decode_survivors(reader: Reader) -> Survivors:
    """Parse a survivors body."""
    view = Survivors(reader.ids("survivor ids"), reader.ids("dropped ids"))
    reader.finish()
    return view


def encode_signatures(signatures: dict[int, bytes]) -> bytes:
    """Body of UNMASK_REQUEST: count || (client id || signature)* by id."""
    return _U32.pack(len(signatures)) + b"".join(_U32.pack(c) + s for c, s in sorted(signatures.items()))


def decode_signatures(reader: Reader) -> dict[int, bytes]:
    """Parse an UNMASK_REQUEST body into {client: signature}."""
    count = reader.u32("signature count")
    pairs = [(reader.u32("signer id"), reader.take(SIGNATURE_BYTES, "signature")) for _ in range(count)]
    _check_increasing(reader, [c for c, _ in pairs], "signer ids")
    reader.finish()
    return dict(pairs)


def encode_reveals(reveals: Sequence[ShareReveal]) -> bytes:
    """Body of UNMASK_RESPONSE: count || (about id || kind u8 || share (66))*."""
    ordered = sorted(reveals, key=lambda r: r.about)
    parts = [_U32.pack(r.about) + bytes([r.kind]) + share_to_bytes(r.share) for r in ordered]
    return _U32.pack(len(reveals)) + b"".join(parts)


def decode_reveals(reader: Reader) -> tuple[ShareReveal, ...]:
    """Parse an UNMASK_RESPONSE body."""
    count = reader.u32("share count")
    reveals = tuple(_decode_reveal(reader) for _ in range(count))
    _check_increasing(reader, [r.about for r in reveals], "share ids")
    reader.finish()
    return reveals


def _decode_reveal(reader: Reader) -> ShareReveal:
    about = reader.u32("share id")
    kind = reader.take(1, "share kind")[0]
    if kind not in (ShareKind.SELF_MASK_SEED, ShareKind.MASKING_KEY):
        raise reader.error(f"unknown share kind {kind} for {party_name(about)}")
    try:
        share = share_from_bytes(reader.take(SHARE_BYTES, "share"))
    except ValueError as err:
        raise reader.error(f"share about {party_name(about)} is {err}") from err
    return ShareReveal(about, ShareKind(kind), share)
