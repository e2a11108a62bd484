"""The runtime's footprint, remembered: a second profile reads it instead of importing the runtime,
and takes what the imports would have grown off the memory available; a changed installation (or
a GPU) measures again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_sdk.device import _profile
from edge_sdk.device._footprint import Footprint, load_footprint, save_footprint
from edge_sdk.device._profile import detect_profile

from .test_profile import FakePsutil, GiB, MiB, fake_root

MODULES = ("json", "csv")


class Imports:
    """Stands for the runtime's imports: counts them; the process grows by ``grows`` bytes when they run."""

    def __init__(self, system: FakePsutil, grows: int) -> None:
        self.system, self.grows, self.calls = system, grows, 0

    def __call__(self, modules: Any) -> tuple[str, ...]:
        self.calls += 1
        self.system._rss += self.grows
        self.system._memory.available -= self.grows
        return tuple(modules)


def _profile_with(root: Path, cache: Path, system: FakePsutil, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(_profile, "_import_torch", lambda: None)  # no torch: nothing to ask a GPU
    return detect_profile(root=root, system=system, runtime_modules=MODULES, probe=False, footprint_cache=cache)


def test_a_second_profile_reads_the_footprint_instead_of_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, cache = fake_root(tmp_path / "root", {}), tmp_path / "cache"
    system = FakePsutil(available=6 * GiB, rss=50 * MiB)
    imports = Imports(system, grows=400 * MiB)
    monkeypatch.setattr(_profile, "_import_runtime", imports)

    first = _profile_with(root, cache, system, monkeypatch)
    assert imports.calls == 1 and first.runtime_rss == 450 * MiB
    assert first.memory_available == 6 * GiB - 400 * MiB

    fresh = FakePsutil(available=6 * GiB, rss=50 * MiB)  # a new process: nothing imported yet
    imports.system = fresh
    second = _profile_with(root, cache, fresh, monkeypatch)
    assert imports.calls == 1  # not imported again
    assert second.runtime_rss == first.runtime_rss and second.runtime_modules == first.runtime_modules
    assert second.memory_available == first.memory_available  # what the imports would have taken is taken


def test_another_installation_or_a_gpu_measures_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    save_footprint(MODULES, Footprint(400 * MiB, 50 * MiB, MODULES, "2.0"), cache)
    assert load_footprint(MODULES, cache) is not None
    assert load_footprint(("json",), cache) is None  # other modules: another key
    monkeypatch.setattr("edge_sdk.device._footprint.__version__", "9.9")
    assert load_footprint(MODULES, cache) is None  # another version of edge-fm
    monkeypatch.undo()

    root = fake_root(tmp_path / "root", {"proc/driver/nvidia/version": "NVRM version: 550"})
    system = FakePsutil(rss=50 * MiB)
    imports = Imports(system, grows=10 * MiB)
    monkeypatch.setattr(_profile, "_import_runtime", imports)
    _profile_with(root, cache, system, monkeypatch)
    assert imports.calls == 1  # a GPU may be there: the runtime is imported to ask it


def test_a_broken_cache_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "runtime-footprint.json").write_text("{not json")
    assert load_footprint(MODULES, tmp_path) is None
