"""Stable derived seeds: every random choice of a run is a pure function of (seed, purpose, ...).

Deriving instead of drawing from one running generator is what makes ``--resume`` give the
same result as an uninterrupted run: round t's choices never depend on what ran before.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a path of names/numbers (stable across processes)."""
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
