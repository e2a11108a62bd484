"""Splitting a data set among simulated devices: disjoint shards that together cover every example.

- :func:`partition_iid`: a seeded shuffle cut into shards whose sizes differ by at most one.
- :func:`partition_dirichlet`: label skew. For every label, the examples of that label are shuffled
  and cut in proportions drawn from ``Dirichlet(alpha, ..., alpha)`` over the devices; small
  ``alpha`` gives each device a few dominant labels, large ``alpha`` approaches IID. Every device is
  then given at least ``min_size`` examples, moved from the largest shards, so none is empty.

- :func:`partition_sorted`: label skew by device order. Each example is, with probability
  ``skew``, placed by its label (the examples sorted by label) and otherwise at random; the examples
  are then cut in that order into equal shards. The first devices hold mostly the first label and the
  last devices mostly the last; ``skew = 0`` is IID, ``skew = 1`` gives each device one or two labels.
  A benchmark lists device classes in order so that, say, the devices that can train the full model
  hold data the small devices do not (leaving the small devices out then costs accuracy). With
  ``head = k > 0`` only the first ``k`` devices take their shards from the front of that order; the
  examples left are shuffled and shared evenly by the others, which then hold the same mix of labels
  (the skew sits between the first devices and the rest, not among the rest).

All return one sorted ``int64`` index array per device; the shards are disjoint and their union is
``range(n)`` (tested as a property).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_sdk._errors import ConfigError

__all__ = ["PARTITIONS", "partition", "partition_dirichlet", "partition_iid", "partition_sorted"]

PARTITIONS = ("iid", "dirichlet", "sorted")


def _check(n: int, devices: int, min_size: int) -> None:
    if devices < 1:
        raise ConfigError(f"need at least one device to partition for, got {devices}")
    if n < devices * max(1, min_size):
        raise ConfigError(f"{n} examples cannot give {devices} devices at least {max(1, min_size)} each")


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


def partition_sorted(
    labels: Sequence[int] | np.ndarray, devices: int, *, skew: float, seed: int = 0, head: int = 0
) -> list[np.ndarray]:
    """Label skew by device order (see the module docstring): equal shards, disjoint, covering all.

    ``head``: 0 sorts every device's shard; k > 0 only the first k (the rest hold a shuffled mix).
    """
    y = np.asarray(labels)
    _check(len(y), devices, 1)
    if not 0.0 <= skew <= 1.0:
        raise ConfigError(f"skew must be in [0, 1], got {skew}")
    if not 0 <= head < devices:
        raise ConfigError(f"the skewed devices must number 0 (all) to {devices - 1}, got {head}")
    rng = np.random.default_rng(seed)
    n = len(y)
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]  # sorted by label, random within a label
    key = rng.random(n)  # where an unsorted example goes
    placed = rng.random(n) < skew
    key[by_label[placed[by_label]]] = (np.flatnonzero(placed[by_label]) + 0.5) / n
    order = np.argsort(key, kind="stable")
    shards = np.array_split(order, devices)
    if head:
        rest = rng.permutation(np.concatenate(shards[head:]))
        shards = shards[:head] + np.array_split(rest, devices - head)
    return [np.sort(shard.astype(np.int64)) for shard in shards]


def partition(
    labels: Sequence[int] | np.ndarray,
    devices: int,
    *,
    kind: str = "iid",
    alpha: float = 0.5,
    skew: float = 0.8,
    seed: int = 0,
    min_size: int = 1,
    head: int = 0,
) -> list[np.ndarray]:
    """Shards by name: ``"iid"``, ``"dirichlet"`` (label skew with ``alpha``) or ``"sorted"`` (``skew``,
    ``head``)."""
    if kind == "iid":
        return partition_iid(len(labels), devices, seed=seed)
    if kind == "dirichlet":
        return partition_dirichlet(labels, devices, alpha=alpha, seed=seed, min_size=min_size)
    if kind == "sorted":
        return partition_sorted(labels, devices, skew=skew, seed=seed, head=head)
    raise ConfigError(f"unknown partition {kind!r} (known: {', '.join(PARTITIONS)})")
