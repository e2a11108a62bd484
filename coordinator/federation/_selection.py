"""Who takes part in a round: how many devices to wait for, how many to take, and which.

A round is sent to ``max(min_devices, ceil(fraction x expected))`` devices, capped at those idle;
``expected`` counts the devices named at start (or seen since) that have not been seen to
disconnect. Which ones is a draw seeded by the run's seed and the round's index, so a run replays.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence

from coordinator.federation._registry import DeviceRegistry
from coordinator.federation._tables import FederationConfig

__all__ = ["Selection"]


class Selection:
    """A run's rule for a round's devices (reads the registry; holds no state of its own)."""

    def __init__(self, federation: FederationConfig, registry: DeviceRegistry, seed: int = 0) -> None:
        self.federation = federation
        self.registry = registry
        self.seed = seed

    def wait_target(self) -> int:
        """How many idle devices to wait for (bounded by ``device_wait_s``) before starting a round."""
        expected = len(self.registry.expected())
        return max(self.federation.min_devices, math.ceil(self.federation.fraction * expected))

    def round_size(self, available: int) -> int:
        """How many of ``available`` idle devices a round takes."""
        expected = max(len(self.registry.expected()), available)
        want = max(self.federation.min_devices, math.ceil(self.federation.fraction * expected))
        return min(want, available)

    def can_start(self, available: int) -> bool:
        """Whether a round may start with ``available`` idle devices (at least ``min_devices``)."""
        return available >= self.federation.min_devices and available > 0

    def select(self, available: Sequence[str], round_index: int) -> list[str]:
        """The devices of round ``round_index``: a seeded draw of :meth:`round_size` among ``available``."""
        pool = sorted(set(available))
        k = self.round_size(len(pool))
        rng = random.Random(zlib.crc32(f"{self.seed}/select/{round_index}".encode()))
        return sorted(rng.sample(pool, k))
