"""Splitting a dataset across clients: IID, label (group) skew and quantity skew.

Every partitioner returns one sorted index list per client, uses every index
exactly once, gives each client at least `min_size` examples, and depends only
on its explicit `seed` (numpy Generator; never the global numpy state).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedlpp.data.schema import Example

# Fresh Dirichlet draws tried before moving examples to under-filled clients.
# Redrawing keeps the intended skew; the fallback only makes the result certain.
MAX_DIRICHLET_TRIES = 10


def _check(n: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n < num_clients * min_size:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} examples each "
            f"from {n} examples (need {num_clients * min_size})"
        )


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"the Dirichlet concentration alpha must be > 0, got {alpha}")


def _finish(parts: Iterable[Iterable[Any]]) -> list[list[int]]:
    return [sorted(int(i) for i in part) for part in parts]


def partition_iid(n: int, num_clients: int, seed: int, min_size: int = 1) -> list[list[int]]:
    """A uniform random split into sizes that differ by at most one."""
    _check(n, num_clients, min_size)
    order = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(order, num_clients))


def _split_by_proportions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut `indices` into consecutive pieces of sizes ~ proportions * len."""
    cuts = (np.cumsum(proportions) * len(indices)).astype(int)[:-1]
    return np.split(indices, cuts)


def _dirichlet_draw(by_group: Sequence[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    """One draw: each group's indices are shuffled and cut by their own Dirichlet proportions."""
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for indices in by_group:
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        for client, piece in enumerate(_split_by_proportions(shuffled, proportions)):
            parts[client].extend(int(i) for i in piece)
    return parts


def _rebalance(parts: list[list[int]], min_size: int) -> list[list[int]]:
    """Move examples from the largest client to each under-filled one (deterministic)."""
    for needy in range(len(parts)):
        while len(parts[needy]) < min_size:
            donor = max(range(len(parts)), key=lambda c: len(parts[c]))
            parts[needy].append(parts[donor].pop())
    return parts


def partition_dirichlet(groups: Sequence[str], num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[list[int]]:
    """Label/group skew: per group, split its indices by Dirichlet(alpha) proportions.

    The label-wise Dirichlet split popularised by Hsu et al. 2019 ("Measuring the
    effects of non-identical data distribution", arXiv:1909.06335) in the form of
    Yurochkin et al. 2019 / Wang et al. 2020: small alpha -> each client sees few
    groups; large alpha -> close to IID. Draws that leave a client under
    min_size are redrawn, then topped up from the largest client.
    """
    _check(len(groups), num_clients, min_size)
    _check_alpha(alpha)
    if len(set(groups)) < 2:
        raise ValueError(
            f"partition 'dirichlet' splits on the examples' groups (labels, an attribute), but every example "
            f'has the group {groups[0]!r}: give the data a group (jsonl: a "group" string) or use '
            "data.partition=quantity_skew"
        )
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups, dtype=object)
    by_group = [np.flatnonzero(labels == g) for g in sorted(set(groups))]
    parts: list[list[int]] = []
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_draw(by_group, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    return _finish(_rebalance(parts, min_size))


def partition_quantity_skew(n: int, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[list[int]]:
    """Sizes ~ min_size + Multinomial(rest, Dirichlet(alpha)); IID content."""
    _check(n, num_clients, min_size)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    # min_size first, the rest by the skewed proportions: no retry needed.
    sizes = min_size + rng.multinomial(n - num_clients * min_size, proportions)
    order = rng.permutation(n)
    return _finish(np.split(order, np.cumsum(sizes)[:-1]))


def partition_by_key(groups: Sequence[str], num_clients: int, seed: int, min_size: int = 1) -> list[list[int]]:
    """Each value of the key wholly on one client: the values, largest first (ties in a seeded order), each to
    the client holding the fewest examples so far. No client shares a value with another."""
    _check(len(groups), num_clients, min_size)
    values = sorted(set(groups))
    if len(values) < num_clients:
        raise ValueError(
            f"partition 'by_key': the key has {len(values)} values ({', '.join(map(repr, values[:8]))}) "
            f"but there are {num_clients} clients; every client needs a value of its own"
        )
    rng = np.random.default_rng(seed)
    by_value = {v: [i for i, g in enumerate(groups) if g == v] for v in values}
    order = sorted(rng.permutation(len(values)).tolist(), key=lambda j: -len(by_value[values[j]]))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for j in order:
        smallest = min(range(num_clients), key=lambda c: (len(parts[c]), c))
        parts[smallest].extend(by_value[values[j]])
    return _finish(parts)


# The registered partitioners (``fedlpp.registry.PARTITIONERS``): (examples, num_clients, alpha, seed, min_size).
def iid(examples: Sequence[Example], num_clients: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    return partition_iid(len(examples), num_clients, seed, min_size)


def dirichlet(examples: Sequence[Example], num_clients: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    return partition_dirichlet([e.group for e in examples], num_clients, alpha, seed, min_size)


def quantity_skew(examples: Sequence[Example], num_clients: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    return partition_quantity_skew(len(examples), num_clients, alpha, seed, min_size)


def by_key(examples: Sequence[Example], num_clients: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    return partition_by_key([e.group for e in examples], num_clients, seed, min_size)


def partition(
    scheme: str,
    examples: Sequence[Example],
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[list[int]]:
    """Dispatch to a partitioner by name; `alpha` is ignored by "iid".

    "dirichlet" and "by_key" split on `Example.group` (the label for classification; see
    `with_key` for another attribute).
    """
    from fedlpp.registry import PARTITIONERS, UnknownName

    try:
        partitioner = PARTITIONERS.get(scheme).load()
    except UnknownName:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {list(PARTITIONERS.names())}") from None
    return partitioner(examples, num_clients, alpha, seed, min_size)


def with_key(examples: Sequence[Example], key: str) -> list[Example]:
    """The examples grouped by the named attribute (``data.key``) instead of their default group."""
    import dataclasses

    known = sorted({k for e in examples for k, _ in e.attributes})
    if not any(e.attribute(key) is not None for e in examples):
        raise ValueError(f"data.key={key!r}: no example has it; the data's keys are {', '.join(known) or 'none'}")
    return [dataclasses.replace(e, group=e.attribute(key) or "") for e in examples]
