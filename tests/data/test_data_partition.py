"""Partitioners: cover every index once, seeded, min_size honoured, skew as intended."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from fedlpp.data import (
    PARTITIONERS,
    Example,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity_skew,
)

LABELS = [str(i % 4) for i in range(2000)]
EXAMPLES = [Example(prompt=f"s{i}", target="", label=i % 4, group=g) for i, g in enumerate(LABELS)]


def _assert_exact_cover(parts: Sequence[Sequence[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    assert all(list(part) == sorted(part) for part in parts)


def _mean_max_share(parts: Sequence[Sequence[int]], groups: Sequence[str]) -> float:
    """Mean over clients of the share of their most frequent group (1/num_groups = balanced)."""
    shares = [Counter(groups[i] for i in part).most_common(1)[0][1] / len(part) for part in parts]
    return float(np.mean(shares))


@pytest.mark.parametrize("scheme", [p for p in PARTITIONERS if p != "by_key"])  # by_key: fewer values than clients here; own test
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_index_used_once_and_deterministic(scheme: str, seed: int) -> None:
    parts = partition(scheme, EXAMPLES, 10, alpha=0.3, seed=seed)
    assert len(parts) == 10
    _assert_exact_cover(parts, len(EXAMPLES))
    assert partition(scheme, EXAMPLES, 10, alpha=0.3, seed=seed) == parts
    assert partition(scheme, EXAMPLES, 10, alpha=0.3, seed=seed + 10) != parts


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in partition_iid(103, 10, seed=0)]
    assert sorted(sizes) == [10] * 7 + [11] * 3


@pytest.mark.parametrize("seed", range(10))
def test_min_size_is_honoured_under_extreme_skew(seed: int) -> None:
    # alpha 0.01 leaves most clients empty in a raw draw; redraws and top-ups fix it.
    groups = LABELS[:60]
    dirichlet = partition_dirichlet(groups, 12, alpha=0.01, seed=seed, min_size=5)
    quantity = partition_quantity_skew(60, 12, alpha=0.01, seed=seed, min_size=5)
    for parts in (dirichlet, quantity):
        _assert_exact_cover(parts, 60)
        assert min(len(p) for p in parts) >= 5


def test_impossible_min_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"at least 3 examples each from 20 examples \(need 30\)"):
        partition_iid(20, 10, seed=0, min_size=3)
    with pytest.raises(ValueError, match="need 11"):
        partition_dirichlet(["a"] * 10, 11, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_quantity_skew(10, 2, alpha=0.0, seed=0)


def test_small_alpha_gives_more_label_skew_than_iid() -> None:
    iid = np.mean([_mean_max_share(partition_iid(2000, 10, seed=s), LABELS) for s in range(5)])
    skewed = np.mean([_mean_max_share(partition_dirichlet(LABELS, 10, 0.1, seed=s), LABELS) for s in range(5)])
    assert iid < 0.32  # four balanced labels: ~0.25 plus sampling noise
    assert skewed > 0.7
    assert skewed > iid + 0.3


def test_large_alpha_is_close_to_iid() -> None:
    iid = np.mean([_mean_max_share(partition_iid(2000, 10, seed=s), LABELS) for s in range(5)])
    flat = np.mean([_mean_max_share(partition_dirichlet(LABELS, 10, 1000.0, seed=s), LABELS) for s in range(5)])
    assert abs(flat - iid) < 0.03
    sizes = [len(p) for p in partition_dirichlet(LABELS, 10, 1000.0, seed=0)]
    assert max(sizes) - min(sizes) < 40


def test_quantity_skew_makes_unequal_sizes_with_iid_content() -> None:
    parts = partition_quantity_skew(2000, 10, alpha=0.5, seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0]
    assert np.std(sizes) > 50  # iid would have std 0
    big = max(parts, key=len)
    assert _mean_max_share([big], LABELS) < 0.32  # content is still label-balanced


def test_dirichlet_dispatch_uses_the_example_groups() -> None:
    via_dispatch = partition("dirichlet", EXAMPLES, 8, alpha=0.2, seed=4)
    assert via_dispatch == partition_dirichlet(LABELS, 8, 0.2, seed=4)


def test_unknown_scheme_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown partition scheme 'pathological'.*'iid', 'dirichlet', 'quantity_skew'",
    ):
        partition("pathological", EXAMPLES, 4, alpha=1.0, seed=0)


def test_by_key_puts_each_value_on_one_client_and_balances_sizes():
    from fedlpp.data.partition import partition_by_key

    groups = ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 20 + ["e"] * 10
    parts = partition_by_key(groups, 3, seed=0)
    values = [{groups[i] for i in p} for p in parts]
    assert all(not (values[i] & values[j]) for i in range(3) for j in range(i + 1, 3))  # no value on two clients
    assert sorted(len(p) for p in parts) == [40, 40, 50] and sorted(i for p in parts for i in p) == list(range(130))
    assert parts == partition_by_key(groups, 3, seed=0)
    with pytest.raises(ValueError, match="the key has 5 values .* but there are 6 clients"):
        partition_by_key(groups, 6, seed=0)


def test_data_key_picks_any_attribute_of_the_examples():
    from fedlpp.data.e2e import train_example
    from fedlpp.data.partition import with_key

    examples = [train_example(f"name[X{i}], eatType[pub], food[{f}]", "text") for i, f in enumerate(["French", "Thai", "French"])]
    assert [e.group for e in with_key(examples, "food")] == ["French", "Thai", "French"]
    with pytest.raises(ValueError, match="data.key='topic': no example has it; the data's keys are eatType, food, name"):
        with_key(examples, "topic")


def test_config_refuses_a_key_for_partitions_that_ignore_it():
    from fedlpp.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.key: is what a dirichlet or by_key partition splits on"):
        load_config(None, ["data.key=food"])
    assert load_config(None, ["data.partition=by_key", "data.key=food"]).data.key == "food"
