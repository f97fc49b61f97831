"""Key derivations both sides must agree on: masks (Bonawitz et al. 2017, sec. 4) and share boxes.

Masked input of client u (all mod 2^32, or 2^16 in a field of at most 16 bits: ``SecAggParams.word``):
    y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)
where s_uv = HKDF(X25519(s_sk_u, s_pk_v)) = s_vu, so pairwise masks cancel in the sum of
any set of clients that contains both ends of every edge. Every key here is derived from
a shared secret (``crypto.exchange``) or seed with its own label and the round/party
context, so no key serves two purposes or two rounds.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import numpy.typing as npt

from fedlpp.secagg.crypto import derive_key

_SELF_MASK = b"fedlpp-secagg/self-mask/v1"
_PAIRWISE_MASK = b"fedlpp-secagg/pairwise-mask/v1"
_SHARE_KEY = b"fedlpp-secagg/share-encryption/v1"
_SHARE_AD = b"fedlpp-secagg/share/v1"
_SEED_COMMITMENT = b"fedlpp-secagg/seed-commitment/v1"


def context(round_: int, *parties: int) -> bytes:
    """Round and party ids as bytes, bound into every derived key."""
    return struct.pack(f">I{len(parties)}I", round_, *parties)


def self_mask_key(seed: bytes, round_: int, client: int) -> bytes:
    """PRG key of b_u's self mask, which hides y_u even from a server that learns all s_uv."""
    return derive_key(seed, _SELF_MASK, context(round_, client))


def seed_commitment(seed: bytes, round_: int, client: int) -> bytes:
    """SHA-256 commitment to b_u, signed in the advertisement.

    Not in Bonawitz et al.: it lets the server notice a corrupt share of b_u (which would
    otherwise silently yield a wrong sum) and abort instead. b_u is 256 random bits, so
    the hash reveals nothing usable about it.
    """
    return hashlib.sha256(_SEED_COMMITMENT + context(round_, client) + seed).digest()


def pairwise_key(shared: bytes, round_: int, u: int, v: int) -> bytes:
    """PRG key of the (u, v) mask from X25519(s_sk_u, s_pk_v); the same whichever end computes it."""
    return derive_key(shared, _PAIRWISE_MASK, context(round_, min(u, v), max(u, v)))


def add_pairwise(total: npt.NDArray[np.unsignedinteger], mask: npt.NDArray[np.unsignedinteger], u: int, v: int) -> None:
    """Apply u's side of the (u, v) mask in place: + if v > u, - if v < u (wraps mod the words' 2^16 or 2^32)."""
    if v > u:
        np.add(total, mask, out=total)
    else:
        np.subtract(total, mask, out=total)


def remove_pairwise(total: npt.NDArray[np.unsignedinteger], mask: npt.NDArray[np.unsignedinteger], u: int, v: int) -> None:
    """Undo ``add_pairwise`` (the server, for survivor u and dropped neighbour v)."""
    add_pairwise(total, mask, v, u)


def share_key(shared: bytes, round_: int, sender: int, recipient: int) -> bytes:
    """Key of the box carrying sender's shares to recipient, from X25519(c_sk, c_pk); one per direction and round."""
    return derive_key(shared, _SHARE_KEY, context(round_, sender, recipient))


def share_associated_data(round_: int, sender: int, recipient: int) -> bytes:
    """Associated data binding a share box to (round, sender, recipient)."""
    return _SHARE_AD + context(round_, sender, recipient)
