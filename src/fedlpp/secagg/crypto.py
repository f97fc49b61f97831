"""Cryptographic primitives of the protocol, all from the `cryptography` package.

- Randomness: every secret (key pairs, self-mask seeds, nonces) comes from
  ``random_bytes``, i.e. the OS CSPRNG via ``secrets`` -- never a seeded numpy/random
  generator (DESIGN 3.3: Flower's masks come from a 32-bit-seeded RandomState).
- Key agreement: X25519, then HKDF-SHA256 with a label and the round/party context.
- Share encryption: ChaCha20-Poly1305 with a random 96-bit nonce and associated data.
- Mask expansion (the PRG of Bonawitz et al. 2017): the ChaCha20 keystream read as
  little-endian uint32.
- Identity: long-term Ed25519 signing keys.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 keys, HKDF outputs, self-mask seeds
SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 12  # ChaCha20-Poly1305
_PRG_NONCE = bytes(16)  # each PRG key is derived for one (round, purpose, parties) only
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))  # public test key, no secret


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS CSPRNG; the single source of every secret in this package."""
    return secrets.token_bytes(n)


@dataclass(frozen=True)
class KeyPair:
    """A fresh X25519 key pair (one per purpose per client per round)."""

    private: X25519PrivateKey
    public: bytes  # 32 raw bytes, as advertised

    def private_bytes(self) -> bytes:
        """The 32 raw private-key bytes (shared with Shamir when this is the masking key)."""
        return self.private.private_bytes_raw()


def generate_key_pair() -> KeyPair:
    """A new X25519 key pair whose private key is 32 bytes from ``random_bytes``."""
    return key_pair_from_private(random_bytes(KEY_BYTES))


def key_pair_from_private(private: bytes) -> KeyPair:
    """Rebuild a key pair from its 32 private bytes (the server does this for dropped clients)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return KeyPair(key, key.public_key().public_bytes_raw())


def agree(private: X25519PrivateKey, peer_public: bytes, label: bytes, context: bytes) -> bytes:
    """X25519 shared secret expanded by HKDF-SHA256 into a 32-byte key.

    Args:
        private: Our private key.
        peer_public: The peer's 32 raw public-key bytes.
        label: Purpose of the key (encryption or masking), so keys never serve two roles.
        context: Round and party ids, so a key is used in exactly one place.

    Returns:
        32 key bytes.

    Raises:
        ValueError: If the public key is invalid or the shared secret is all zero.
    """
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return derive_key(shared, label, context)


def is_valid_public_key(raw: bytes) -> bool:
    """Whether ``raw`` is a usable X25519 public key (not one of the low-order points).

    A low-order point makes every shared secret zero (clamped scalars are multiples of the
    cofactor), which would turn a pairwise mask into a public constant.
    """
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def derive_key(material: bytes, label: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 (no salt) of ``material`` with info = label || context; 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label + context).derive(material)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption; returns nonce || ciphertext || tag."""
    nonce = random_bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, data: bytes, associated: bytes) -> bytes:
    """Inverse of ``encrypt``; raises ``cryptography.exceptions.InvalidTag`` on any tampering."""
    return ChaCha20Poly1305(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], associated)


def prg_uint32(key: bytes, length: int, cipher: str = "chacha20") -> npt.NDArray[np.uint32]:
    """Expand a 32-byte key into ``length`` uniform values of Z_{2^32}.

    A stream cipher's keystream (encrypting zeros) read as little-endian uint32: a
    cryptographic PRG, as SecAgg's security proof assumes (Bonawitz et al. 2017, sec. 3).

    Args:
        key: 32 key bytes, derived for one purpose in one round.
        length: Number of values d.
        cipher: "chacha20" or "aes256-ctr" (both with a zero nonce: the key is single-use).

    Returns:
        uint32 array, shape (d,).
    """
    if cipher == "chacha20":
        encryptor = Cipher(algorithms.ChaCha20(key, _PRG_NONCE), mode=None).encryptor()
    elif cipher == "aes256-ctr":
        encryptor = Cipher(algorithms.AES(key), modes.CTR(_PRG_NONCE)).encryptor()
    else:
        raise ValueError(f"unknown PRG cipher {cipher!r}")
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4")


def generate_signing_key() -> Ed25519PrivateKey:
    """A client's long-term Ed25519 identity key, from ``random_bytes``."""
    return Ed25519PrivateKey.from_private_bytes(random_bytes(KEY_BYTES))


def verify_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of the verify key the server's registry holds for this client."""
    return key.public_key().public_bytes_raw()


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Ed25519 signature of ``data`` (64 bytes)."""
    return key.sign(data)


def verify(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` under ``public``."""
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def load_verify_key(raw: bytes) -> Ed25519PublicKey:
    """Parse a 32-byte Ed25519 verify key."""
    return Ed25519PublicKey.from_public_bytes(raw)
