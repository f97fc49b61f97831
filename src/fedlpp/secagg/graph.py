"""The round's neighbour graph: complete (SecAgg) or a sparse random Harary graph (SecAgg+).

SecAgg+ (Bell et al., CCS 2020, sec. 3) masks and shares only along the edges of a random
k-regular graph with k = O(log n), so a client's cost is O(k d) instead of O(n d). The
graph is a Harary graph H(k, n) on a random ordering of the clients; the ordering comes
from the seed the server publishes in the key list, so every party derives the same graph
without further messages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlpp.secagg.params import SecAggParams, threshold


@dataclass(frozen=True)
class NeighbourGraph:
    """Who masks with and holds shares of whom in one round, and each client's threshold."""

    nodes: tuple[int, ...]  # the clients that advertised keys, sorted
    neighbours: Mapping[int, frozenset[int]]  # undirected: v in neighbours[u] iff u in neighbours[v]
    thresholds: Mapping[int, int]  # t_u: shares of u's secrets needed to rebuild them

    def degree(self, client: int) -> int:
        """Number of neighbours of ``client``."""
        return len(self.neighbours[client])


def graph_degree(params: SecAggParams, n: int) -> int:
    """Degree k for n clients: n - 1 for the complete graph, else the configured or 3 log2 n."""
    if params.graph == "complete":
        return n - 1
    k = params.degree or math.ceil(3 * math.log2(n))
    return min(k, n - 1)


def build_graph(nodes: Sequence[int], seed: bytes, params: SecAggParams) -> NeighbourGraph:
    """The graph every party derives from the round's participants and published seed.

    Args:
        nodes: Distinct client ids (the order does not matter).
        seed: 32 public bytes chosen by the server for this round.
        params: Protocol parameters (graph kind, degree, threshold fraction).

    Returns:
        The neighbour graph; complete when the degree is n - 1.
    """
    order = _shuffle(sorted(nodes), seed)
    edges = _harary_edges(len(order), graph_degree(params, len(order)))
    adjacency: dict[int, set[int]] = {u: set() for u in order}
    for i, j in edges:
        adjacency[order[i]].add(order[j])
        adjacency[order[j]].add(order[i])
    neighbours = {u: frozenset(vs) for u, vs in sorted(adjacency.items())}
    thresholds = {u: threshold(params, len(vs)) for u, vs in neighbours.items()}
    return NeighbourGraph(tuple(sorted(nodes)), neighbours, thresholds)


def _shuffle(nodes: Sequence[int], seed: bytes) -> list[int]:
    # A keyed hash per node gives a uniformly random order that any party recomputes
    # exactly, independent of numpy versions.
    return sorted(nodes, key=lambda u: hashlib.sha256(seed + u.to_bytes(4, "big")).digest())


def _harary_edges(n: int, k: int) -> set[tuple[int, int]]:
    """Edges (i < j) of the Harary graph H(k, n) on positions 0..n-1.

    Each position joins its k // 2 nearest on each side of a ring; an odd k adds the
    diameter i -- i + n/2 (n even: k-regular) or i -- i + (n-1)/2 for i <= (n-1)/2
    (n odd: one node gets degree k + 1). k >= n - 1 gives the complete graph.
    """
    if k >= n - 1:
        return {(i, j) for i in range(n) for j in range(i + 1, n)}
    edges: set[tuple[int, int]] = set()
    for i in range(n):
        for step in range(1, k // 2 + 1):
            edges.add(_edge(i, (i + step) % n))
    if k % 2:
        half = n // 2
        for i in range(half if n % 2 == 0 else half + 1):
            edges.add(_edge(i, (i + half) % n))
    return edges


def _edge(i: int, j: int) -> tuple[int, int]:
    return (i, j) if i < j else (j, i)
