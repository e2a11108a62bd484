"""Check the memory model against reality: train a planned sub-network in a fresh process.

Peak RSS is a high-water mark, so the measurement runs in a new process (``edge_sdk.training._probe``)
that receives the sub-network as a device would (spec, config and safetensors weights) and reports
its own peak and its runtime footprint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from edge_sdk import DeviceClass, SubnetSpec
from edge_sdk._errors import EdgeFMError
from edge_sdk.scaling import (
    TRAINING_RUNTIME_BYTES,
    ParentModel,
    Salience,
    Workload,
    budget_for_device_class,
    extract,
    plan_training,
    training_estimate,
)

__all__ = ["BudgetCheck", "Measured", "check_device_classes", "measure_training"]


@dataclass(frozen=True)
class Measured:
    peak_rss_bytes: int  # the training process's high-water mark
    runtime_rss_bytes: int  # its footprint after imports, before the model arrived
    params: int
    step_time_s: float


def measure_training(
    parent: ParentModel,
    spec: SubnetSpec,
    work: Workload,
    *,
    data: Path,
    tokenizer_dir: Path,
    steps: int = 2,
    timeout_s: float = 600,
) -> Measured:
    """Train ``spec`` for ``steps`` AdamW steps in a fresh process; its measured memory.

    Two steps reach the peak: the first allocates the Adam moments, the second holds them with a
    step's activations and gradients.
    """
    with tempfile.TemporaryDirectory(prefix="edge-fm-probe-") as tmp:
        folder = Path(tmp)
        (folder / "spec.json").write_text(spec.to_json())
        (folder / "config.json").write_text(json.dumps(dict(parent.config)))
        save_file(extract(parent, spec), folder / "weights.safetensors")
        cmd = [
            sys.executable, "-m", "edge_sdk.training._probe", str(folder), "--data", str(data),
            "--tokenizer", str(tokenizer_dir), "--batch", str(work.batch), "--seq", str(work.seq),
            "--steps", str(steps),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if out.returncode != 0:
        raise EdgeFMError(f"the training probe failed ({out.returncode}): {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return Measured(
        peak_rss_bytes=int(result["peak_rss_bytes"]),
        runtime_rss_bytes=int(result["runtime_rss_bytes"]),
        params=int(result["params"]),
        step_time_s=float(result["step_time_s"]),
    )


@dataclass(frozen=True)
class BudgetCheck:
    """One device class: its budget, the planned sub-network, and predicted against measured peak."""

    device_class: str
    allowance: int  # what the training process may hold: budget ceiling - safety margin
    usable: int  # the allowance less the runtime footprint: what the planner fills
    params: int
    params_fraction: float
    predicted: int  # the memory model's peak for the plan, with the measured runtime footprint
    measured: Measured

    @property
    def error(self) -> float:
        return (self.predicted - self.measured.peak_rss_bytes) / self.measured.peak_rss_bytes

    @property
    def within_budget(self) -> bool:
        """What training added to the runtime this process measured fits the usable budget (a device
        reports its own runtime footprint; its usable budget is what remains after it)."""
        return self.measured.peak_rss_bytes - self.measured.runtime_rss_bytes <= self.usable


def check_device_classes(
    parent: ParentModel,
    salience: Salience,
    classes: Sequence[DeviceClass],
    work: Workload,
    *,
    data: Path,
    tokenizer_dir: Path,
    steps: int = 2,
    runtime: int = TRAINING_RUNTIME_BYTES,
) -> list[BudgetCheck]:
    """Plan each class's training sub-network from its budget, train it in a fresh process, compare.

    ``runtime`` is the footprint a device would report (``edge-sdk profile`` measures it); the
    prediction compared with each run uses the footprint that run measured. Each distinct plan is
    measured once (classes with room for the whole model share one run).
    """
    runs: dict[str, Measured] = {}
    rows = []
    for device_class in classes:
        budget = budget_for_device_class(device_class, runtime_footprint=runtime)
        plan = plan_training(parent, salience, budget.usable, work, runtime=0)
        key = plan.spec.to_json()
        if key not in runs:
            runs[key] = measure_training(parent, plan.spec, work, data=data, tokenizer_dir=tokenizer_dir, steps=steps)
        measured = runs[key]
        predicted = training_estimate(plan.spec, plan.params, work, runtime=measured.runtime_rss_bytes).total
        rows.append(
            BudgetCheck(
                device_class=device_class.name,
                allowance=budget.usable + budget.runtime_footprint,
                usable=budget.usable,
                params=plan.params,
                params_fraction=plan.params_fraction,
                predicted=predicted,
                measured=measured,
            )
        )
    return rows
