"""Neighbour graph: same graph for every party from the seed, degree as configured."""

import math

import pytest

from fedlpp.secagg import SecAggParams, build_graph, graph_degree

SEED = bytes(range(32))


@pytest.mark.parametrize("n, k", [(10, 4), (10, 5), (11, 5), (31, 8), (50, 17), (7, 3)])
def test_sparse_graph_degree_and_symmetry(n: int, k: int) -> None:
    graph = build_graph(range(n), SEED, SecAggParams(graph="sparse", degree=k))
    degrees = sorted(graph.degree(u) for u in graph.nodes)
    # Harary H(k, n): k-regular unless both k and n are odd, then one node has k + 1.
    assert degrees == ([k] * (n - 1) + [k + 1] if k % 2 and n % 2 else [k] * n)
    for u, vs in graph.neighbours.items():
        assert u not in vs
        assert all(u in graph.neighbours[v] for v in vs)
    assert all(graph.thresholds[u] == math.ceil(0.6 * graph.degree(u)) for u in graph.nodes)


def test_every_party_derives_the_same_graph_from_the_seed() -> None:
    params = SecAggParams(graph="sparse", degree=6)
    ids = [3, 17, 42, 5, 8, 99, 23, 61, 12, 30, 77, 1]
    reference = build_graph(ids, SEED, params)
    assert build_graph(list(reversed(ids)), SEED, params) == reference
    assert build_graph(sorted(ids), bytes(SEED), params) == reference
    assert build_graph(ids, b"\xff" * 32, params) != reference  # the seed matters


def test_default_degree_is_3_log2_n_capped() -> None:
    sparse = SecAggParams(graph="sparse")
    assert graph_degree(sparse, 50) == math.ceil(3 * math.log2(50)) == 17
    assert graph_degree(sparse, 10) == 9  # ceil(9.97) = 10, capped at n - 1: complete
    assert graph_degree(sparse, 1000) == 30
    assert graph_degree(SecAggParams(), 50) == 49


def test_complete_graph_links_everyone() -> None:
    graph = build_graph(range(6), SEED, SecAggParams())
    assert all(graph.neighbours[u] == frozenset(range(6)) - {u} for u in range(6))
    assert graph.thresholds[0] == 3  # ceil(0.6 * 5)
