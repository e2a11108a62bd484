"""Named device classes: one TOML file per class in ``profiles/`` (schema in ``profiles/README.md``).

A :class:`DeviceClass` holds the figures a simulation needs for a kind of device (installed memory,
the fraction of it a training process can expect, cores, a compute estimate, uplink, accelerator)
and the sources they come from. ``--profile NAME`` uses one instead of detecting the device.

Where the files are found (:func:`profiles_dir`, first match wins):

1. ``$EDGE_FM_PROFILES``, when set (a directory of ``*.toml`` files);
2. package data: ``importlib.resources.files("edge_sdk") / "profiles"`` (a wheel that ships them
   inside the package);
3. a source checkout: ``<repo>/profiles`` beside the ``edge_sdk`` package;
4. the data directory of an installed wheel: ``<prefix>/share/edge-fm/profiles`` for ``sys.prefix``,
   the interpreter's ``data`` path and the user base (pyproject's ``[tool.setuptools.data-files]``).

Validation reads the whole file and reports every problem in it together (:class:`ProfileError`).
"""

from __future__ import annotations

import logging
import os
import site
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edge_sdk._errors import ConfigError, ProfileError
from edge_sdk._units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = [
    "SCHEMA_VERSION",
    "DeviceClass",
    "list_device_classes",
    "load_device_class",
    "parse_device_class",
    "profiles_dir",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENV_VAR = "EDGE_FM_PROFILES"
ACCELERATORS = ("none", "cuda")
PROCESSORS = ("cpu", "gpu")

# section -> key -> (python type, required)
_SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "": {
        "schema_version": (int, True),
        "name": (str, True),
        "display_name": (str, True),
        "sources": (list, True),
        "notes": (str, False),
    },
    "memory": {
        "installed": (str, True),
        "usable_fraction": (float, True),
        "usable_fraction_basis": (str, True),
    },
    "cpu": {"model": (str, True), "cores": (int, True), "max_mhz": (int, True)},
    "compute": {"fp32_gflops": (float, True), "processor": (str, True), "basis": (str, True)},
    "network": {"link": (str, True), "uplink_mbps": (float, True), "uplink_basis": (str, True)},
    "accelerator": {"kind": (str, True), "name": (str, False), "unified_memory": (bool, True)},
}
_SECTIONS = ("", "memory", "cpu", "compute", "network", "accelerator")


@dataclass(frozen=True)
class DeviceClass:
    """The figures of one device class; memory in bytes, clocks in MHz, bandwidth in Mbit/s."""

    name: str
    display_name: str
    memory: int  # installed RAM, bytes
    usable_fraction: float  # of `memory`, expected as available to a fresh process on an idle device
    usable_fraction_basis: str
    cpu_model: str
    cpu_cores: int
    cpu_max_mhz: int
    compute_gflops: float  # float32 estimate on `compute_processor`
    compute_processor: str  # "cpu" | "gpu"
    compute_basis: str
    network_link: str
    uplink_mbps: float
    uplink_basis: str
    accelerator: str  # "none" | "cuda"
    accelerator_name: str | None
    unified_memory: bool  # the accelerator shares `memory` with the CPU
    sources: tuple[str, ...]
    notes: str | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def available_bytes(self) -> int:
        """What ``psutil``'s "available" is expected to read on this class: memory x usable_fraction."""
        return int(self.memory * self.usable_fraction)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "memory": self.memory,
            "usable_fraction": self.usable_fraction,
            "available_bytes": self.available_bytes,
            "cpu_model": self.cpu_model,
            "cpu_cores": self.cpu_cores,
            "cpu_max_mhz": self.cpu_max_mhz,
            "compute_gflops": self.compute_gflops,
            "compute_processor": self.compute_processor,
            "uplink_mbps": self.uplink_mbps,
            "accelerator": self.accelerator,
            "accelerator_name": self.accelerator_name,
            "unified_memory": self.unified_memory,
            "sources": list(self.sources),
        }


def _typed(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _read_sections(data: Mapping[str, Any], problems: list[str]) -> dict[str, dict[str, Any]]:
    """Check keys and types against _SCHEMA; return the values that passed, by section."""
    out: dict[str, dict[str, Any]] = {section: {} for section in _SCHEMA}
    for key, value in data.items():
        if key in _SCHEMA and key != "":
            if not isinstance(value, Mapping):
                problems.append(f"[{key}] must be a table")
        elif key not in _SCHEMA[""]:
            problems.append(f"unknown key {key!r}")
    for section, keys in _SCHEMA.items():
        table = data if section == "" else data.get(section, {})
        where = f"[{section}] " if section else ""
        if not isinstance(table, Mapping):
            continue
        if section and section not in data:
            problems.append(f"missing table [{section}]")
            continue
        for key in table if section else ():
            if key not in keys:
                problems.append(f"{where}unknown key {key!r}")
        for key, (tp, required) in keys.items():
            if key not in table:
                if required:
                    problems.append(f"{where}missing key {key!r}")
                continue
            value = table[key]
            if not _typed(value, tp):
                problems.append(f"{where}{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
                continue
            out[section][key] = float(value) if tp is float else value
    return out


def _check_values(s: dict[str, dict[str, Any]], stem: str | None, problems: list[str]) -> int | None:
    """Range and consistency checks on the typed values; returns the parsed memory size."""
    top, mem, cpu, comp, net, acc = (s[k] for k in _SECTIONS)
    if "schema_version" in top and top["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {top['schema_version']} is not supported (expected {SCHEMA_VERSION})")
    if "name" in top and stem is not None and top["name"] != stem:
        problems.append(f"name {top['name']!r} differs from the file name {stem + '.toml'!r}")
    if "sources" in top:
        sources = top["sources"]
        if not sources:
            problems.append("sources is empty: cite the vendor document (name and URL) for every figure")
        for i, src in enumerate(sources):
            if not isinstance(src, str) or not src.strip():
                problems.append(f"sources[{i}] must be a non-empty string")
            elif "http://" not in src and "https://" not in src:
                problems.append(f"sources[{i}] names no URL: {src[:60]!r}")
    for where, table, key in (
        ("[memory] ", mem, "usable_fraction_basis"),
        ("[compute] ", comp, "basis"),
        ("[network] ", net, "uplink_basis"),
        ("", top, "display_name"),
    ):
        if key in table and not table[key].strip():
            problems.append(f"{where}{key} is empty")
    memory = None
    if "installed" in mem:
        try:
            memory = parse_size(mem["installed"])
        except ConfigError as exc:
            problems.append(f"[memory] installed: {exc}")
        else:
            if memory <= 0:
                problems.append("[memory] installed must be positive")
    if "usable_fraction" in mem and not 0 < mem["usable_fraction"] <= 1:
        problems.append(f"[memory] usable_fraction must be in (0, 1], got {mem['usable_fraction']}")
    for where, table, key in (
        ("[cpu] ", cpu, "cores"),
        ("[cpu] ", cpu, "max_mhz"),
        ("[compute] ", comp, "fp32_gflops"),
        ("[network] ", net, "uplink_mbps"),
    ):
        if key in table and not table[key] > 0:
            problems.append(f"{where}{key} must be positive, got {table[key]}")
    if "processor" in comp and comp["processor"] not in PROCESSORS:
        problems.append(f"[compute] processor must be one of {PROCESSORS}, got {comp['processor']!r}")
    kind = acc.get("kind")
    if kind is not None and kind not in ACCELERATORS:
        problems.append(f"[accelerator] kind must be one of {ACCELERATORS}, got {kind!r}")
    if kind == "cuda" and not acc.get("name"):
        problems.append("[accelerator] name is required when kind is 'cuda'")
    if kind == "none" and acc.get("unified_memory"):
        problems.append("[accelerator] unified_memory is true but kind is 'none'")
    if comp.get("processor") == "gpu" and kind == "none":
        problems.append("[compute] processor is 'gpu' but [accelerator] kind is 'none'")
    return memory


def parse_device_class(data: Mapping[str, Any], *, stem: str | None = None, path: Path | None = None) -> DeviceClass:
    """Build a :class:`DeviceClass` from parsed TOML; raise :class:`ProfileError` listing every problem."""
    problems: list[str] = []
    sections = _read_sections(data, problems)
    memory = _check_values(sections, stem, problems)
    label = str(path) if path is not None else (stem or "device class")
    if problems or memory is None:
        raise ProfileError(f"invalid device class {label}", tuple(problems))
    top, mem, cpu, comp, net, acc = (sections[k] for k in _SECTIONS)
    return DeviceClass(
        name=top["name"],
        display_name=top["display_name"],
        memory=memory,
        usable_fraction=mem["usable_fraction"],
        usable_fraction_basis=mem["usable_fraction_basis"],
        cpu_model=cpu["model"],
        cpu_cores=cpu["cores"],
        cpu_max_mhz=cpu["max_mhz"],
        compute_gflops=comp["fp32_gflops"],
        compute_processor=comp["processor"],
        compute_basis=comp["basis"],
        network_link=net["link"],
        uplink_mbps=net["uplink_mbps"],
        uplink_basis=net["uplink_basis"],
        accelerator=acc["kind"],
        accelerator_name=acc.get("name"),
        unified_memory=acc["unified_memory"],
        sources=tuple(top["sources"]),
        notes=top.get("notes"),
        path=path,
    )


def _load_file(path: Path) -> DeviceClass:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"invalid device class {path}", (f"not valid TOML: {exc}",)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read device class {path}", (str(exc),)) from exc
    return parse_device_class(data, stem=path.stem, path=path)


def _candidates() -> list[Path]:
    found: list[Path] = []
    try:
        packaged = resources.files("edge_sdk") / "profiles"
        if isinstance(packaged, Path):
            found.append(packaged)
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - not importable as a package
        pass
    found.append(Path(__file__).resolve().parents[2] / "profiles")  # a source checkout
    prefixes = [sys.prefix, sysconfig.get_path("data"), site.USER_BASE or ""]
    found.extend(Path(p) / "share" / "edge-fm" / "profiles" for p in prefixes if p)
    return found


def profiles_dir() -> Path:
    """The directory of device-class files (see the module docstring for the lookup order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise ConfigError(f"${ENV_VAR} is {env!r}, which is not a directory")
        return path
    tried = _candidates()
    for path in tried:
        if path.is_dir() and any(path.glob("*.toml")):
            return path
    raise ConfigError("no device-class directory found; looked in: " + ", ".join(str(p) for p in tried))


def list_device_classes(directory: Path | str | None = None) -> tuple[DeviceClass, ...]:
    """Every device class in ``directory`` (default :func:`profiles_dir`), sorted by name.

    Raises :class:`ProfileError` with the problems of every invalid file, each prefixed by its name.
    """
    folder = Path(directory) if directory is not None else profiles_dir()
    classes: list[DeviceClass] = []
    problems: list[str] = []
    for path in sorted(folder.glob("*.toml")):
        try:
            classes.append(_load_file(path))
        except ProfileError as exc:
            problems.extend(f"{path.name}: {p}" for p in exc.problems)
    if problems:
        raise ProfileError(f"invalid device classes in {folder}", tuple(problems))
    return tuple(sorted(classes, key=lambda c: c.name))


def load_device_class(name_or_path: str | Path, directory: Path | str | None = None) -> DeviceClass:
    """A device class by name (``"raspberry-pi-4-4gb"``) or by the path of a ``.toml`` file."""
    text = str(name_or_path)
    as_path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or text.endswith(".toml") or os.sep in text:
        if not as_path.is_file():
            raise ConfigError(f"device-class file {text!r} does not exist")
        return _load_file(as_path)
    folder = Path(directory) if directory is not None else profiles_dir()
    path = folder / f"{text}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml"))
        raise ConfigError(f"unknown device class {text!r}; known: {', '.join(known) or 'none'} (in {folder})")
    return _load_file(path)
