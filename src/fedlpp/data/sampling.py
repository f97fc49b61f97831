"""Seeded subsets shared by the file and hub loaders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# Distinct streams per purpose, so that asking for a different number of train
# examples never changes which eval examples are drawn (and vice versa).
TRAIN_STREAM = 0
EVAL_STREAM = 1
HOLDOUT_STREAM = 2


def make_rng(seed: int, stream: int) -> np.random.Generator:
    """A numpy Generator for one purpose (`stream`) of one seed."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([seed, stream])


def seeded_subset(items: Sequence[T], k: int, seed: int, stream: int, what: str) -> tuple[T, ...]:
    """`k` items drawn without replacement, kept in their original order.

    k = 0 means all items. Asking for more than there are is an error rather
    than a silent cap, so that a run never reports a size it did not use.
    """
    if k < 0:
        raise ValueError(f"{what}: the number of examples must be >= 0, got {k}")
    if k == 0 or k == len(items):
        return tuple(items)
    if k > len(items):
        raise ValueError(f"{what}: asked for {k} examples but only {len(items)} are available")
    chosen = make_rng(seed, stream).choice(len(items), size=k, replace=False)
    return tuple(items[int(i)] for i in np.sort(chosen))


def hold_out(items: Sequence[T], num_eval: int, seed: int, what: str, fraction: int = 10) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded ``num_eval`` of ``items`` (0: one in ``fraction``, at least one) held out for
    evaluation, the rest for training; both keep the original order. An error when nothing would be left to train."""
    n = len(items)
    k = num_eval or max(1, n // fraction)
    if k >= n:
        raise ValueError(f"{what}: cannot hold out {k} of {n} for evaluation and keep some for training")
    held = {int(i) for i in make_rng(seed, HOLDOUT_STREAM).permutation(n)[:k]}
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def sized_task(
    name: str, kind: str, train: Sequence[Any], eval_: Sequence[Any], num_train: int, num_eval: int, seed: int, **fields: Any
) -> Any:
    """A TaskData of seeded ``num_train`` / ``num_eval`` subsets (0: all) of ``train`` and ``eval_``."""
    from fedlpp.data.schema import TaskData

    return TaskData(
        name=name,
        kind=kind,
        train=seeded_subset(train, num_train, seed, TRAIN_STREAM, f"{name} train"),
        eval=seeded_subset(eval_, num_eval, seed, EVAL_STREAM, f"{name} eval"),
        **fields,
    )
