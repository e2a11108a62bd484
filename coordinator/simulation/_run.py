"""A federated run with many simulated devices on one machine (or a Ray cluster).

The coordinator side is the daemon's: a :class:`~coordinator.federation.FederationEngine` plans,
selects, merges and evaluates; each device has a :class:`~coordinator.federation.DeviceSession` that
admits it (Hello with its budget, Welcome), sends it its tasks and takes its answers; the
:class:`~coordinator.federation.RoundLoop` runs the rounds (with no wait for devices: all are there).
The device side of every task runs in a worker (:mod:`coordinator.simulation._device`): the SDK's
DeviceConnection and TaskRunner, as on a device. Only protocol frames travel between the two.

Devices come from device classes (``profiles/``): a device's training budget is its class's budget
(``budget_for_device_class``: installed memory x usable fraction, less the safety margin and the
runtime footprint) times ``budget_scale``. That *simulated* budget is what the planner uses; the host
process does not enforce it, and the memory each task really took is measured and reported.

Width policies (``[method] width``): "budget" (RaFFM: the largest sub-network whose training fits),
"full" (every device trains the whole model, memory ignored: FedAvg) and "static" (fixed ratios,
HeteroFL-style, whatever the device): a :class:`~coordinator.federation.WidthPolicy` value the engine
takes. ``reorder = false`` slices in index order (the ablation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from coordinator.federation import (
    LABELLED_TASKS,
    Evaluator,
    FederationEngine,
    FinishRound,
    RoundLoop,
    RoundObserver,
    RoundSummary,
    RunComplete,
    SendOrders,
    TrainOrder,
    WidthPolicy,
    check_data_file,
    check_model_folder,
    metrics_text,
    resolve_labels,
)
from coordinator.simulation._config import MethodConfig, SimulationConfig
from coordinator.simulation._data import (
    FastValidator,
    ImageEvaluator,
    ImageFolderData,
    SimData,
    SyntheticData,
    SyntheticEvaluator,
    TsvData,
    read_file,
)
from coordinator.simulation._executor import Executor, make_executor
from coordinator.simulation._links import Link, VirtualDevice, connect, receive, send_task, virtual_devices
from edge_sdk import LabelMap, LayerSpec, SubnetSpec
from edge_sdk._errors import BudgetError, ConfigError, EdgeFMError
from edge_sdk._units import format_bytes
from edge_sdk.scaling import ParentModel, ranked_parent, resolve_model_dir

__all__ = ["SimulationResult", "VirtualDevice", "run_simulation", "virtual_devices", "width_policy"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """A finished simulation: where its files are and what each round gave."""

    run_dir: Path
    method: str
    rounds: tuple[dict[str, Any], ...]
    devices: tuple[dict[str, Any], ...]
    start_metrics: Mapping[str, float]
    weights_digest: str
    wall_s: float
    full_predicted_bytes: int  # the memory model's training bytes of the full model (runtime excluded)
    # the final global model sliced to each distinct device plan (params -> metrics): what a device of
    # that width would hold after the run
    width_metrics: Mapping[int, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return float(self.rounds[-1]["accuracy"]) if self.rounds else float("nan")


def width_policy(method: MethodConfig) -> WidthPolicy:
    """The engine's width policy for a ``[method]`` table (its name seeds the static ratios' deal)."""
    return WidthPolicy(kind=method.width, ratios=method.ratios, salt=method.name)


def _sim_data(config: SimulationConfig, model_dir: Path | None) -> tuple[SimData, Evaluator | None, Any, LabelMap]:
    """The devices' data, the evaluator, the validator (for calibration) and the run's label map."""
    d = config.data
    if config.model.task not in LABELLED_TASKS:
        raise ConfigError(
            f"[model] task = {config.model.task!r}: the simulator runs labelled tasks only;"
            " run a causal-LM federation with edge-coordinator serve and edge-sdk join (examples/llm-federation.toml)"
        )
    if d.kind == "synthetic":
        train = SyntheticData(d.size, d.vocab_size, d.seq_len, seed=config.model.seed)
        dev = SyntheticData(d.dev_size, d.vocab_size, d.seq_len, seed=config.model.seed + 1)
        return train, SyntheticEvaluator(dev), None, resolve_labels(config.model, None)
    if d.train is None:
        raise ConfigError(f"[data] train is required for kind = {d.kind!r}")
    if d.kind == "images":  # preprocessed as the model folder's preprocessor_config.json says
        images = ImageFolderData(Path(d.train), model_dir, d.train_limit)
        images.check()
        dev_images = ImageEvaluator(ImageFolderData(Path(d.dev), model_dir, d.dev_limit)) if d.dev else None
        classes = images.classes() + (dev_images.data.classes if dev_images is not None else ())
        labels = resolve_labels(config.model, sorted(set(classes)))
        if dev_images is not None:
            dev_images.data.use_labels(labels)
        logger.info("the run's %s", labels.describe())
        return images, dev_images, dev_images, labels
    tokenizer = d.tokenizer or model_dir
    if tokenizer is None or not (Path(tokenizer) / "tokenizer.json").is_file():
        raise ConfigError(f"[data] tokenizer: {tokenizer} has no tokenizer.json: set [data] tokenizer = DIR")
    data = TsvData(Path(d.train), Path(tokenizer), d.train_limit, d.format)
    observed = None
    if config.model.labels is None:  # the labels of the train and dev files, sorted
        observed = data.rows().labels + (read_file(str(d.dev), d.format, d.dev_limit).labels if d.dev else [])
    labels = resolve_labels(config.model, observed)
    logger.info("the run's %s", labels.describe())
    data = dataclasses.replace(data, label_map=labels)
    validator = None
    if d.dev is not None:
        validator = FastValidator(
            d.dev, tokenizer, seq_len=config.training.seq_len, limit=d.dev_limit, format=d.format, labels=labels
        )
    return data, validator, validator, labels


def check_simulation(config: SimulationConfig, *, model: bool = True) -> None:
    """ConfigError for data files (and, with ``model``, a model folder) the run could not use: found
    before the model loads or any run folder is written."""
    d = config.data
    if model:
        check_model_folder(config.model.name, tokenizer=d.kind == "file" and d.tokenizer is None)
    if d.kind == "synthetic":
        return
    if d.train is None:
        raise ConfigError(f"[data] train is required for kind = {d.kind!r}")
    if d.tokenizer is not None and not (Path(d.tokenizer) / "tokenizer.json").is_file():
        raise ConfigError(f"[data] tokenizer: {d.tokenizer} has no tokenizer.json: set [data] tokenizer = DIR")
    check_data_file(d.train, "[data] train", limit=d.train_limit, data_format=d.format)
    if d.dev is not None:
        check_data_file(d.dev, "[data] dev", limit=d.dev_limit, data_format=d.format)


def _device_rows(
    summary: RoundSummary,
    orders: Mapping[str, TrainOrder],
    links: Mapping[str, Link],
    extras: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    rows = []
    for outcome in summary.outcomes:
        row = outcome.to_json()
        order = orders[outcome.device_id]
        extra = dict(extras.get(outcome.device_id, {}))
        baseline = int(extra.get("baseline_rss_bytes", 0))
        host_peak = int(extra.get("host_peak_rss_bytes", 0))
        row.update(
            device_class=links[outcome.device_id].device.device_class,
            layers=[[ly.index, ly.heads, ly.ffn] for ly in order.spec.layers],
            over_budget=order.predicted_bytes > outcome.usable_bytes,
            baseline_rss_bytes=baseline,
            host_peak_rss_bytes=host_peak,
            measured_training_bytes=max(0, host_peak - baseline) if outcome.status == "ok" else 0,
            train_time_s=float(extra.get("train_time_s", 0.0)),
            worker_pid=extra.get("worker_pid"),
        )
        rows.append(row)
    return rows


def run_simulation(
    config: SimulationConfig,
    *,
    parent: ParentModel | None = None,
    executor: Executor | None = None,
    run_dir: Path | None = None,
    observer: RoundObserver | None = None,
) -> SimulationResult:
    """Run ``config`` to the end; writes ``rounds/round-NNN.json`` and ``simulation.json`` under the run folder.

    ``parent``: the model (default: load ``[model] name``); ``executor``: reuse worker processes across
    runs (default: one from ``[simulation]``, closed at the end); ``run_dir`` overrides ``[run] dir``;
    ``observer`` hears the rounds as they happen (progress in a terminal).
    """
    started = time.monotonic()
    out = Path(run_dir or config.run_dir)
    if (out / "simulation.json").exists():
        raise ConfigError(f"{out} already holds a finished simulation: choose another [run] dir")
    check_simulation(config, model=parent is None)
    (out / "rounds").mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(config.model.name) if parent is None else None
    data, evaluator, validator, labels = _sim_data(config, model_dir)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, labels=labels, num_labels=len(labels)))
    devices = virtual_devices(config, data.labels())
    engine = _engine(config, parent if parent is not None else model_dir, devices, evaluator, validator)
    start_metrics = dict(evaluator(engine.parent)) if evaluator is not None else {}
    links = {d.name: link for d in devices if (link := connect(engine, d, time.monotonic())) is not None}
    if not links:
        raise BudgetError("no simulated device can train any sub-network of this model")
    device_rows = [_device_row(engine, d, d.name in links) for d in devices]
    logger.info(
        "%s: %d devices (%d admitted), %d rounds of %d; start: %s",
        config.method.name,
        len(devices),
        len(links),
        config.federation.rounds,
        engine.selection.round_size(len(links)),
        metrics_text(start_metrics),
    )
    own = executor is None
    runner = executor or _make_executor(config)
    try:
        rounds = _run_rounds(config, engine, links, data=data, executor=runner, out=out, observer=observer)
    finally:
        if own:
            runner.close()
    save_file({k: v.contiguous() for k, v in engine.parent.state.items()}, str(out / "final.safetensors"))
    result = SimulationResult(
        run_dir=out,
        method=config.method.name,
        rounds=tuple(rounds),
        devices=tuple(device_rows),
        start_metrics=start_metrics,
        weights_digest=engine.weights_digest(),
        wall_s=time.monotonic() - started,
        full_predicted_bytes=engine.planner.fixed(1.0, 0).estimate.total,
        width_metrics=_width_metrics(engine, evaluator, device_rows),
    )
    (out / "simulation.json").write_text(json.dumps(_result_json(config, result), indent=1) + "\n", encoding="utf-8")
    return result


def _make_executor(config: SimulationConfig) -> Executor:
    sim = config.simulation
    return make_executor(
        sim.engine,
        max_workers=sim.max_workers,
        threads=sim.threads,
        fresh_process=sim.fresh_process,
        address=sim.ray_address,
    )


def _engine(
    config: SimulationConfig,
    model: ParentModel | Path | None,
    devices: Sequence[VirtualDevice],
    evaluator: Evaluator | None,
    validator: FastValidator | ImageEvaluator | None,
) -> FederationEngine:
    """The run's engine: the model ranked (and reordered unless ``[method] reorder = false``)."""
    assert model is not None
    parent, salience = ranked_parent(
        model,
        salience=config.model.salience,
        calibration=validator.calibration_batches if validator is not None else None,
        reordered=config.method.reorder,
        task=config.model.task,
        num_labels=config.model.num_labels or 2,
        seed=config.model.seed,
    )
    if config.model.labels is not None:  # the run's label map travels in the model config of every task
        try:
            parent = dataclasses.replace(parent, config=config.model.labels.apply_to(parent.config))
        except ConfigError:
            if not isinstance(model, ParentModel):
                raise
            logger.warning("the given model's head does not match the run's labels: its own labels are kept")
    return FederationEngine(
        parent,
        salience,
        config.federation,
        config.training,
        devices=[d.name for d in devices],
        evaluator=evaluator,
        seed=config.model.seed,
        model_name=config.model.name,
        width=width_policy(config.method),
        levers=config.levers,
    )


def _run_rounds(
    config: SimulationConfig,
    engine: FederationEngine,
    links: dict[str, Link],
    *,
    data: SimData,
    executor: Executor,
    out: Path,
    observer: RoundObserver | None = None,
) -> list[dict[str, Any]]:
    """The federation's round loop over the simulated links; one record per round (also written)."""
    rounds = RoundLoop(engine, device_wait_s=0.0, observer=observer)  # every simulated device is there at once
    wire = out / ".wire"
    records: list[dict[str, Any]] = []
    orders: dict[str, TrainOrder] = {}
    extras: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        while True:
            idle = [name for name, link in links.items() if link.session.ready]
            step = rounds.poll(idle, time.monotonic())
            if isinstance(step, SendOrders):
                started = time.monotonic()
                orders = {o.device_id: o for o in step.orders}
                extras = _train(config, engine, links, step.orders, data=data, executor=executor, wire=wire)
                rounds.close(time.monotonic())  # every worker answered or timed out: nothing more comes
            elif isinstance(step, FinishRound):
                summary = rounds.finish().summary
                records.append(_round_record(config, summary, orders, links, extras, wall_s=time.monotonic() - started))
                (out / "rounds" / f"round-{summary.round:03d}.json").write_text(
                    json.dumps(records[-1], indent=1) + "\n", encoding="utf-8"
                )
            elif isinstance(step, RunComplete):
                return records
            else:
                raise EdgeFMError(f"the simulation cannot wait for devices: {step}")
    finally:
        shutil.rmtree(wire, ignore_errors=True)


def _train(
    config: SimulationConfig,
    engine: FederationEngine,
    links: dict[str, Link],
    orders: Sequence[TrainOrder],
    *,
    data: SimData,
    executor: Executor,
    wire: Path,
) -> dict[str, dict[str, Any]]:
    """Send a round's orders to the workers and feed back their answers; what each worker measured."""
    wire.mkdir(parents=True, exist_ok=True)
    jobs = []
    for order in orders:
        job = send_task(
            links[order.device_id], order, data=data, executor=executor, wire=wire, threads=config.simulation.threads
        )
        if job is not None:
            jobs.append(job)
    extras: dict[str, dict[str, Any]] = {}
    for job, outcome in executor.run(jobs, config.federation.round_deadline_s):
        if isinstance(outcome, BaseException):
            logger.warning("device %s: task %s failed: %s", job.device_id, job.task_id, outcome)
            engine.task_failed(job.task_id, f"worker: {type(outcome).__name__}: {outcome}"[:300])
        else:
            extras[job.device_id] = receive(links[job.device_id], outcome, time.monotonic())
    for path in wire.iterdir():
        path.unlink(missing_ok=True)
    for name, link in list(links.items()):
        if not link.session.ready:  # its connection is gone (a lost worker, a broken answer): it reconnects
            relinked = connect(engine, link.device, time.monotonic())
            if relinked is not None:
                links[name] = relinked
    return extras


def _round_record(
    config: SimulationConfig,
    summary: RoundSummary,
    orders: Mapping[str, TrainOrder],
    links: Mapping[str, Link],
    extras: Mapping[str, Mapping[str, Any]],
    *,
    wall_s: float,
) -> dict[str, Any]:
    rows = _device_rows(summary, orders, links, extras)
    record = {
        "method": config.method.name,
        "round": summary.round,
        "rounds": summary.rounds,
        "accuracy": summary.metrics.get("accuracy"),
        "loss": summary.metrics.get("loss"),
        "macro_f1": summary.metrics.get("macro_f1"),
        "majority_share": summary.metrics.get("majority_share"),
        "collapsed": bool(summary.metrics.get("collapsed")),
        "metrics": dict(summary.metrics),  # all of them: per-class recall, the most predicted class
        "aggregated": summary.aggregated,
        "bytes_down": summary.bytes_out,
        "bytes_up": summary.bytes_in,
        "weights_digest": summary.weights_digest,
        "wall_s": wall_s,
        "merge": dict(summary.merge),  # the [aggregation] rule, devices clipped / capped
        "epsilon": summary.epsilon,  # [privacy]: the run's epsilon so far (None without DP)
        "devices": rows,
        # the merge: the rule, the devices clipped / capped; under DP, epsilon so far
        **({"merge": dict(summary.merge)} if summary.merge else {}),
        **({"privacy": dict(summary.privacy), "epsilon": summary.epsilon} if summary.privacy is not None else {}),
    }
    ok = [r for r in rows if r["status"] == "ok"]
    logger.info(
        "%s round %d/%d: %s; %d/%d updates; params %s; down %s up %s; %.1f s",
        config.method.name,
        summary.round,
        summary.rounds,
        metrics_text(summary.metrics),
        len(ok),
        len(rows),
        ", ".join(f"{r['params'] / 1e6:.1f}M" for r in rows),
        format_bytes(summary.bytes_out),
        format_bytes(summary.bytes_in),
        wall_s,
    )
    return record


def _device_row(engine: FederationEngine, device: VirtualDevice, admitted: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "device_id": device.name,
        "device_class": device.device_class,
        "usable_bytes": device.budget.usable,
        "samples": len(device.indices),
        "admitted": admitted,
    }
    if admitted:
        plan = engine.registry.training_plan(device.name)
        row.update(
            params=plan.params,
            params_fraction=plan.params_fraction,
            predicted_bytes=plan.estimate.total,
            layers=[[ly.index, ly.heads, ly.ffn] for ly in plan.spec.layers],
        )
    return row


def _width_metrics(
    engine: FederationEngine, evaluator: Evaluator | None, rows: Sequence[Mapping[str, Any]]
) -> dict[int, dict[str, float]]:
    score = getattr(evaluator, "score", None)
    if score is None:
        return {}
    out: dict[int, dict[str, float]] = {}
    dims = engine.parent.dims
    for row in rows:
        if row.get("admitted") and int(row["params"]) not in out:
            spec = SubnetSpec(dims, tuple(LayerSpec(*layer) for layer in row["layers"]))
            out[int(row["params"])] = dict(score(engine.parent, spec))
    return out


def _result_json(config: SimulationConfig, result: SimulationResult) -> dict[str, Any]:
    return {
        "method": dataclasses.asdict(config.method),
        "model": config.model.name,
        "labels": None if config.model.labels is None else config.model.labels.model_config(),
        "training": dataclasses.asdict(config.training),
        "federation": dataclasses.asdict(config.federation),
        "simulation": {k: v for k, v in dataclasses.asdict(config.simulation).items()},
        "data": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config.data).items()},
        "start_metrics": dict(result.start_metrics),
        "weights_digest": result.weights_digest,
        "wall_s": result.wall_s,
        "full_predicted_bytes": result.full_predicted_bytes,
        "width_metrics": {str(k): dict(v) for k, v in result.width_metrics.items()},
        "devices": list(result.devices),
        "rounds": [r["round"] for r in result.rounds],
    }
