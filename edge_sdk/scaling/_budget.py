"""The memory budget a device offers for training a sub-network.

``usable`` is what weights, gradients, optimizer state and activations may occupy together
(``docs/memory.md``); the runtime's own footprint and a safety margin are already taken out:

    ceiling = min(available + runtime, cgroup headroom + runtime)   (the most this process may hold)
    usable  = ceiling - margin - runtime

This is the issue's "min(available, cgroup limit) - margin - runtime footprint" written for the
moment the figures are read: ``available`` is read after the runtime is imported, so it already
excludes the runtime's resident set; adding it back before subtracting it keeps it from being
counted twice. The cgroup headroom is the limit minus the cgroup's current usage (which includes
this process); when the usage cannot be read the limit itself is the cap.

Pools: "system" (CPU training), "unified" (an integrated GPU such as Jetson's, which shares system
RAM: the same figures as "system", never the GPU's free-memory call), and "cuda" (a discrete GPU:
its free memory, and no host runtime footprint since that lives in host RAM).

Sources: "detected"; "override" (``--memory-budget``: the user's figure is ``usable`` as given);
"profile:<name>" (``--profile``: the device class's installed memory x usable fraction stands for
``available``; the runtime footprint measured here is assumed for that device too).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from edge_sdk._errors import ConfigError
from edge_sdk._units import format_bytes

if TYPE_CHECKING:
    from edge_sdk.device._classes import DeviceClass

__all__ = [
    "DEFAULT_MARGIN_FRACTION",
    "DEFAULT_MARGIN_MIN",
    "DEFAULT_MIN_MARGIN_BYTES",
    "MemoryBudget",
    "budget_for_device_class",
    "default_margin",
    "finish_budget",
    "inference_bytes",
    "training_bytes",
]

log = logging.getLogger(__name__)

# Headroom for what the training-memory formula does not count: allocator fragmentation and
# per-thread arenas, the data loader's batches and page cache, temporaries of the optimizer step,
# and other processes growing meanwhile. 10 % of what the process may hold, at least 128 MiB.
DEFAULT_MARGIN_FRACTION = 0.10
DEFAULT_MARGIN_MIN = 128 * 1024**2


@dataclass(frozen=True)
class MemoryBudget:
    """A training-memory budget in bytes and where it comes from."""

    total: int  # memory of the pool (system RAM, or the discrete GPU's memory)
    available: int  # what the pool had free (psutil "available", GPU free memory, or class estimate)
    cgroup_limit: int | None  # tightest cgroup memory limit; None: none set
    runtime_footprint: int  # resident set of the runtime (Python, torch, tokenizer) in this pool
    ceiling: int  # the most this process may hold in all (see the module docstring)
    margin: int  # safety margin taken off
    usable: int  # for weights + gradients + optimizer state + activations
    source: str  # "detected" | "override" | "profile:<name>"
    pool: str  # "system" | "unified" | "cuda"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"{format_bytes(self.usable)} usable ({self.source}, {self.pool} memory)"


def default_margin(ceiling: int) -> int:
    """The default safety margin for a process that may hold ``ceiling`` bytes."""
    return max(DEFAULT_MARGIN_MIN, int(ceiling * DEFAULT_MARGIN_FRACTION))


def finish_budget(
    *,
    total: int,
    available: int,
    cgroup_limit: int | None,
    runtime: int,
    ceiling: int,
    margin: int | None,
    source: str,
    pool: str,
) -> MemoryBudget:
    if margin is not None and margin < 0:
        raise ConfigError(f"the safety margin must not be negative, got {margin}")
    taken = default_margin(ceiling) if margin is None else margin
    usable = ceiling - taken - runtime
    if usable <= 0:
        log.warning(
            "no memory left for training: ceiling %s - margin %s - runtime %s",
            format_bytes(ceiling),
            format_bytes(taken),
            format_bytes(runtime),
        )
    return MemoryBudget(total, available, cgroup_limit, runtime, ceiling, taken, max(0, usable), source, pool)


def budget_for_device_class(
    device_class: DeviceClass, runtime_footprint: int, margin: int | None = None
) -> MemoryBudget:
    """The budget a device of ``device_class`` would offer to a runtime of ``runtime_footprint`` bytes."""
    if runtime_footprint < 0:
        raise ConfigError(f"the runtime footprint must not be negative, got {runtime_footprint}")
    available = device_class.available_bytes
    pool = "unified" if device_class.unified_memory else "system"
    # The class's "available" is measured before this runtime starts: it is already the ceiling.
    return finish_budget(
        total=device_class.memory,
        available=available,
        cgroup_limit=None,
        runtime=runtime_footprint,
        ceiling=available,
        margin=margin,
        source=f"profile:{device_class.name}",
        pool=pool,
    )


# --------------------------------------------- what the coordinator plans from a reported budget
# (edge_sdk.scaling._planning has the rule in full; these two are torch-free so configs can use them.)

# Measured: MiniLM sub-networks at batch 8, sequence 64 peaked 56-107 MiB above the memory model's
# figure without margin; 192 MiB covers that with room.
DEFAULT_MIN_MARGIN_BYTES = 192 << 20


def training_bytes(usable: int, margin: int = 0, min_margin: int = DEFAULT_MIN_MARGIN_BYTES) -> int:
    """What training may be planned to spend of a device's usable budget (may be <= 0: nothing fits)."""
    return usable - max(0, min_margin - max(0, margin))


def inference_bytes(
    usable: int, margin: int = 0, runtime_footprint: int = 0, min_margin: int = DEFAULT_MIN_MARGIN_BYTES
) -> int:
    """What the served model's process may be planned to hold (ONNX Runtime, no torch)."""
    return training_bytes(usable, margin, min_margin) + max(0, runtime_footprint)
