"""Splitting a data set among simulated devices: disjoint shards that together cover every example.

- :func:`partition_iid`: a seeded shuffle cut into shards whose sizes differ by at most one.
- :func:`partition_dirichlet`: label skew. For every label, the examples of that label are shuffled
  and cut in proportions drawn from ``Dirichlet(alpha, ..., alpha)`` over the devices; small
  ``alpha`` gives each device a few dominant labels, large ``alpha`` approaches IID. Every device is
  then given at least ``min_size`` examples, moved from the largest shards, so none is empty.

Both return one sorted ``int64`` index array per device; the shards are disjoint and their union is
``range(n)`` (tested as a property).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_sdk._errors import ConfigError

__all__ = ["partition", "partition_dirichlet", "partition_iid"]


def _check(n: int, devices: int, min_size: int) -> None:
    if devices < 1:
        raise ConfigError(f"need at least one device to partition for, got {devices}")
    if n < devices * max(1, min_size):
        raise ConfigError(
            f"{n} examples cannot give {devices} devices at least {max(1, min_size)} each"
        )


def partition_iid(n: int, devices: int, *, seed: int = 0) -> list[np.ndarray]:
    """``n`` examples shuffled and cut into ``devices`` shards of (nearly) equal size."""
    _check(n, devices, 1)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, devices)]


def partition_dirichlet(
    labels: Sequence[int] | np.ndarray, devices: int, *, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed shards: each label's examples spread over devices in Dirichlet(alpha) proportions."""
    if not alpha > 0:
        raise ConfigError(f"the Dirichlet alpha must be > 0, got {alpha}")
    y = np.asarray(labels)
    _check(len(y), devices, min_size)
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(devices)]
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for device, part in enumerate(np.split(members, cuts)):
            shards[device].extend(part.tolist())
    # No device may be left (nearly) empty: move examples from the largest shards.
    for device in range(devices):
        while len(shards[device]) < min_size:
            donor = max(range(devices), key=lambda d: len(shards[d]))
            shards[device].append(shards[donor].pop(int(rng.integers(len(shards[donor])))))
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def partition(
    labels: Sequence[int] | np.ndarray,
    devices: int,
    *,
    kind: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Shards by name: ``"iid"`` or ``"dirichlet"`` (label skew with ``alpha``)."""
    if kind == "iid":
        return partition_iid(len(labels), devices, seed=seed)
    if kind == "dirichlet":
        return partition_dirichlet(labels, devices, alpha=alpha, seed=seed, min_size=min_size)
    raise ConfigError(f"unknown partition {kind!r} (known: 'iid', 'dirichlet')")
