"""``edge-coordinator simulate``: a federated run of many simulated devices on this machine (or Ray).

    edge-coordinator simulate --config examples/sim.toml
    edge-coordinator simulate --config examples/sim.toml --engine ray [--ray-address HOST:PORT]

Writes into the run folder: ``rounds/round-NNN.json`` (per round: accuracy, loss, per-device widths,
parameters, bytes down and up, local compute time, measured peak memory), ``simulation.json``,
``summary.md`` and the plots (``accuracy.png``, ``bytes.png``, ``widths.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from coordinator._progress import terminal_progress
from coordinator.simulation import load_simulation_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a federated run with many devices drawn from device classes",
        description="Simulated devices (budgets from profiles/) train their budget-matched sub-networks for "
        "real, through the SDK's task runner and the wire protocol, in local worker processes or on Ray.",
    )
    p.add_argument("--config", required=True, type=Path, help="simulation TOML (see examples/sim.toml)")
    p.add_argument("--engine", choices=("local", "ray"), help="override [simulation] engine")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: start a local Ray instance)")
    p.add_argument("--workers", type=int, help="override [simulation] max_workers")
    p.add_argument("--rounds", type=int, help="override [federation] rounds")
    p.add_argument("--run-dir", type=Path, help="override [run] dir")


def run(args: argparse.Namespace) -> int:
    from coordinator.simulation import markdown_table, run_simulation, summarize, write_report

    config = load_simulation_config(args.config)
    sim = config.simulation
    if args.engine or args.ray_address or args.workers:
        sim = dataclasses.replace(
            sim,
            engine=args.engine or ("ray" if args.ray_address else sim.engine),
            ray_address=args.ray_address or sim.ray_address,
            max_workers=args.workers or sim.max_workers,
        )
    federation = config.federation
    if args.rounds:
        federation = dataclasses.replace(federation, rounds=args.rounds)
    config = dataclasses.replace(config, simulation=sim, federation=federation, run_dir=args.run_dir or config.run_dir)
    result = run_simulation(config, observer=terminal_progress(sys.stdout, label=config.method.name))
    report = write_report(
        [result],
        result.run_dir,
        title=f"Simulation: {config.method.name}",
        notes="Simulated memory budgets are what the planner used; the host does not enforce them.",
    )
    print(markdown_table([summarize(result)]))
    print(f"\nreport: {report}  (rounds: {result.run_dir / 'rounds'})")
    return 0
