"""The memory budget this device offers for training: detected, overridden, or a device class's.

The arithmetic (``usable = ceiling - margin - runtime``) lives in :mod:`edge_sdk.scaling`; this
module reads the figures of a detected :class:`DeviceProfile`: ``ceiling = min(available + runtime,
cgroup headroom + runtime)``, ``available`` read after the runtime is imported (so it already
excludes the runtime's resident set; adding it back before subtracting it keeps it from being
counted twice). On a discrete GPU the pool is its free memory and the runtime lives in host RAM.
"""

from __future__ import annotations

import logging

from edge_sdk._errors import ConfigError
from edge_sdk._units import format_bytes, parse_size
from edge_sdk.device._classes import DeviceClass, load_device_class
from edge_sdk.device._profile import DeviceProfile
from edge_sdk.scaling._budget import MemoryBudget, budget_for_device_class, finish_budget

__all__ = ["compute_budget"]

log = logging.getLogger(__name__)


def _detected(profile: DeviceProfile, margin: int | None) -> MemoryBudget:
    acc = profile.accelerator
    if acc is not None and not acc.unified_memory and acc.free_memory is not None:
        total = acc.total_memory if acc.total_memory is not None else acc.free_memory
        return finish_budget(
            total=total,
            available=acc.free_memory,
            cgroup_limit=None,
            runtime=0,
            ceiling=acc.free_memory,
            margin=margin,
            source="detected",
            pool="cuda",
        )
    runtime = profile.runtime_rss
    ceiling = profile.memory_available + runtime
    if profile.cgroup_available is not None:
        ceiling = min(ceiling, profile.cgroup_available + runtime)
    elif profile.cgroup_limit is not None:
        ceiling = min(ceiling, profile.cgroup_limit)
    pool = "unified" if acc is not None and acc.unified_memory else "system"
    return finish_budget(
        total=profile.memory_total,
        available=profile.memory_available,
        cgroup_limit=profile.cgroup_limit,
        runtime=runtime,
        ceiling=ceiling,
        margin=margin,
        source="detected",
        pool=pool,
    )


def compute_budget(
    profile: DeviceProfile,
    override: int | str | None = None,
    named_profile: DeviceClass | str | None = None,
    margin: int | None = None,
) -> MemoryBudget:
    """The training budget of ``profile``'s device, or of a named device class, or the user's figure.

    ``override`` (bytes, or a size such as ``"1.5GB"``) is the usable budget as given;
    ``named_profile`` (a :class:`DeviceClass` or its name) replaces detection; give at most one.
    ``margin`` (bytes) replaces :func:`default_margin`.
    """
    if override is not None and named_profile is not None:
        raise ConfigError("give a memory budget or a device profile, not both")
    if named_profile is not None:
        device_class = load_device_class(named_profile) if isinstance(named_profile, str) else named_profile
        return budget_for_device_class(device_class, profile.runtime_rss, margin)
    detected = _detected(profile, margin)
    if override is None:
        return detected
    usable = parse_size(override) if isinstance(override, str) else override
    if isinstance(usable, bool) or not isinstance(usable, int) or usable <= 0:
        raise ConfigError(f"the memory budget must be a positive size, got {override!r}")
    if usable > detected.usable:
        log.warning(
            "memory budget %s exceeds the %s this device appears to offer",
            format_bytes(usable),
            format_bytes(detected.usable),
        )
    return MemoryBudget(
        detected.total,
        detected.available,
        detected.cgroup_limit,
        detected.runtime_footprint,
        detected.ceiling,
        0,
        usable,
        "override",
        detected.pool,
    )
