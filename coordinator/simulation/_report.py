"""Results of one or more simulations: a markdown table and PNG plots.

For each method (one :class:`~coordinator.simulation._run.SimulationResult` each): final and best
accuracy, mean and min device training memory (predicted by the memory model for the plan of every
admitted device, and measured on the tasks that ran: peak RSS less the worker's baseline), devices
whose plan exceeds their budget, bytes per device per round (down + up), total local compute time
relative to the first method; the final macro-F1, the validation set's majority class share (the
accuracy of a model that always answers that class) and the rounds whose global model collapsed to one
class (``edge_sdk.training._metrics``: a warning row under the table). Plots: accuracy (solid) and
macro-F1 (dashed) by round with the majority share as a dotted reference line, bytes by round, and
the distribution of the devices' sub-network sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.simulation._run import SimulationResult

__all__ = ["MethodSummary", "markdown_table", "summarize", "write_plots", "write_report"]

_MB = 1e6


@dataclass(frozen=True)
class MethodSummary:
    method: str
    rounds: int
    final_accuracy: float
    best_accuracy: float
    mean_predicted_bytes: float  # over admitted devices' plans
    min_predicted_bytes: float
    full_predicted_bytes: int
    mean_measured_bytes: float  # over tasks that ran
    min_measured_bytes: float
    over_budget: int  # devices whose plan's predicted memory exceeds their budget
    devices: int
    full_model_devices: int  # devices whose plan is the full model
    bytes_per_device_round: float  # mean over tasks of bytes down + up
    compute_s: float  # total local training time over all tasks
    wall_s: float
    smallest_accuracy: float = math.nan  # the final global model sliced to the smallest device plan
    epsilon: float = math.nan  # [privacy]: the DP epsilon after the last round (nan without DP)
    final_macro_f1: float = math.nan
    majority_share: float = math.nan  # of the validation set: what always answering its majority class scores
    collapsed_rounds: tuple[int, ...] = ()  # rounds whose global model predicted one class for almost all rows

    @property
    def mean_predicted_fraction(self) -> float:
        return self.mean_predicted_bytes / self.full_predicted_bytes


def summarize(result: SimulationResult) -> MethodSummary:
    accuracies = [float(r["accuracy"]) for r in result.rounds if r.get("accuracy") is not None]
    admitted = [d for d in result.devices if d.get("admitted")]
    predicted = [float(d["predicted_bytes"]) for d in admitted]
    tasks = [d for r in result.rounds for d in r["devices"]]
    ran = [d for d in tasks if d["status"] == "ok"]
    measured = [float(d["measured_training_bytes"]) for d in ran if d["measured_training_bytes"] > 0]
    full_params = max((int(d["params"]) for d in admitted if d.get("params_fraction") == 1.0), default=-1)
    return MethodSummary(
        method=result.method,
        rounds=len(result.rounds),
        final_accuracy=accuracies[-1] if accuracies else math.nan,
        best_accuracy=max(accuracies) if accuracies else math.nan,
        mean_predicted_bytes=float(np.mean(predicted)) if predicted else math.nan,
        min_predicted_bytes=float(np.min(predicted)) if predicted else math.nan,
        full_predicted_bytes=result.full_predicted_bytes,
        mean_measured_bytes=float(np.mean(measured)) if measured else math.nan,
        min_measured_bytes=float(np.min(measured)) if measured else math.nan,
        over_budget=sum(1 for d in admitted if d["predicted_bytes"] > d["usable_bytes"]),
        devices=len(admitted),
        full_model_devices=sum(1 for d in admitted if int(d["params"]) == full_params),
        bytes_per_device_round=float(np.mean([d["bytes_out"] + d["bytes_in"] for d in tasks])) if tasks else 0.0,
        compute_s=float(sum(d["train_time_s"] for d in ran)),
        wall_s=result.wall_s,
        smallest_accuracy=float(result.width_metrics[min(result.width_metrics)].get("accuracy", math.nan))
        if result.width_metrics
        else math.nan,
        epsilon=_last_epsilon(result.rounds),
        final_macro_f1=_last(result.rounds, "macro_f1"),
        majority_share=_majority_share(result),
        collapsed_rounds=tuple(int(r["round"]) for r in result.rounds if r.get("collapsed")),
    )


def _last(rounds: Sequence[dict[str, Any]], key: str) -> float:
    value = rounds[-1].get(key) if rounds else None
    return float(value) if value is not None else math.nan


def _majority_share(result: SimulationResult) -> float:
    """The validation set's majority share (the same every round; older records may not have it)."""
    for source in (result.start_metrics, *(r for r in reversed(result.rounds))):
        value = source.get("majority_share")
        if value is not None:
            return float(value)
    return math.nan


def _last_epsilon(rounds: Sequence[dict[str, Any]]) -> float:
    eps = rounds[-1].get("epsilon") if rounds else None
    return float(eps) if eps is not None else math.nan


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def _mb(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value / _MB:.0f}"


def _dp(s: MethodSummary) -> str:
    return "" if math.isnan(s.epsilon) else f" (DP epsilon {s.epsilon:.3g})"


def markdown_table(summaries: Sequence[MethodSummary]) -> str:
    """One row per method; compute time relative to the first row."""
    base = summaries[0].compute_s if summaries and summaries[0].compute_s > 0 else math.nan
    head = (
        "| method | final acc % | best acc % | final macro-F1 % | majority share % "
        "| smallest device's sub-network acc % "
        "| train memory, predicted mean / min MB (% of full) "
        "| measured mean / min MB | over budget | full-model devices | MB per device per round "
        "| local compute (x first) |\n| --- |" + " ---: |" * 11
    )
    rows = [head]
    for s in summaries:
        rows.append(
            f"| {s.method}{_dp(s)} | {_pct(s.final_accuracy)} | {_pct(s.best_accuracy)} | {_pct(s.final_macro_f1)} "
            f"| {_pct(s.majority_share)} | {_pct(s.smallest_accuracy)} "
            f"| {_mb(s.mean_predicted_bytes)} / {_mb(s.min_predicted_bytes)} ({100 * s.mean_predicted_fraction:.0f} %) "
            f"| {_mb(s.mean_measured_bytes)} / {_mb(s.min_measured_bytes)} "
            f"| {s.over_budget}/{s.devices} | {s.full_model_devices}/{s.devices} "
            f"| {s.bytes_per_device_round / _MB:.1f} | {s.compute_s:.0f} s ({s.compute_s / base:.2f}) |"
        )
    rows += [_collapse_row(s) for s in summaries if s.collapsed_rounds]
    return "\n".join(rows)


def _collapse_row(s: MethodSummary) -> str:
    rounds = ", ".join(str(r) for r in s.collapsed_rounds[:20]) + (" ..." if len(s.collapsed_rounds) > 20 else "")
    return (
        f"\n**Warning ({s.method})**: the global model predicted one class for almost every validation row"
        f" (collapsed) in round(s) {rounds}; its accuracy there says little"
        f" (majority share {_pct(s.majority_share)} %)."
    )


def write_plots(results: Sequence[SimulationResult], out_dir: Path) -> list[Path]:
    """accuracy.png, bytes.png, widths.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    _quality_plot(ax, results)
    paths.append(_save(fig, out_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for result in results:
        xs = [int(r["round"]) for r in result.rounds]
        ax.plot(
            xs,
            [(r["bytes_down"] + r["bytes_up"]) / _MB for r in result.rounds],
            marker="o",
            markersize=3,
            label=result.method,
        )
    ax.set_xlabel("round")
    ax.set_ylabel("MB sent + received (all devices)")
    ax.set_title("Traffic by round")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "bytes.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    data = [[d["params"] / 1e6 for d in r.devices if d.get("admitted")] for r in results]
    ax.hist(data, bins=12, label=[r.method for r in results])
    ax.set_xlabel("sub-network parameters (millions)")
    ax.set_ylabel("devices")
    ax.set_title("Device sub-network sizes")
    ax.legend()
    paths.append(_save(fig, out_dir / "widths.png"))
    return paths


def _quality_plot(ax: Any, results: Sequence[SimulationResult]) -> None:
    """Accuracy (solid) and macro-F1 (dashed, same colour) by round; majority share as a dotted line."""
    from matplotlib.ticker import MaxNLocator

    majorities: set[float] = set()
    for result in results:
        xs = [0] + [int(r["round"]) for r in result.rounds]
        rows = [result.start_metrics, *result.rounds]
        accuracy = [_value(r, "accuracy") for r in rows]
        (line,) = ax.plot(xs, [100 * y for y in accuracy], marker="o", markersize=3, label=f"{result.method} accuracy")
        f1 = [_value(r, "macro_f1") for r in rows]
        if not all(math.isnan(y) for y in f1):
            ax.plot(xs, [100 * y for y in f1], ls="--", color=line.get_color(), label=f"{result.method} macro-F1")
        majority = _majority_share(result)
        if not math.isnan(majority) and round(majority, 6) not in majorities:
            majorities.add(round(majority, 6))
            ax.axhline(100 * majority, ls=":", color="grey", label=f"majority class share {100 * majority:.1f} %")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("global model accuracy / macro-F1 (%)")
    ax.set_title("Validation accuracy and macro-F1 by round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _value(row: Any, key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    results: Sequence[SimulationResult], out_dir: Path, *, title: str = "Simulation", notes: str = ""
) -> Path:
    """``summary.md`` (the table, per-device plans) and the plots in ``out_dir``; returns the markdown path."""
    summaries = [summarize(r) for r in results]
    write_plots(results, out_dir)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [markdown_table(summaries), ""]
    full = summaries[0].full_predicted_bytes if summaries else 0
    lines += [
        f"Full model's predicted training memory: {full / _MB:.0f} MB (runtime excluded). "
        "Predicted: the memory model for each admitted device's plan; measured: peak RSS of the task less "
        "its worker's resident set before the task, on this host (the simulated budget is not enforced; a "
        "reused worker can undercount what its allocator kept from earlier tasks: fresh_process = true "
        "measures fresh processes). Smallest device's sub-network: the final global model sliced to the "
        "smallest plan any device trains, scored on the same validation set.",
        "",
        "![accuracy](accuracy.png) ![bytes](bytes.png) ![widths](widths.png)",
        "",
    ]
    for result in results:
        lines += [
            f"## {result.method}: device plans",
            "",
            "| device | budget MB | params M | predicted MB | heads / FFN per layer |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for d in result.devices:
            if not d.get("admitted"):
                lines.append(f"| {d['device_id']} | {d['usable_bytes'] / _MB:.0f} | refused | | |")
                continue
            widths = " ".join(f"{h}/{f}" for _i, h, f in d["layers"])
            lines.append(
                f"| {d['device_id']} | {d['usable_bytes'] / _MB:.0f} | {d['params'] / 1e6:.2f} "
                f"| {d['predicted_bytes'] / _MB:.0f} | {widths} |"
            )
        lines.append("")
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
