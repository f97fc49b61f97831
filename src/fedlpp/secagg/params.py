"""Protocol parameters shared by the server and every client of a round."""

from __future__ import annotations

import hashlib
import math
from dataclasses import astuple, dataclass

import numpy as np

GRAPHS = ("complete", "sparse")
PRGS = ("aes256-ctr", "chacha20")
MODULUS_BITS = 32  # by default masked values live in Z_{2^32}: 4 bytes each, 1.0x float32 (DESIGN 3.3)
MIN_MODULUS_BITS = 12  # a smaller field leaves no room for a useful update of a few clients
MIN_CLIENTS = 3  # t >= 2 needs >= 2 neighbours; with 2 clients the sum reveals the other's input


class SecAggParamsError(ValueError):
    """Protocol parameters are inconsistent; the message names the field."""


@dataclass(frozen=True)
class SecAggParams:
    scale: float = 2.0**20  # fixed-point step is 1/scale: round(x * scale) mod 2^32
    clip_range: float = 1.0  # declared bound r: |x| <= r or the client gets SecAggRangeError
    max_clients: int = 1000  # headroom: the sum of this many in-range values must fit in int32
    threshold_fraction: float = 0.6  # t = ceil(f * degree); f > 1/2, see `threshold`
    graph: str = "complete"  # "complete" (SecAgg) or "sparse" random Harary graph (SecAgg+)
    degree: int = 0  # sparse graph degree k; 0 = ceil(3 * log2 n), capped at n - 1
    prg: str = "aes256-ctr"  # mask expansion; "chacha20" is faster on CPUs without AES instructions
    modulus_bits: int = MODULUS_BITS  # b: everything is summed in Z_{2^b}; a masked value costs b bits on the wire
    # True: the encoder wraps each value into the field itself and bounds the sum's chance to wrap (a rotation and a
    # scale chosen for it, ``algorithms.rotated``), so only one value, not max_clients of them, must fit in 2^(b-1).
    sum_may_wrap: bool = False
    # The fewest inputs a sum may hold: fewer and the server aborts before unmasking, and every client refuses to
    # sign such a view (distributed DP is priced for at least this many noise shares). 0: the thresholds alone.
    min_survivors: int = 0

    def __post_init__(self) -> None:
        _check(self.scale > 0 and math.isfinite(self.scale), "scale", f"must be > 0, got {self.scale}")
        _check(self.clip_range > 0 and math.isfinite(self.clip_range), "clip_range", "must be > 0")
        _check(self.max_clients >= MIN_CLIENTS, "max_clients", f"must be >= {MIN_CLIENTS}")
        # Two sets of >= t holders out of d must intersect when t > d/2, so an honest holder
        # asked for both shares of one client refuses (Bonawitz et al. 2017, sec. 4).
        _check(0.5 < self.threshold_fraction <= 1.0, "threshold_fraction", "must be in (0.5, 1]")
        _check(self.graph in GRAPHS, "graph", f"got {self.graph!r}; valid choices are {GRAPHS}")
        _check(self.prg in PRGS, "prg", f"got {self.prg!r}; valid choices are {PRGS}")
        _check(self.degree >= 0, "degree", f"must be >= 0 (0 = 3 log2 n), got {self.degree}")
        _check(
            0 <= self.min_survivors <= self.max_clients, "min_survivors", f"must be in [0, max_clients], got {self.min_survivors}"
        )
        _check(
            MIN_MODULUS_BITS <= self.modulus_bits <= MODULUS_BITS,
            "modulus_bits",
            f"must be in [{MIN_MODULUS_BITS}, {MODULUS_BITS}], got {self.modulus_bits}",
        )
        self._check_headroom()

    @property
    def modulus_mask(self) -> int:
        """2^b - 1: a value of Z_{2^32} reduced into Z_{2^b} is its low b bits."""
        return (1 << self.modulus_bits) - 1

    @property
    def word(self) -> np.dtype:
        """The unsigned integers the masks, inputs and sums are computed in: 16 bits up to a 16-bit field, else 32;
        Z_{2^b} is their low b bits. 16-bit words halve the keystream each mask takes and the memory each step reads."""
        return np.dtype("<u2") if self.modulus_bits <= 16 else np.dtype("<u4")

    def _check_headroom(self) -> None:
        # |round(x * scale)| <= ceil(r * scale); n such summands must stay inside [-2^(b-1), 2^(b-1)) so the
        # signed sum decodes exactly from Z_{2^b} (one summand only when the encoder bounds the sum itself).
        if self.sum_may_wrap:  # one value within the field's signed range: [-2^(b-1), 2^(b-1)] (the ends are one element)
            _check(self.modulus_bits < MODULUS_BITS, "modulus_bits", "a sum that may wrap needs a field of fewer than 32 bits")
            worst = math.ceil(self.clip_range * self.scale)
            _check(worst <= 2 ** (self.modulus_bits - 1), "scale", f"ceil(clip_range * scale) = {worst} is beyond the field")
            return
        worst = self.max_clients * math.ceil(self.clip_range * self.scale)
        _check(
            worst < 2 ** (self.modulus_bits - 1),
            "scale",
            f"no headroom: max_clients * ceil(clip_range * scale) = {worst} must be < 2^{self.modulus_bits - 1}; "
            "lower scale, clip_range or max_clients",
        )

    def fingerprint(self) -> bytes:
        """SHA-256 of the parameters, sent by the server so a client notices a mismatch."""
        return hashlib.sha256(repr(astuple(self)).encode()).digest()


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise SecAggParamsError(f"secagg.{key}: {message}")


def threshold(params: SecAggParams, degree: int) -> int:
    """Shamir threshold for a client with ``degree`` share holders (its neighbours).

    Args:
        params: Protocol parameters.
        degree: Number of neighbours of the client in the round's graph.

    Returns:
        t = max(2, ceil(f * degree)); t >= 2 because a single share would be the secret.
    """
    return max(2, math.ceil(params.threshold_fraction * degree - 1e-9))
