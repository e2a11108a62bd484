"""Splitting a data set among simulated devices: shards are disjoint and cover every example."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.simulation._partition import partition, partition_dirichlet, partition_iid, partition_sorted
from edge_sdk._errors import ConfigError


def _check_cover(shards: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(shards)
    assert len(joined) == n  # nothing twice ...
    assert np.array_equal(np.sort(joined), np.arange(n))  # ... and nothing left out
    for shard in shards:
        assert shard.dtype == np.int64 and np.all(np.diff(shard) > 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), devices=st.integers(1, 120), seed=st.integers(0, 2**31 - 1))
def test_iid_shards_are_disjoint_cover_everything_and_are_balanced(n: int, devices: int, seed: int) -> None:
    if n < devices:
        with pytest.raises(ConfigError):
            partition_iid(n, devices, seed=seed)
        return
    shards = partition_iid(n, devices, seed=seed)
    assert len(shards) == devices
    _check_cover(shards, n)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=2000),
    devices=st.integers(1, 60),
    alpha=st.floats(0.01, 100.0),
    min_size=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_dirichlet_shards_are_disjoint_and_cover_everything(
    labels: list[int], devices: int, alpha: float, min_size: int, seed: int
) -> None:
    if len(labels) < devices * min_size:
        with pytest.raises(ConfigError):
            partition_dirichlet(labels, devices, alpha=alpha, seed=seed, min_size=min_size)
        return
    shards = partition_dirichlet(labels, devices, alpha=alpha, seed=seed, min_size=min_size)
    assert len(shards) == devices
    _check_cover(shards, len(labels))
    assert min(len(s) for s in shards) >= min_size


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    labels = np.repeat([0, 1], 5000)

    def skew(shards: list[np.ndarray]) -> float:
        """Mean over devices of |share of label 1 - 0.5| (0: balanced, 0.5: one label each)."""
        return float(np.mean([abs(labels[s].mean() - 0.5) for s in shards]))

    skewed = partition(labels, 20, kind="dirichlet", alpha=0.1, seed=1)
    near_iid = partition(labels, 20, kind="dirichlet", alpha=1000.0, seed=1)
    iid = partition(labels, 20, kind="iid", seed=1)
    assert skew(skewed) > 0.3
    assert skew(near_iid) < 0.05
    assert skew(iid) < 0.05
    # the same seed gives the same shards
    again = partition(labels, 20, kind="dirichlet", alpha=0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))


def test_unknown_partition_and_bad_alpha_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown partition"):
        partition([0, 1], 2, kind="pathological")
    with pytest.raises(ConfigError, match="alpha"):
        partition_dirichlet([0, 1], 2, alpha=0.0)


@given(
    n=st.integers(20, 400),
    devices=st.integers(1, 10),
    skew=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    head=st.integers(0, 9),
)
@settings(max_examples=40, deadline=None)
def test_sorted_shards_are_disjoint_equal_and_cover_everything(
    n: int, devices: int, skew: float, seed: int, head: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, 3, n)
    shards = partition_sorted(labels, devices, skew=skew, seed=seed, head=head % devices)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_with_a_head_only_the_first_devices_are_skewed_and_the_rest_share_one_mix() -> None:
    labels = np.array([0, 1] * 1000)
    shards = partition_sorted(labels, 10, skew=1.0, seed=3, head=2)
    assert labels[shards[0]].mean() == 0 and labels[shards[1]].mean() == 0  # the head: the first label
    rest = [labels[s].mean() for s in shards[2:]]
    assert max(rest) - min(rest) < 0.15 and abs(np.mean(rest) - 0.625) < 0.01  # the others: one mix
    with pytest.raises(ConfigError, match="skewed devices"):
        partition_sorted(labels, 10, skew=1.0, head=10)


def test_sorted_skew_puts_the_first_label_on_the_first_devices() -> None:
    labels = np.array([0, 1] * 500)
    iid = partition_sorted(labels, 4, skew=0.0, seed=1)
    skewed = partition_sorted(labels, 4, skew=0.9, seed=1)
    assert abs(labels[iid[0]].mean() - 0.5) < 0.1  # skew 0: IID
    assert labels[skewed[0]].mean() < 0.15 and labels[skewed[-1]].mean() > 0.85
