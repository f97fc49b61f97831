"""Cryptographic primitives of the protocol, all from the `cryptography` package.

- Randomness: every secret (key pairs, self-mask seeds, nonces) comes from
  ``random_bytes``, i.e. the OS CSPRNG via ``secrets`` -- never a seeded numpy/random
  generator (DESIGN 3.3: Flower's masks come from a 32-bit-seeded RandomState).
- Key agreement: X25519 (``exchange``), then HKDF-SHA256 with a label and the round/party
  context (``derive_key``); one exchange per peer and key pair serves every key derived
  from it.
- Share encryption: ChaCha20-Poly1305 with a random 96-bit nonce and associated data.
- Mask expansion (the PRG of Bonawitz et al. 2017): an AES-256-CTR or ChaCha20 keystream
  read as little-endian uint32, or uint16 in a field of at most 16 bits (``Prg``).
- Identity: long-term Ed25519 signing keys.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32  # X25519 keys, HKDF outputs, self-mask seeds
SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 12  # ChaCha20-Poly1305
_PRG_NONCE = bytes(16)  # each PRG key is derived for one (round, purpose, parties) only


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


def exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret with a peer; feed it to ``derive_key``, never use it as a key.

    Raises:
        ValueError: If ``peer_public`` is not 32 bytes or is a low-order point (the shared
            secret would be all zero, a public constant).
    """
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


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


class Prg:
    """The PRG of Bonawitz et al. 2017: a stream cipher's keystream read as unsigned words.

    Encrypting zeros with a 32-byte key (used for one purpose in one round, so a zero nonce
    is safe) gives ``length`` uniform values of Z_{2^32} (or Z_{2^16} with 16-bit words). One
    instance serves one vector length and reuses its buffers: ``expand`` returns a read-only
    view that the next call overwrites, so a caller adds it into its total before expanding
    the next key.

    Args:
        length: Number of values d.
        cipher: "aes256-ctr" (fastest on CPUs with AES instructions) or "chacha20".
        word: "<u4" (the default) or "<u2" (``SecAggParams.word``).
    """

    def __init__(self, length: int, cipher: str, word: np.dtype | str = "<u4") -> None:
        if cipher not in _PRG_CIPHERS:
            raise ValueError(f"unknown PRG cipher {cipher!r}; valid choices are {tuple(_PRG_CIPHERS)}")
        word = np.dtype(word)
        self._cipher = _PRG_CIPHERS[cipher]
        self._zeros = _zeros(word.itemsize * length)
        self._out = bytearray(word.itemsize * length + _UPDATE_INTO_SLACK)
        self._values = np.frombuffer(self._out, dtype=word, count=length)
        self._values.flags.writeable = False

    def expand(self, key: bytes) -> npt.NDArray[np.unsignedinteger]:
        """The mask of ``key``: a read-only view of shape (d,), valid until the next call."""
        self._cipher(key).update_into(self._zeros, self._out)
        return self._values


@functools.lru_cache(maxsize=2)
def _zeros(size: int) -> bytes:
    """A shared read-only block of zeros for the PRG to encrypt (not reallocated every session)."""
    return bytes(size)


def _aes256_ctr(key: bytes) -> CipherContext:
    return Cipher(algorithms.AES(key), modes.CTR(_PRG_NONCE)).encryptor()


def _chacha20(key: bytes) -> CipherContext:
    return Cipher(algorithms.ChaCha20(key, _PRG_NONCE), mode=None).encryptor()


_PRG_CIPHERS = {"aes256-ctr": _aes256_ctr, "chacha20": _chacha20}
_UPDATE_INTO_SLACK = 64  # update_into wants room for up to one more block than its input


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
