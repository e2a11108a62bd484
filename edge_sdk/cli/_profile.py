"""``edge-sdk profile``: show the detected device and its training-memory budget.

    edge-sdk profile [--json] [--memory-budget SIZE | --profile NAME] [--no-probe] [--step-probe] [--no-cache]

``--json`` prints ``{"profile": ..., "budget": ..., "device_class": ...}`` (``DeviceProfile.to_dict()``,
``MemoryBudget.to_dict()``, and the named class or null) on stdout; logs go to stderr.

The runtime's footprint (what importing torch, transformers and the modeling code costs) is
measured once per installation and remembered (``edge_sdk.device._footprint``): a later profile
reads it instead of importing the runtime, so ``--no-probe`` answers in well under a second.
``--no-cache`` measures it again.

Extension hook: sub-network planning (``--model DIR``) belongs to a later module,
``edge_sdk.cli._profile_plan``. When that module exists it is imported lazily and must provide
``add_arguments(parser)`` and ``run_plan(args, profile, budget) -> (json_section, table_lines)``;
its section appears under "plan" in the JSON and after the budget in the table. Nothing here imports
``coordinator``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from types import ModuleType
from typing import Any

from edge_sdk._cache import cache_dir
from edge_sdk._units import format_bytes, parse_size
from edge_sdk.device._budget import compute_budget
from edge_sdk.device._classes import DeviceClass, load_device_class
from edge_sdk.device._profile import DeviceProfile, detect_profile
from edge_sdk.scaling._budget import MemoryBudget

__all__ = ["add_parser", "render_table", "run"]

_PLAN_MODULE = "edge_sdk.cli._profile_plan"


def _plan_module() -> ModuleType | None:
    try:
        return importlib.import_module(_PLAN_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == _PLAN_MODULE:
            return None
        raise


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "profile",
        help="show this device and its training-memory budget",
        description="Detect this device (memory, cgroup limit, CPU, sensors, accelerator, runtime "
        "footprint, compute speed) and print the memory budget it offers for training.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="use this training budget instead of the detected one (e.g. 1.5GB, 512MiB)",
    )
    source.add_argument(
        "--profile", metavar="NAME", help="budget of a named device class (e.g. raspberry-pi-4-4gb) or a .toml file"
    )
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the compute probe (a ~1 s matmul timing, plus importing torch for it): the fastest profile",
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="measure the runtime's footprint by importing it (by default the figure measured before is reused)",
    )
    parser.add_argument(
        "--step-probe",
        action="store_true",
        help="also time a few training steps of a small transformer layer (torch only)",
    )
    plan = _plan_module()
    if plan is not None:
        plan.add_arguments(parser)
    return parser


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _device_rows(p: DeviceProfile) -> list[tuple[str, str]]:
    cores = f"{p.cpu_logical_cores} logical"
    if p.cpu_physical_cores is not None:
        cores += f", {p.cpu_physical_cores} physical"
    cores += " cores"
    freq = f"{p.cpu_freq_mhz:.0f} MHz now" if p.cpu_freq_mhz is not None else "frequency unknown"
    if p.cpu_freq_max_mhz is not None:
        freq += f", {p.cpu_freq_max_mhz:.0f} MHz max"
    temps = ", ".join(f"{t.sensor} {t.celsius:.1f} °C" for t in p.temperatures) or "none reported"
    if p.battery is None:
        battery = "none"
    else:
        plugged = {True: ", plugged in", False: ", on battery", None: ""}[p.battery.plugged]
        battery = f"{p.battery.percent:.0f} %{plugged}"
    acc = p.accelerator
    if acc is None:
        accel = "none: training runs on the CPU"
    else:
        memory = (
            "shares system memory (unified)"
            if acc.unified_memory
            else (f"{format_bytes(acc.free_memory)} free" if acc.free_memory is not None else "free memory unknown")
        )
        total = f"{format_bytes(acc.total_memory)}, " if acc.total_memory is not None else ""
        accel = f"{acc.kind}: {acc.name} ({total}{memory})"
    c = p.compute
    if c is None:
        compute = "not measured"
    else:
        compute = (
            f"{c.gflops:.1f} GFLOPS {c.dtype} matmul ({c.backend} on {c.device}, "
            f"n={c.matrix_size}, {c.iterations} in {c.seconds:.2f} s)"
        )
        if c.step_seconds is not None:
            compute += f"; small-layer training step {c.step_seconds * 1000:.1f} ms"
    return [
        ("system", f"{p.system} {p.machine}"),
        ("model", p.device_model or "unknown (no device tree)"),
        ("jetson", _yes_no(p.is_jetson)),
        ("python / torch", f"{p.python_version} / {p.torch_version or 'not installed'}"),
        ("cpu", f"{cores}; {freq}"),
        ("temperatures", temps),
        ("battery", battery),
        ("accelerator", accel),
        ("compute", compute),
    ]


def _budget_rows(b: MemoryBudget, p: DeviceProfile) -> list[tuple[str, str]]:
    modules = ", ".join(p.runtime_modules) or "interpreter only"
    return [
        ("source", f"{b.source} ({b.pool} memory)"),
        ("total", format_bytes(b.total)),
        ("available", format_bytes(b.available)),
        ("cgroup limit", format_bytes(b.cgroup_limit) if b.cgroup_limit is not None else "none"),
        ("runtime footprint", f"{format_bytes(b.runtime_footprint)} ({modules})"),
        ("ceiling", f"{format_bytes(b.ceiling)} (most this process may hold)"),
        ("safety margin", format_bytes(b.margin)),
        (
            "usable",
            f"{format_bytes(b.usable)} ({b.usable} bytes) for weights, gradients, optimizer state and activations",
        ),
    ]


def _class_rows(d: DeviceClass) -> list[tuple[str, str]]:
    accel = (
        "none"
        if d.accelerator == "none"
        else f"{d.accelerator}: {d.accelerator_name}" + (" (unified memory)" if d.unified_memory else "")
    )
    return [
        ("name", f"{d.name}: {d.display_name}"),
        ("memory", f"{format_bytes(d.memory)} installed, {d.usable_fraction:.0%} expected available"),
        ("cpu", f"{d.cpu_model}, {d.cpu_cores} cores, {d.cpu_max_mhz} MHz max"),
        ("compute", f"{d.compute_gflops:g} GFLOPS float32 ({d.compute_processor}, estimate)"),
        ("uplink", f"{d.uplink_mbps:g} Mbit/s (estimate); link: {d.network_link}"),
        ("accelerator", accel),
        *[("source", s) for s in d.sources],
    ]


def render_table(profile: DeviceProfile, budget: MemoryBudget, device_class: DeviceClass | None = None) -> str:
    """The human-readable report ``edge-sdk profile`` prints."""
    sections: list[tuple[str, list[tuple[str, str]]]] = [("Device", _device_rows(profile))]
    if device_class is not None:
        sections.append(("Device class", _class_rows(device_class)))
    sections.append(("Memory budget", _budget_rows(budget, profile)))
    width = max(len(k) for _, rows in sections for k, _ in rows) + 2
    lines: list[str] = []
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {k:<{width}}{v}" for k, v in rows)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # Check the user's input before spending seconds on detection.
    override = parse_size(args.memory_budget) if args.memory_budget is not None else None
    device_class = load_device_class(args.profile) if args.profile is not None else None
    profile = detect_profile(
        probe=not args.no_probe, probe_step=args.step_probe, footprint_cache=None if args.no_cache else cache_dir()
    )
    budget = compute_budget(profile, override=override, named_profile=device_class)
    plan = _plan_module()
    plan_json, plan_lines = plan.run_plan(args, profile, budget) if plan is not None else (None, [])
    if args.json:
        report: dict[str, Any] = {
            "profile": profile.to_dict(),
            "budget": budget.to_dict(),
            "device_class": device_class.to_dict() if device_class is not None else None,
        }
        if plan is not None:
            report["plan"] = plan_json
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(render_table(profile, budget, device_class))
        for line in plan_lines:
            print(line)
    return 0
