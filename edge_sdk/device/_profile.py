"""What this device is: memory, cgroup limit, CPU, sensors, accelerator, runtime footprint, speed.

:func:`detect_profile` reads the device into a :class:`DeviceProfile`, a frozen, versioned record
that the websocket handshake sends (``to_dict()``) and the coordinator reads back
(``from_dict()``, strict: every problem in a received profile is reported at once).

Every sensor is optional: a platform without temperatures, battery, CPU frequency, cgroup files,
device tree or torch gives ``None`` (or an empty tuple) for that field, never an error. The
boundaries are injectable so tests can fake any device: ``root`` (where ``/sys``, ``/proc`` and
``/etc`` are read), ``system`` (a psutil-like module) and ``torch_module`` (a torch-like module, or
``None`` for "torch is not installed").

Where the facts come from:

* memory: ``psutil.virtual_memory()`` (total, available), read after the runtime is imported;
* cgroup: :func:`edge_sdk.device._cgroup.read_cgroup_memory` (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``, from this process's cgroup up to the root; the tightest level wins);
* Jetson: ``/etc/nv_tegra_release`` or "jetson" in ``/proc/device-tree/model``. An integrated GPU
  (Jetson, or torch's ``is_integrated``) shares system RAM, so the GPU's free-memory call is not used:
  the budget comes from available system memory;
* runtime footprint: this process's resident set after importing ``runtime_modules``;
* compute: :mod:`edge_sdk.device._probe` (torch when importable, else numpy).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import platform
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from edge_sdk._errors import ProfileError
from edge_sdk.device._cgroup import read_cgroup_memory
from edge_sdk.device._footprint import Footprint, load_footprint, save_footprint
from edge_sdk.device._probe import ComputeProbe, measure_matmul, measure_step
from edge_sdk.scaling.families import modeling_modules

__all__ = [
    "DEFAULT_RUNTIME_MODULES",
    "PROFILE_VERSION",
    "Accelerator",
    "Battery",
    "DeviceProfile",
    "Temperature",
    "detect_profile",
]

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
# What a training process has imported before the model arrives: its resident set is the runtime's
# footprint. The families' modeling code is part of it (from the family registry).
DEFAULT_RUNTIME_MODULES: tuple[str, ...] = (
    "torch",
    "transformers",
    "tokenizers",
    *modeling_modules(),
    "edge_sdk.scaling._build",
    "edge_sdk.training._train",
)

_AUTO: Any = object()  # "import torch if it imports"


def _range(minimum: float | None = None, maximum: float | None = None) -> dict[str, Any]:
    return {"min": minimum, "max": maximum}


@dataclass(frozen=True)
class Temperature:
    sensor: str  # psutil's "<chip>/<label>", e.g. "cpu_thermal/0"
    celsius: float


@dataclass(frozen=True)
class Battery:
    percent: float = field(metadata=_range(0, 100))
    plugged: bool | None
    seconds_left: int | None = field(metadata=_range(0))


@dataclass(frozen=True)
class Accelerator:
    kind: str = field(metadata={"choices": ("cuda",)})
    name: str
    total_memory: int | None = field(metadata=_range(0))  # bytes; on unified memory = system RAM
    free_memory: int | None = field(metadata=_range(0))  # bytes; None on unified memory (not asked)
    unified_memory: bool  # shares system RAM (Jetson and other integrated GPUs)


@dataclass(frozen=True)
class DeviceProfile:
    """A device as detected; every figure in bytes, MHz, degrees Celsius or seconds."""

    version: int = field(metadata={"choices": (PROFILE_VERSION,)})
    system: str  # platform.system(), e.g. "Linux"
    machine: str  # platform.machine(), e.g. "aarch64"
    device_model: str | None  # /proc/device-tree/model, e.g. "Raspberry Pi 4 Model B Rev 1.4"
    is_jetson: bool
    python_version: str
    torch_version: str | None  # None: torch is not importable (no training, no CUDA)
    memory_total: int = field(metadata=_range(1))
    memory_available: int = field(metadata=_range(0))  # psutil "available", after the runtime loaded
    cgroup_limit: int | None = field(metadata=_range(0))  # tightest memory limit; None: no limit
    cgroup_available: int | None = field(metadata=_range(0))  # that level's limit minus its usage
    runtime_rss: int = field(metadata=_range(0))  # this process's resident set after the imports
    runtime_modules: tuple[str, ...]  # the modules imported before runtime_rss was read
    cpu_logical_cores: int = field(metadata=_range(1))
    cpu_physical_cores: int | None = field(metadata=_range(1))
    cpu_freq_mhz: float | None = field(metadata=_range(0))
    cpu_freq_max_mhz: float | None = field(metadata=_range(0))
    temperatures: tuple[Temperature, ...]
    battery: Battery | None
    accelerator: Accelerator | None
    compute: ComputeProbe | None

    @property
    def training_device(self) -> str:
        """Where training runs: "cuda" when torch sees a CUDA device, else "cpu"."""
        return "cuda" if self.accelerator is not None else "cpu"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (nested dicts, lists, str, int, float, bool, None)."""
        result = _to_json(self)
        assert isinstance(result, dict)
        return result

    @classmethod
    def from_dict(cls, data: Any) -> DeviceProfile:
        """Rebuild a profile from ``to_dict()`` output; raise :class:`ProfileError` listing every problem."""
        problems: list[str] = []
        profile = _from_json(cls, data, "profile", problems)
        if problems:
            raise ProfileError("invalid device profile", tuple(problems))
        assert isinstance(profile, cls)
        return profile


# --- JSON (de)serialisation, strict, driven by the dataclasses' type hints -------------------------


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # only ``X | None`` is used
        if value is None:
            return None
        (inner,) = (a for a in get_args(tp) if a is not type(None))
        return _from_json(inner, value, where, problems)
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return None
        item_tp = get_args(tp)[0]
        return tuple(_from_json(item_tp, v, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_json(tp, value, where, problems)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:  # pragma: no cover - a field type this function was not written for
        raise TypeError(f"unsupported field type {tp!r}")
    if not ok:
        problems.append(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return None
    if tp is float:
        if not math.isfinite(value):
            problems.append(f"{where}: must be a finite number, got {value!r}")
            return None
        return float(value)
    return value


def _dataclass_from_json(cls: Any, data: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(data, Mapping):
        problems.append(f"{where}: expected an object, got {type(data).__name__}")
        return None
    before = len(problems)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{where}.{key}: unknown field")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            problems.append(f"{where}.{name}: missing")
            continue
        n_problems = len(problems)
        value = _from_json(hints[name], data[name], f"{where}.{name}", problems)
        if len(problems) == n_problems and value is not None:
            _check_metadata(f.metadata, value, f"{where}.{name}", problems)
        values[name] = value
    if len(problems) > before:
        return None
    return cls(**values)


def _check_metadata(meta: Mapping[str, Any], value: Any, where: str, problems: list[str]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        problems.append(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        problems.append(f"{where}: {value!r} is below {low}")
    if high is not None and value > high:
        problems.append(f"{where}: {value!r} is above {high}")


# --- sensors (psutil-like), each optional ----------------------------------------------------------


def _call(system: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """``system.name(*args)``, or None when the platform lacks it or it fails."""
    fn = getattr(system, name, None)
    if fn is None:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # psutil raises NotImplementedError, OSError, ... on some platforms
        log.debug("%s() unavailable: %s", name, exc)
        return None


def _positive_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _temperatures(system: Any) -> tuple[Temperature, ...]:
    readings = _call(system, "sensors_temperatures")
    if not isinstance(readings, Mapping):
        return ()
    result = []
    for chip, entries in readings.items():
        for i, entry in enumerate(entries or ()):
            celsius = getattr(entry, "current", None)
            if isinstance(celsius, (int, float)) and math.isfinite(celsius):
                label = getattr(entry, "label", "") or str(i)
                result.append(Temperature(f"{chip}/{label}", float(celsius)))
    return tuple(result)


def _battery(system: Any) -> Battery | None:
    state = _call(system, "sensors_battery")
    percent = getattr(state, "percent", None)
    if state is None or not isinstance(percent, (int, float)) or not math.isfinite(percent):
        return None
    plugged = getattr(state, "power_plugged", None)
    secs = getattr(state, "secsleft", None)  # psutil: -1 unknown, -2 unlimited
    return Battery(
        percent=float(min(100.0, max(0.0, percent))),
        plugged=plugged if isinstance(plugged, bool) else None,
        seconds_left=int(secs) if isinstance(secs, (int, float)) and 0 <= secs < 10**9 else None,
    )


def _process_rss(system: Any) -> int:
    process = _call(system, "Process")
    info = _call(process, "memory_info") if process is not None else None
    rss = getattr(info, "rss", None)
    return int(rss) if isinstance(rss, int) and rss >= 0 else 0


# --- device identity, torch, CUDA --------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None
    return text or None


def _import_torch() -> Any | None:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken wheel (missing CUDA/OpenBLAS library)
        log.debug("torch unavailable: %s", exc)
        return None
    return torch


def _accelerator(torch: Any, is_jetson: bool) -> Accelerator | None:
    """The first CUDA device torch sees, or None. Never asks an integrated GPU for free memory."""
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not _call(cuda, "is_available"):
        return None
    props = _call(cuda, "get_device_properties", 0)
    if props is None:
        return None
    total = getattr(props, "total_memory", None)
    unified = is_jetson or bool(getattr(props, "is_integrated", False))
    free = None
    if not unified:
        free_total = _call(cuda, "mem_get_info", 0)
        if isinstance(free_total, tuple) and free_total and isinstance(free_total[0], int):
            free = free_total[0]
    return Accelerator(
        kind="cuda",
        name=str(getattr(props, "name", "CUDA device")),
        total_memory=total if isinstance(total, int) and total >= 0 else None,
        free_memory=free,
        unified_memory=unified,
    )


def _import_runtime(modules: Sequence[str]) -> tuple[str, ...]:
    imported = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional part of the runtime: absent is fine
            log.debug("runtime module %s not imported: %s", name, exc)
            continue
        imported.append(name)
    return tuple(imported)


def _is_jetson(root: Path, device_model: str | None) -> bool:
    return (root / "etc/nv_tegra_release").exists() or (device_model is not None and "jetson" in device_model.lower())


def _cpu(system: Any) -> dict[str, Any]:
    """The profile's CPU fields: logical cores (at least 1), physical cores and clocks when known."""
    logical = _call(system, "cpu_count", logical=True)
    physical = _call(system, "cpu_count", logical=False)
    freq = _call(system, "cpu_freq")
    return {
        "cpu_logical_cores": logical if isinstance(logical, int) and logical >= 1 else 1,
        "cpu_physical_cores": physical if isinstance(physical, int) and physical >= 1 else None,
        "cpu_freq_mhz": _positive_float(getattr(freq, "current", None)),
        "cpu_freq_max_mhz": _positive_float(getattr(freq, "max", None)),
    }


def _memory(system: Any) -> tuple[int, int]:
    """(total, available) bytes of RAM from psutil's ``virtual_memory()``; a clear error without them."""
    memory = _call(system, "virtual_memory")
    total = getattr(memory, "total", None)
    if not isinstance(total, int) or total <= 0:
        raise ProfileError("cannot read this device's memory", ("virtual_memory() gave no total",))
    available = getattr(memory, "available", getattr(memory, "free", None))
    if not isinstance(available, int) or available < 0:
        raise ProfileError("cannot read this device's memory", ("virtual_memory() gave no available",))
    return total, available


def _probe_compute(torch: Any, accelerator: Accelerator | None, seconds: float, *, step: bool) -> ComputeProbe | None:
    """The matmul probe (with torch on its device, else numpy), plus a training step's time if ``step``.

    A probe is informative only: a failure is logged and gives None, never a failed profile.
    """
    device = "cuda" if accelerator is not None else "cpu"
    try:
        compute = measure_matmul(seconds, device=device, backend=None if torch is not None else "numpy")
        if compute is not None and step and torch is not None:
            compute = dataclasses.replace(compute, step_seconds=measure_step(device))
    except Exception as exc:
        log.warning("compute probe failed on %s: %s", device, exc)
        return None
    return compute


@dataclass(frozen=True)
class _Runtime:
    """The runtime as detection found it: imported now, or its footprint remembered (then no torch)."""

    torch: Any | None
    torch_version: str | None
    modules: tuple[str, ...]
    total: int
    available: int
    rss: int


def _gpu_possible(root: Path, is_jetson: bool) -> bool:
    """A GPU torch could use may be here (then the runtime is imported, to ask it)."""
    return is_jetson or (root / "proc/driver/nvidia/version").exists()


def _runtime(system: Any, torch_module: Any, modules: Sequence[str], cache: Path | None, gpu: bool) -> _Runtime:
    """Import the runtime and read memory after it; or, with a remembered footprint (``cache``, no GPU,
    the real torch), read memory now and take the footprint's growth off what is available."""
    use_cache = cache is not None and torch_module is _AUTO and not gpu
    found = load_footprint(modules, cache) if use_cache else None
    if found is not None:
        total, available = _memory(system)
        grows = max(0, found.runtime_rss - _process_rss(system))
        return _Runtime(None, found.torch_version, found.modules, total, max(0, available - grows), found.runtime_rss)
    baseline = _process_rss(system)
    torch = _import_torch() if torch_module is _AUTO else torch_module
    imported = _import_runtime(modules)
    # Read memory and our own resident set together, after the imports: "available" then excludes
    # the runtime, which the budget accounts for explicitly (see edge_sdk.device._budget).
    total, available = _memory(system)
    rss = _process_rss(system)
    version = str(getattr(torch, "__version__", "unknown")) if torch is not None else None
    if use_cache and rss > 0:
        save_footprint(modules, Footprint(rss, baseline, imported, version), cache)
    return _Runtime(torch, version, imported, total, available, rss)


def detect_profile(
    *,
    root: Path | str = "/",
    system: Any = None,
    torch_module: Any = _AUTO,
    runtime_modules: Sequence[str] = DEFAULT_RUNTIME_MODULES,
    probe: bool = True,
    probe_seconds: float = 1.0,
    probe_step: bool = False,
    footprint_cache: Path | None = None,
) -> DeviceProfile:
    """Detect this device.

    ``root``: directory standing for ``/`` when reading ``sys``, ``proc`` and ``etc`` files.
    ``system``: psutil-like module (``virtual_memory``, ``cpu_count``, ``cpu_freq``,
    ``sensors_temperatures``, ``sensors_battery``, ``Process``); missing functions mean missing sensors.
    ``torch_module``: a torch-like module, ``None`` for "no torch", or (default) the real torch if it imports.
    ``runtime_modules``: imported (each optional) before the runtime footprint is read.
    ``probe``: run the ~``probe_seconds`` matmul probe; ``probe_step``: also time a small training step.
    ``footprint_cache``: a folder where the runtime's footprint is remembered (:mod:`._footprint`):
    read from there instead of importing the runtime when this installation measured it before.
    """
    root = Path(root)
    if system is None:
        import psutil

        system = psutil
    device_model = _read_text(root / "proc/device-tree/model")
    is_jetson = _is_jetson(root, device_model)
    rt = _runtime(system, torch_module, runtime_modules, footprint_cache, _gpu_possible(root, is_jetson))
    cgroup_limit, cgroup_available = read_cgroup_memory(root)
    cpu = _cpu(system)
    accelerator = _accelerator(rt.torch, is_jetson) if rt.torch is not None else None
    torch = rt.torch
    if torch is None and rt.torch_version is not None and probe:  # a remembered footprint: torch for the probe
        torch = _import_torch()
    compute = _probe_compute(torch, accelerator, probe_seconds, step=probe_step) if probe else None

    return DeviceProfile(
        version=PROFILE_VERSION,
        system=platform.system() or "unknown",
        machine=platform.machine() or "unknown",
        device_model=device_model,
        is_jetson=is_jetson,
        python_version=platform.python_version(),
        torch_version=rt.torch_version,
        memory_total=rt.total,
        memory_available=min(rt.available, rt.total),
        cgroup_limit=cgroup_limit,
        cgroup_available=cgroup_available,
        runtime_rss=rt.rss,
        runtime_modules=rt.modules,
        **cpu,
        temperatures=_temperatures(system),
        battery=_battery(system),
        accelerator=accelerator,
        compute=compute,
    )
