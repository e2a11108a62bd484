"""Simulation: many virtual devices drawn from device classes, each training its sub-network for real
in worker processes (or on Ray), driven through the same federation engine as the daemon."""

from coordinator.simulation._config import load_simulation_config
from coordinator.simulation._partition import partition_iid
from coordinator.simulation._report import markdown_table, summarize, write_report
from coordinator.simulation._run import run_simulation

__all__ = ["load_simulation_config", "markdown_table", "partition_iid", "run_simulation", "summarize", "write_report"]
