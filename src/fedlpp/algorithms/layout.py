"""Flat tensor layouts: many adapter tensors as one buffer, named only by a fingerprint.

Both sides know the adapter's layout — the sorted tensor names and shapes follow from the
model and the LoRA config — so a message carries the values of all tensors concatenated
in that order, plus a short fingerprint of the layout to catch a mismatch. Per-tensor
names and headers would cost ~24% of a 2-bit broadcast (bench/communication.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

Layout = list[tuple[str, tuple[int, ...]]]


def layout_of(shapes: Mapping[str, Sequence[int]], names: Sequence[str]) -> Layout:
    return [(n, tuple(int(d) for d in shapes[n])) for n in names]


def fingerprint(layout: Layout) -> str:
    """16 hex digits identifying the names and shapes, in order."""
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in layout)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def flatten(tensors: Mapping[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """[sum of numel] float32: the tensors of ``layout`` concatenated in order."""
    if not layout:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([tensors[n].detach().to(torch.float32).reshape(-1) for n, _ in layout])


def check_length(flat: torch.Tensor, layout: Layout) -> None:
    """Raise ValueError unless ``flat`` has exactly the layout's number of values."""
    expected = sum(numel(s) for _, s in layout)
    if flat.numel() != expected:
        raise ValueError(f"expected {expected} values for this layout, got {flat.numel()}")


def unflatten(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of ``flatten``; the length must match the layout exactly."""
    check_length(flat, layout)
    out, offset = {}, 0
    for name, shape in layout:
        n = numel(shape)
        out[name] = flat[offset : offset + n].reshape(shape).clone()
        offset += n
    return out
