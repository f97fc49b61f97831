"""Shamir t-of-n secret sharing over the prime field F_p, p = 2^521 - 1.

SecAgg shares each client's self-mask seed b_u and masking key s_sk_u among its
neighbours so the server can remove the right masks whoever drops (Bonawitz et al. 2017,
sec. 4). Secrets are 32-byte strings < p; shares are field elements of 66 bytes. A share
for holder v is the polynomial at x = v + 1 (x = 0 would be the secret itself).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1  # a Mersenne prime: far above 2^256, so any 32-byte secret is a field element
SHARE_BYTES = 66  # ceil(521 / 8)


def share_x(holder: int) -> int:
    """Evaluation point of the share held by client ``holder`` (never 0)."""
    return holder + 1


def split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Share ``secret`` so that any ``threshold`` holders can rebuild it and fewer learn nothing.

    Args:
        secret: The secret, at most 65 bytes (here 32).
        threshold: t, the degree of the polynomial plus one; 1 <= t <= len(holders).
        holders: Distinct client ids receiving one share each.

    Returns:
        {holder: share value in [0, p)}.
    """
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be in [1, {len(holders)}]")
    # Coefficients from the OS CSPRNG (`secrets`), never a seeded generator.
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {h: _evaluate(coeffs, share_x(h)) for h in holders}


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def reconstruct(shares: dict[int, int], threshold: int, size: int = 32) -> bytes:
    """Rebuild a secret from at least ``threshold`` shares by Lagrange interpolation at 0.

    Args:
        shares: {holder: share value}; only the first ``threshold`` (by holder id) are used.
        threshold: t used when splitting.
        size: Length of the secret in bytes.

    Returns:
        The secret.
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, need {threshold}")
    holders = sorted(shares)[:threshold]
    coefficients = _lagrange_at_zero(tuple(share_x(h) for h in holders))
    secret = sum(c * shares[h] for c, h in zip(coefficients, holders, strict=True)) % PRIME
    if secret >= 256**size:
        raise ValueError("shares are inconsistent: the rebuilt value does not fit the secret size")
    return secret.to_bytes(size, "big")


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The basis polynomials at 0, prod_j (0 - x_j) / (x_i - x_j): shared by every secret the same holders rebuild."""
    out = []
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def share_to_bytes(value: int) -> bytes:
    """A share as 66 big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Parse 66 bytes into a share; raises ValueError if it is not a field element."""
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise ValueError("not a field element")
    return value
