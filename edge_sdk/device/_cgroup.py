"""The memory limit and headroom of this process's cgroup, when one is set.

The process's cgroup comes from ``/proc/self/cgroup``; every level from it up to the hierarchy's root
is read, because a limit on an ancestor binds too:

* cgroup v2: ``/sys/fs/cgroup/<path>/memory.max`` ("max" = no limit), usage ``memory.current``,
  reclaimable cache ``inactive_file`` in ``memory.stat``;
* cgroup v1: ``/sys/fs/cgroup/memory/<path>/memory.limit_in_bytes`` (a value near 2^63 = no limit),
  usage ``memory.usage_in_bytes``, ``total_inactive_file`` in ``memory.stat``.

In a container with its own cgroup namespace the process's path does not exist under the mount and
the mount's root is the container's cgroup: that level is always read.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["read_cgroup_memory"]

log = logging.getLogger(__name__)

# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712).
_NO_LIMIT_FROM = 1 << 60


def _read_int(path: Path) -> int | None:
    """The integer in ``path``; None for "max", a missing or unreadable file, or a no-limit value."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        log.debug("unexpected content in %s: %r", path, text[:40])
        return None
    return None if value >= _NO_LIMIT_FROM else value


def _inactive_file(stat_path: Path, keys: tuple[str, ...]) -> int:
    try:
        lines = stat_path.read_text().splitlines()
    except OSError:
        return 0
    stats = dict(line.split(maxsplit=1) for line in lines if " " in line)
    for key in keys:
        if key in stats and stats[key].strip().isdigit():
            return int(stats[key])
    return 0


def _cgroup_paths(root: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory-controller path) of this process, from ``/proc/self/cgroup``."""
    v2 = v1 = None
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _levels(base: Path, own: str | None) -> list[Path]:
    """The cgroup directories from this process's own up to the mount's root (those that exist)."""
    dirs: list[Path] = []
    if own:
        rel = Path(own.lstrip("/"))
        while rel != Path("."):
            if (base / rel).is_dir():
                dirs.append(base / rel)
            rel = rel.parent
    dirs.append(base)
    return dirs


def read_cgroup_memory(root: Path | str = "/") -> tuple[int | None, int | None]:
    """(tightest memory limit, headroom at that level) in bytes, each None when unknown or unlimited.

    Looks at cgroup v2 (``memory.max``, ``memory.current``) and v1 (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``) at every level from this process's cgroup up to the root.
    Headroom = limit - usage + inactive page cache (reclaimable), floored at 0.
    """
    root = Path(root)
    v2_path, v1_path = _cgroup_paths(root)
    layouts = (
        (root / "sys/fs/cgroup", v2_path, "memory.max", "memory.current", ("inactive_file",)),
        (
            root / "sys/fs/cgroup/memory",
            v1_path,
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            ("total_inactive_file", "inactive_file"),
        ),
    )
    best: tuple[int, int | None] | None = None  # (limit, headroom)
    for base, own, limit_file, usage_file, inactive_keys in layouts:
        if not base.is_dir():
            continue
        for level in _levels(base, own):
            limit = _read_int(level / limit_file)
            if limit is None:
                continue
            usage = _read_int(level / usage_file)
            headroom = None
            if usage is not None:
                headroom = max(0, limit - usage + _inactive_file(level / "memory.stat", inactive_keys))
            tighter = headroom if headroom is not None else limit
            if best is None or tighter < (best[1] if best[1] is not None else best[0]):
                best = (limit, headroom)
    if best is None:
        return None, None
    return best
