"""The federation engine: one run's round logic, transport-agnostic, synchronous and clockless.

The engine knows the global model, the devices and the rounds; it never touches a socket, a thread
or a clock (callers pass ``now``, any monotonic seconds). The websocket server (``_server``) drives it
from an asyncio loop; a simulator can drive it with in-memory clients the same way::

    engine = FederationEngine(parent, salience, federation, training, devices=["a", "b"])
    engine.admit("a", hello_profile)          # each (re)connection; BudgetError/ProfileError: refuse it
    engine.device_connected("a")              # ... and device_disconnected("a") when it goes
    while not engine.finished:
        target = engine.wait_target()         # wait (bounded) for this many idle devices, then
        if not engine.can_start(len(idle)):   # give up or wait again: fewer than min_devices
            ...
        orders = engine.begin_round(idle, now)       # one TrainOrder per chosen device: send each
        engine.record_traffic("a", bytes_out=n)      # optional accounting, per device and round
        engine.accept_update(task_id, tensors, num_samples=..., now=now)   # as results come in
        engine.task_failed(task_id, "disconnected")  # or a device's Error, a rejected update
        ... until engine.settled(now)                # every task answered, or the deadline passed
        engine.close_round(now)                      # later results are "late"
        summary = engine.finish_round()              # aggregate, evaluate: heavy, may run in a thread
        save_checkpoint(run_dir, engine.snapshot())  # see ``_checkpoint``
        print(summary.log_line())

Rules: a round is sent to ``max(min_devices, ceil(fraction x expected))`` devices (capped at those
idle), chosen by a seeded draw; ``expected`` counts the devices named at start that have not been
seen to disconnect. Each device gets the sub-network that :func:`plan_training` finds for the
``budget.usable`` its Hello profile reports, less a safety margin (``min_margin_bytes``, of which a
detected budget has already set its own ``budget.margin`` aside). ``usable`` already excludes the
device's runtime footprint (Python, torch, the data), so planning counts weights, gradients,
optimizer state, activations and transients only (``runtime=0``). Updates are full sub-network
weights (or deltas), checked against what was sent and merged per coordinate, sample-weighted
(``aggregate``). The records a round hands out and reports live in ``_records``.

All public methods may be called from one thread while :meth:`finish_round` runs in another: its
heavy part touches only the closed round; state changes happen under a lock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from coordinator.federation._aggregate import ClientUpdate, FedAdam, FedAvg, ServerOptimizer, aggregate
from coordinator.federation._checkpoint import EngineState, state_digest
from coordinator.federation._config import FederationConfig, TrainingConfig
from coordinator.federation._records import DeviceOutcome, RoundSummary, Status, TrainOrder, width_of
from edge_sdk import SubnetSpec
from edge_sdk._errors import BudgetError, ConfigError, EdgeFMError, ProfileError
from edge_sdk._units import format_bytes
from edge_sdk.protocol import TrainSettings, check_tensor_values, numpy_to_torch, torch_to_numpy
from edge_sdk.scaling import ParentModel, Plan, Salience, Workload, extract, plan_training, regions, training_bytes

__all__ = [
    "DeviceOutcome",
    "Evaluator",
    "FederationEngine",
    "RoundSummary",
    "TrainOrder",
    "make_optimizer",
]

logger = logging.getLogger(__name__)

Evaluator = Callable[[ParentModel], Mapping[str, float]]


@dataclasses.dataclass
class _Device:
    name: str
    status: str = "never_seen"  # never_seen | connected | disconnected
    usable_bytes: int = 0
    runtime_bytes: int = 0
    margin_bytes: int = 0
    shrink_bytes: int = 0  # taken off the budget after the device measured a peak above it
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    rounds_ok: int = 0
    rounds_failed: int = 0
    last_round: int = 0


@dataclasses.dataclass
class _Round:
    index: int
    deadline: float
    orders: dict[str, TrainOrder]
    outcomes: dict[str, DeviceOutcome] = dataclasses.field(default_factory=dict)
    updates: dict[str, ClientUpdate] = dataclasses.field(default_factory=dict)
    traffic: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # device -> [out, in]
    closed: bool = False


def make_optimizer(federation: FederationConfig) -> ServerOptimizer:
    """The server optimizer a federation config names."""
    if federation.strategy == "fedavg":
        return FedAvg(server_lr=federation.server_lr)
    if federation.strategy == "fedadam":
        return FedAdam(
            lr=federation.server_lr, beta1=federation.beta1, beta2=federation.beta2, tau=federation.tau
        )
    raise ConfigError(f"unknown strategy {federation.strategy!r}")


def _json_safe(config: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(dict(config), default=str))
    assert isinstance(out, dict)
    return out


def _count(value: Any) -> int:
    """A non-negative integer from a received JSON value (0 when absent or malformed)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class FederationEngine:
    """The rounds of one federated run (see the module docstring for the calling sequence)."""

    def __init__(
        self,
        parent: ParentModel,
        salience: Salience,
        federation: FederationConfig,
        training: TrainingConfig,
        *,
        devices: Sequence[str] = (),
        evaluator: Evaluator | None = None,
        seed: int = 0,
        run_id: str | None = None,
        model_name: str = "",
        optimizer: ServerOptimizer | None = None,
        completed_rounds: int = 0,
        history: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.federation = federation
        self.training = training
        self.run_id = run_id or uuid.uuid4().hex
        self.model_name = model_name
        self._parent = parent
        self._salience = salience
        self._evaluator = evaluator
        self._seed = seed
        self._optimizer = optimizer if optimizer is not None else make_optimizer(federation)
        self._round = completed_rounds
        self._history: list[Mapping[str, Any]] = list(history)
        self._devices: dict[str, _Device] = {name: _Device(name) for name in devices}
        self._plans: dict[int, Plan] = {}
        self._open: _Round | None = None
        self._lock = threading.RLock()
        self._model_config = _json_safe(parent.config)
        self._work = Workload(training.batch_size, training.seq_len)

    # ----------------------------------------------------------------------------------- facts

    @property
    def parent(self) -> ParentModel:
        """The global model (in salience order)."""
        return self._parent

    @property
    def salience(self) -> Salience:
        """The salience ranking the model was reordered by (what plans are searched with)."""
        return self._salience

    @property
    def model_config(self) -> dict[str, Any]:
        """The global model's config as JSON (what tasks and deploys send)."""
        return dict(self._model_config)

    @property
    def round(self) -> int:
        """Rounds completed so far."""
        return self._round

    @property
    def finished(self) -> bool:
        return self._round >= self.federation.rounds

    @property
    def current(self) -> int | None:
        """The index of the open round, if one is open."""
        return self._open.index if self._open is not None else None

    @property
    def history(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(self._history)

    def devices(self) -> dict[str, dict[str, Any]]:
        """The device registry (JSON): status, budget, rounds taken part in."""
        with self._lock:
            return {name: dataclasses.asdict(d) for name, d in self._devices.items()}

    def weights_digest(self) -> str:
        return state_digest(self._parent.state)

    # --------------------------------------------------------------------------------- devices

    def planning_bytes(self, usable_bytes: int, margin_bytes: int = 0) -> int:
        """What planning may spend of a device's usable budget.

        A device whose budget already set ``margin_bytes`` aside (a detected budget) loses nothing more;
        one that did not (``--memory-budget``: margin 0) keeps ``min_margin_bytes`` in reserve for what
        the memory model does not count.
        """
        return training_bytes(usable_bytes, margin_bytes, self.federation.min_margin_bytes)

    def plan_for(self, usable_bytes: int, margin_bytes: int = 0) -> Plan:
        """The sub-network a device with this budget trains (BudgetError when none fits)."""
        usable_bytes = self.planning_bytes(usable_bytes, margin_bytes)
        if usable_bytes <= 0:
            raise BudgetError(
                "no sub-network fits: the budget is below the safety margin of"
                f" {format_bytes(self.federation.min_margin_bytes)}"
            )
        with self._lock:
            plan = self._plans.get(usable_bytes)
            if plan is None:
                plan = plan_training(self._parent, self._salience, usable_bytes, self._work, runtime=0)
                self._plans[usable_bytes] = plan
            return plan

    def plan_for_device(self, device_id: str) -> Plan:
        """The sub-network an admitted device trains: :meth:`plan_for` its budget.

        The one place a round chooses widths: a simulator overrides it to compare width policies
        (every device the full model, or fixed ratios whatever its memory).
        """
        with self._lock:
            record = self._devices[device_id]
            usable, margin = record.usable_bytes - record.shrink_bytes, record.margin_bytes
        return self.plan_for(usable, margin)

    def _note_peak(self, device_id: str, peak_rss_bytes: int) -> None:
        """A device measured more than its budget allows: its next sub-network is planned smaller.

        The allowance is what the training process may hold: the usable budget plus the runtime
        footprint the device reported. The overshoot, and 2 % of the budget more, come off the budget
        the planner sees for this device from now on (kept in the checkpointed registry).
        """
        with self._lock:
            record = self._devices.get(device_id)
            if record is None or peak_rss_bytes <= 0 or record.usable_bytes <= 0:
                return
            allowance = record.usable_bytes + record.runtime_bytes
            if peak_rss_bytes <= allowance:
                return
            record.shrink_bytes += peak_rss_bytes - allowance + record.usable_bytes // 50
            shrink = record.shrink_bytes
        logger.warning(
            "device %s peaked at %s, above its allowance of %s: planning its next sub-network for %s less",
            device_id,
            format_bytes(peak_rss_bytes),
            format_bytes(allowance),
            format_bytes(shrink),
        )

    def admit(self, device_id: str, profile: Mapping[str, Any]) -> Plan:
        """Register a device from its Hello profile (``{"budget": {"usable": ...}, "device": ...}``).

        Returns the plan it will train; ProfileError if the profile has no usable budget, BudgetError
        if no sub-network fits it. Admission marks the device connected.
        """
        budget = profile.get("budget") if isinstance(profile, Mapping) else None
        usable = budget.get("usable") if isinstance(budget, Mapping) else None
        if isinstance(usable, bool) or not isinstance(usable, int) or usable <= 0:
            raise ProfileError(f"device {device_id!r}: the Hello profile has no positive budget.usable")
        assert isinstance(budget, Mapping)
        runtime, margin = (_count(budget.get(key)) for key in ("runtime_footprint", "margin"))
        plan = self.plan_for(usable, margin)
        device_info = profile.get("device")
        summary: dict[str, Any] = {}
        if isinstance(device_info, Mapping):
            for key in (
                "machine",
                "system",
                "device_model",
                "cpu_logical_cores",
                "memory_total",
                "torch_version",
            ):
                if key in device_info:
                    summary[key] = device_info[key]
        with self._lock:
            record = self._devices.setdefault(device_id, _Device(device_id))
            record.usable_bytes, record.runtime_bytes, record.summary = usable, runtime, summary
            record.margin_bytes = margin
            record.status = "connected"
        logger.info(
            "device %s admitted: budget %s usable (runtime %s), will train %.2fM params (%s)",
            device_id,
            format_bytes(usable),
            format_bytes(runtime),
            plan.params / 1e6,
            width_of(plan.spec),
        )
        return plan

    def device_connected(self, device_id: str) -> None:
        with self._lock:
            self._devices.setdefault(device_id, _Device(device_id)).status = "connected"

    def device_disconnected(self, device_id: str) -> None:
        with self._lock:
            if device_id in self._devices:
                self._devices[device_id].status = "disconnected"

    def expected_devices(self) -> list[str]:
        """Devices a round may count on: named or seen, and not seen to disconnect."""
        with self._lock:
            return sorted(name for name, d in self._devices.items() if d.status != "disconnected")

    # ---------------------------------------------------------------------------------- rounds

    def round_size(self, available: int) -> int:
        """How many of ``available`` idle devices a round takes."""
        expected = max(len(self.expected_devices()), available)
        want = max(self.federation.min_devices, math.ceil(self.federation.fraction * expected))
        return min(want, available)

    def wait_target(self) -> int:
        """How many idle devices to wait for (bounded by ``device_wait_s``) before starting a round."""
        expected = len(self.expected_devices())
        return max(self.federation.min_devices, math.ceil(self.federation.fraction * expected))

    def can_start(self, available: int) -> bool:
        return available >= self.federation.min_devices and available > 0

    def select(self, available: Sequence[str]) -> list[str]:
        """The devices of the next round: a seeded draw of :meth:`round_size` among ``available``."""
        pool = sorted(set(available))
        k = self.round_size(len(pool))
        rng = random.Random(zlib.crc32(f"{self._seed}/select/{self._round + 1}".encode()))
        return sorted(rng.sample(pool, k))

    def begin_round(self, available: Sequence[str], now: float) -> list[TrainOrder]:
        """Open the next round on devices drawn from ``available`` (admitted, idle); one order each.

        Devices without an admitted budget are skipped with a log line. Raises EdgeFMError when a
        round is already open, the run is finished, or fewer than ``min_devices`` are available.
        """
        with self._lock:
            if self._open is not None:
                raise EdgeFMError(f"round {self._open.index} is still open")
            if self.finished:
                raise EdgeFMError(f"the run is finished ({self._round} of {self.federation.rounds} rounds)")
            usable = [d for d in available if d in self._devices and self._devices[d].usable_bytes > 0]
            if not self.can_start(len(usable)):
                raise EdgeFMError(
                    f"round {self._round + 1} needs {self.federation.min_devices} device(s),"
                    f" {len(usable)} available"
                )
            index = self._round + 1
            chosen = self.select(usable)
            orders: dict[str, TrainOrder] = {}
            norms: dict[SubnetSpec, tuple[dict[str, np.ndarray], float]] = {}
            for device_id in chosen:
                plan = self.plan_for_device(device_id)
                if plan.spec not in norms:
                    tensors = torch_to_numpy(extract(self._parent, plan.spec))
                    norms[plan.spec] = (tensors, check_tensor_values(tensors, what="global sub-network"))
                tensors, norm = norms[plan.spec]
                order = TrainOrder(
                    task_id=f"r{index}-{device_id}-{uuid.uuid4().hex[:8]}",
                    device_id=device_id,
                    round=index,
                    spec=plan.spec,
                    params=plan.params,
                    params_fraction=plan.params_fraction,
                    predicted_bytes=plan.estimate.total,
                    settings=TrainSettings(
                        local_steps=self.training.local_steps,
                        lr=self.training.lr,
                        batch_size=self.training.batch_size,
                        seq_len=self.training.seq_len,
                        prox_mu=self.training.prox_mu,
                        seed=zlib.crc32(f"{self._seed}/train/{index}/{device_id}".encode()),
                    ),
                    model_config=self._model_config,
                    tensors=tensors,
                    max_update_norm=self.federation.max_update_norm_ratio * norm + 1.0,
                )
                orders[order.task_id] = order
            self._open = _Round(index=index, deadline=now + self.federation.round_deadline_s, orders=orders)
        logger.info(
            "round %d/%d: training on %d device(s): %s",
            index,
            self.federation.rounds,
            len(orders),
            ", ".join(
                f"{o.device_id} ({o.params / 1e6:.2f}M params, {width_of(o.spec)})" for o in orders.values()
            ),
        )
        return list(orders.values())

    @property
    def deadline(self) -> float | None:
        return self._open.deadline if self._open is not None else None

    def pending(self) -> list[str]:
        """Task ids of the open round with no answer yet."""
        with self._lock:
            if self._open is None:
                return []
            return [t for t in self._open.orders if t not in self._open.outcomes]

    def settled(self, now: float) -> bool:
        """True when every task of the open round is answered, or its deadline has passed."""
        with self._lock:
            if self._open is None:
                return True
            return not self.pending() or now >= self._open.deadline

    def order(self, task_id: str) -> TrainOrder | None:
        with self._lock:
            return self._open.orders.get(task_id) if self._open is not None else None

    def record_traffic(self, device_id: str, *, bytes_out: int = 0, bytes_in: int = 0) -> None:
        """Count bytes sent to / received from a device during the open round (for the round's line)."""
        with self._lock:
            if self._open is not None:
                entry = self._open.traffic.setdefault(device_id, [0, 0])
                entry[0] += bytes_out
                entry[1] += bytes_in

    def accept_update(
        self,
        task_id: str,
        tensors: Mapping[str, np.ndarray],
        *,
        num_samples: int,
        now: float,
        encoding: str = "weights",
        metrics: Mapping[str, float] | None = None,
        peak_rss_bytes: int = 0,
        step_time_s: float = 0.0,
        values_checked: bool = False,
    ) -> DeviceOutcome:
        """Take a device's trained weights (or delta) for its task; the outcome says if they count.

        Late results (round closed or deadline passed), unknown tasks, mismatched tensors, non-finite
        values and non-positive sample counts are refused (status "late" / "rejected"), never merged.
        ``values_checked``: the transport already checked finite values and the norm bound (the wire
        protocol does, with ``order.max_update_norm``), so the engine skips that pass over the tensors.
        """
        with self._lock:
            rnd = self._open
            order = rnd.orders.get(task_id) if rnd is not None else None
            if rnd is None or order is None:
                return DeviceOutcome("?", task_id, "late", "no open round has this task")
            if rnd.closed or now > rnd.deadline:
                return DeviceOutcome(order.device_id, task_id, "late", "arrived after the round's deadline")
            if task_id in rnd.outcomes:
                return DeviceOutcome(order.device_id, task_id, "rejected", "this task was already answered")
        try:
            weights = self._check_update(order, tensors, num_samples, encoding, values_checked)
        except EdgeFMError as exc:
            return self._finish_task(task_id, "rejected", str(exc))
        metrics = metrics or {}
        with self._lock:
            if rnd.closed or task_id in rnd.outcomes:
                return DeviceOutcome(order.device_id, task_id, "late", "arrived after the round's deadline")
            rnd.updates[task_id] = ClientUpdate(order.spec, weights, num_samples)
        self._note_peak(order.device_id, peak_rss_bytes)
        return self._finish_task(
            task_id,
            "ok",
            "",
            num_samples=num_samples,
            peak_rss_bytes=peak_rss_bytes,
            step_time_s=step_time_s,
            train_loss=float(metrics.get("loss", float("nan"))),
        )

    def task_failed(self, task_id: str, reason: str) -> DeviceOutcome | None:
        """The device could not deliver (it reported an error, disconnected, or sent a bad update)."""
        with self._lock:
            rnd = self._open
            if rnd is None or task_id not in rnd.orders or task_id in rnd.outcomes or rnd.closed:
                return None
        return self._finish_task(task_id, "failed", reason)

    def close_round(self, now: float) -> None:
        """Stop accepting results; unanswered tasks become "missing" (deadline or no reply)."""
        with self._lock:
            rnd = self._open
            if rnd is None or rnd.closed:
                return
            for task_id in self.pending():
                reason = "deadline passed" if now >= rnd.deadline else "no reply"
                self._finish_task(task_id, "missing", reason)
            rnd.closed = True

    def finish_round(self) -> RoundSummary:
        """Merge the round's updates into the global model, evaluate it, record the round."""
        with self._lock:
            rnd = self._open
            if rnd is None or not rnd.closed:
                raise EdgeFMError("close_round() must come before finish_round()")
            updates = [rnd.updates[t] for t in rnd.orders if t in rnd.updates]
        parent = aggregate(self._parent, updates, self._optimizer) if updates else self._parent
        metrics = dict(self._evaluator(parent)) if self._evaluator is not None else {}
        digest = state_digest(parent.state)
        outcomes = []
        for task_id, order in rnd.orders.items():
            out, inn = rnd.traffic.get(order.device_id, [0, 0])
            outcomes.append(dataclasses.replace(rnd.outcomes[task_id], bytes_out=out, bytes_in=inn))
        summary = RoundSummary(rnd.index, self.federation.rounds, tuple(outcomes), metrics, digest)
        with self._lock:
            self._parent = parent
            self._round = rnd.index
            self._open = None
            self._plans.clear()  # plans do not depend on weights, but keep the cache per round small
            for o in outcomes:
                record = self._devices.setdefault(o.device_id, _Device(o.device_id))
                record.last_round = rnd.index
                if o.status == "ok":
                    record.rounds_ok += 1
                else:
                    record.rounds_failed += 1
            self._history.append(summary.to_json())
        return summary

    # ------------------------------------------------------------------------------ internals

    def _check_update(
        self,
        order: TrainOrder,
        tensors: Mapping[str, np.ndarray],
        num_samples: int,
        encoding: str,
        values_checked: bool,
    ) -> dict[str, torch.Tensor]:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise EdgeFMError(f"num_samples must be a positive integer, got {num_samples!r}")
        expected = {name: array.shape for name, array in order.tensors.items()}
        problems = [f"missing {n}" for n in expected if n not in tensors]
        problems += [f"unexpected {n}" for n in tensors if n not in expected]
        problems += [
            f"{n}: shape {list(a.shape)} != {list(expected[n])}"
            for n, a in tensors.items()
            if n in expected and tuple(a.shape) != tuple(expected[n])
        ]
        problems += [
            f"{n}: dtype {a.dtype} != {order.tensors[n].dtype}"
            for n, a in tensors.items()
            if n in expected and a.dtype != order.tensors[n].dtype
        ]
        if problems:
            raise EdgeFMError("the update does not match its task: " + "; ".join(problems[:8]))
        if not values_checked:
            check_tensor_values(
                tensors, max_norm=order.max_update_norm, what=f"update for task {order.task_id!r}"
            )
        weights = numpy_to_torch({n: np.asarray(a) for n, a in tensors.items()})
        if encoding == "delta":
            weights = {
                n: (order_t + weights[n]) if order_t.is_floating_point() else order_t
                for n, order_t in numpy_to_torch(dict(order.tensors)).items()
            }
        elif encoding != "weights":
            raise EdgeFMError(f"unknown update encoding {encoding!r}")
        regions(self._parent, order.spec)  # the spec still fits the model
        return weights

    def _finish_task(self, task_id: str, status: Status, reason: str, **fields: Any) -> DeviceOutcome:
        with self._lock:
            rnd = self._open
            assert rnd is not None
            order = rnd.orders[task_id]
            record = self._devices.get(order.device_id)
            outcome = DeviceOutcome(
                device_id=order.device_id,
                task_id=task_id,
                status=status,
                reason=reason,
                params=order.params,
                params_fraction=order.params_fraction,
                width=width_of(order.spec),
                predicted_bytes=order.predicted_bytes,
                usable_bytes=record.usable_bytes if record else 0,
                runtime_bytes=record.runtime_bytes if record else 0,
                **fields,
            )
            rnd.outcomes[task_id] = outcome
        level = logging.INFO if status == "ok" else logging.WARNING
        logger.log(
            level,
            "round %d: %s from %s%s",
            rnd.index,
            status,
            order.device_id,
            f" ({reason})" if reason else "",
        )
        return outcome

    # ---------------------------------------------------------------------------- checkpoints

    def snapshot(self) -> EngineState:
        """Everything needed to continue the run later (between rounds)."""
        with self._lock:
            if self._open is not None:
                raise EdgeFMError("snapshot() between rounds only")
            return EngineState(
                run_id=self.run_id,
                round=self._round,
                task=self._parent.task,
                model_config=self._model_config,
                weights=dict(self._parent.state),
                salience=self._salience,
                strategy=self.federation.strategy,
                optimizer_state=self._optimizer.state_dict(),
                devices=self.devices(),
                history=tuple(self._history),
                model_name=self.model_name,
            )

    @classmethod
    def restore(
        cls,
        state: EngineState,
        federation: FederationConfig,
        training: TrainingConfig,
        *,
        devices: Sequence[str] = (),
        evaluator: Evaluator | None = None,
        seed: int = 0,
    ) -> FederationEngine:
        """An engine that continues from ``state`` (a checkpoint) with the given settings."""
        from edge_sdk.scaling import family_for

        if state.strategy != federation.strategy:
            raise ConfigError(
                f"the run used strategy {state.strategy!r}; the config says {federation.strategy!r}"
                " (start a new run directory to change it)"
            )
        parent = ParentModel(
            family_for(state.model_config), dict(state.model_config), state.task, dict(state.weights)
        )
        optimizer = make_optimizer(federation)
        optimizer.load_state_dict(state.optimizer_state)
        engine = cls(
            parent,
            state.salience,
            federation,
            training,
            devices=devices,
            evaluator=evaluator,
            seed=seed,
            run_id=state.run_id,
            model_name=state.model_name,
            optimizer=optimizer,
            completed_rounds=state.round,
            history=state.history,
        )
        for name, data in state.devices.items():
            if devices and name not in devices:
                continue  # no longer named in the configuration
            known = {f.name for f in dataclasses.fields(_Device)}
            record = _Device(**{k: v for k, v in data.items() if k in known})
            engine._devices[name] = record
        return engine
