"""The federation engine: one run's rounds, transport-agnostic, synchronous and clockless.

The engine knows the global model, the devices and the rounds; it never touches a socket, a thread
or a clock (callers pass ``now``, any monotonic seconds). The websocket server and the simulator both
drive it the same way: one :class:`~coordinator.federation._session.DeviceSession` per device
connection, and the :class:`~coordinator.federation._loop.RoundLoop` for the rounds. By hand::

    engine = FederationEngine(parent, salience, federation, training, devices=["a", "b"])
    engine.admit("a", hello_profile)          # each (re)connection; BudgetError/ProfileError: refuse it
    engine.registry.disconnected("a")         # ... when it goes (``registry.connected`` when back)
    while not engine.finished:
        target = engine.selection.wait_target()       # wait (bounded) for this many idle devices
        orders = engine.begin_round(idle, now)        # one TrainOrder per chosen device: send each
        engine.record_traffic("a", bytes_out=n)       # optional accounting, per device and round
        engine.accept_update(task_id, tensors, num_samples=..., now=now)   # as results come in
        engine.task_failed(task_id, "disconnected")   # or a device's Error, a rejected update
        ... until engine.settled(now)                 # every task answered, or the deadline passed
        engine.close_round(now)                       # later results are "late"
        summary = engine.finish_round()               # aggregate, evaluate: heavy, may run in a thread
        save_checkpoint(run_dir, engine.snapshot())   # see ``_checkpoint``

Its parts: the :class:`~coordinator.federation._registry.DeviceRegistry` (admission, status, peaks,
each device's training and serving budgets, planned by the
:class:`~coordinator.federation._planner.Planner` under a :class:`WidthPolicy`, "budget" by default),
the :class:`~coordinator.federation._selection.Selection` (who takes part), the
:class:`~coordinator.federation._round.OpenRound` (orders, answers, traffic) and
:func:`~coordinator.federation._update_check.accept_tensors`. Updates are full sub-network weights (or
deltas), checked against what was sent and merged per coordinate, sample-weighted (``aggregate``).

All public methods may be called from one thread while :meth:`finish_round` runs in another: its
heavy part touches only the closed round; state changes happen under a lock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.federation._aggregate import ClientUpdate, FedAdam, FedAvg, ServerOptimizer, aggregate_round
from coordinator.federation._checkpoint import EngineState, state_digest
from coordinator.federation._planner import BUDGET, Planner, WidthPolicy, training_workload
from coordinator.federation._privacy import PrivacyAccountant, PrivacyConfig, round_event
from coordinator.federation._records import DeviceOutcome, RoundSummary, TrainOrder, collapse_note, width_of
from coordinator.federation._registry import DeviceRegistry
from coordinator.federation._round import OpenRound, train_orders
from coordinator.federation._selection import Selection
from coordinator.federation._tables import FederationConfig, TrainingConfig
from coordinator.federation._update_check import accept_tensors, check_reported
from edge_sdk._errors import ConfigError, EdgeFMError
from edge_sdk.scaling import LeverPolicy, ParentModel, Plan, Salience, family_for

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


def make_optimizer(federation: FederationConfig) -> ServerOptimizer:
    """The server optimizer a federation config names."""
    if federation.strategy == "fedavg":
        return FedAvg(server_lr=federation.server_lr)
    if federation.strategy == "fedadam":
        return FedAdam(lr=federation.server_lr, beta1=federation.beta1, beta2=federation.beta2, tau=federation.tau)
    raise ConfigError(f"unknown strategy {federation.strategy!r}")


def _local_dp(order: TrainOrder, privacy: PrivacyConfig) -> TrainOrder:
    """``order`` asking the device to clip and noise its update (local DP), its norm bounds widened
    by the noise's norm: ``z C (sqrt(n) + 10)`` over the n values sent (a chi of n degrees of freedom
    is within 10 of sqrt(n) but with negligible probability)."""
    settings = dataclasses.replace(
        order.settings, dp_clip_norm=privacy.clip_norm, dp_noise_multiplier=privacy.noise_multiplier
    )
    values = sum(a.size for a in order.tensors.values() if a.dtype.kind == "f")
    noise = privacy.noise_multiplier * privacy.clip_norm * (math.sqrt(values) + 10.0)
    widen = privacy.clip_norm + noise
    delta_bound = None if order.max_delta_norm is None else order.max_delta_norm + widen
    return dataclasses.replace(
        order, settings=settings, max_update_norm=order.max_update_norm + widen, max_delta_norm=delta_bound
    )


def _local_levers(levers: LeverPolicy | None, privacy: PrivacyConfig) -> LeverPolicy:
    """The planner's levers; under local DP the update must be dense: no LoRA, no embedding rows."""
    policy = LeverPolicy() if levers is None else levers
    if privacy.mode != "local":
        return policy
    pinned = policy.pinned
    if pinned.get("lora_rank") or pinned.get("embeddings") == "rows":
        raise ConfigError("[privacy] mode = 'local' needs dense updates: do not pin lora_rank or embeddings = 'rows'")
    return dataclasses.replace(policy, forbid=policy.forbid | {"lora", "embedding_rows"})


def _json_safe(config: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(dict(config), default=str))
    assert isinstance(out, dict)
    return out


class FederationEngine:
    """The rounds of one federated run (see the module docstring for the calling sequence).

    Attributes: ``parent`` (the global model, in salience order; swapped whole when a round is
    merged), ``salience`` (the ranking plans are searched with), ``model_config`` (the model's
    config as JSON, what tasks and deploys carry; do not modify), ``registry``, ``planner`` and
    ``selection`` (the parts above), ``federation``, ``training``, ``run_id``, ``model_name``, ``phase``
    (waiting, training, aggregating or evaluating; for status displays).
    """

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
        width: WidthPolicy = BUDGET,
        levers: LeverPolicy | None = None,
    ) -> None:
        self.federation = federation
        self.training = training
        self.run_id = run_id or uuid.uuid4().hex
        self.model_name = model_name
        self.parent = parent
        self.salience = salience
        self.model_config = _json_safe(parent.config)
        # SDK devices keep a copy of the received weights when the run grants an update encoding (deltas)
        # or clips locally (local DP): planned for it (an older SDK keeps none: room to spare)
        deltas = federation.update_encoding != "weights" or federation.privacy.mode == "local"
        work = training_workload(parent.config, training, deltas=deltas)
        self.planner = Planner(
            parent,
            salience,
            work,
            min_margin_bytes=federation.min_margin_bytes,
            policy=width,
            levers=_local_levers(levers, federation.privacy),
            devices=devices,
        )
        self.registry = DeviceRegistry(self.planner, devices)
        self.selection = Selection(federation, self.registry, seed)
        self._evaluator = evaluator
        self._seed = seed
        self._optimizer = optimizer if optimizer is not None else make_optimizer(federation)
        self._round = completed_rounds
        self._history: list[Mapping[str, Any]] = list(history)
        # DP: the rounds composed so far are in the history's privacy records (a resumed run replays them)
        self._accountant = PrivacyAccountant.from_history(federation.privacy.delta, self._history)
        self._open: OpenRound | None = None
        # What the run is doing (read-only for callers): "waiting" (between rounds), "training" (a round
        # is open), "aggregating" (merging its updates), "evaluating" (validating the merged model).
        self.phase = "waiting"
        self._digest: str | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------- facts

    @property
    def round(self) -> int:
        """Rounds completed so far."""
        return self._round

    @property
    def finished(self) -> bool:
        return self._round >= self.federation.rounds

    @property
    def history(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(self._history)

    @property
    def deadline(self) -> float | None:
        """The open round's deadline (the callers' clock), if a round is open."""
        rnd = self._open
        return rnd.deadline if rnd is not None else None

    def devices(self) -> dict[str, dict[str, Any]]:
        """The device registry (JSON): status, budget, rounds taken part in."""
        return self.registry.to_json()

    def weights_digest(self) -> str:
        """The sha256 of the global weights (computed once per model)."""
        parent, digest = self.parent, self._digest
        if digest is None:
            digest = state_digest(parent.state)
            with self._lock:
                if self.parent is parent:
                    self._digest = digest
        return digest

    def admit(self, device_id: str, profile: Mapping[str, Any]) -> Plan:
        """Register a device from its Hello profile (``{"budget": {"usable": ...}, "device": ...}``).

        Returns the plan it will train; ProfileError if the profile has no usable budget, BudgetError
        if no sub-network fits it. Admission marks the device connected.
        """
        return self.registry.admit(device_id, profile)

    # ---------------------------------------------------------------------------------- rounds

    def begin_round(self, available: Sequence[str], now: float) -> list[TrainOrder]:
        """Open the next round on devices drawn from ``available`` (admitted, idle); one order each.

        Devices without an admitted budget are left out. Raises EdgeFMError when a round is already
        open, the run is finished, or fewer than ``min_devices`` are available.
        """
        with self._lock:
            if self._open is not None:
                raise EdgeFMError(f"round {self._open.index} is still open")
            if self.finished:
                raise EdgeFMError(f"the run is finished ({self._round} of {self.federation.rounds} rounds)")
            usable = [d for d in available if self.registry.admitted(d)]
            if not self.selection.can_start(len(usable)):
                raise EdgeFMError(
                    f"round {self._round + 1} needs {self.federation.min_devices} device(s), {len(usable)} available"
                )
            index = self._round + 1
            chosen = self.selection.select(usable, index)
            orders = train_orders(
                self.parent,
                self.registry.round_plans(chosen, index),
                round_index=index,
                training=self.training,
                seed=self._seed,
                model_config=self.model_config,
                max_update_norm_ratio=self.federation.max_update_norm_ratio,
                max_delta_norm_ratio=self.federation.max_delta_norm_ratio,
            )
            if self.federation.privacy.mode == "local":
                orders = {t: _local_dp(o, self.federation.privacy) for t, o in orders.items()}
            self._open = OpenRound(index=index, deadline=now + self.federation.round_deadline_s, orders=orders)
            self.phase = "training"
        logger.info(
            "round %d/%d: training on %d device(s): %s",
            index,
            self.federation.rounds,
            len(orders),
            ", ".join(f"{o.device_id} ({o.params / 1e6:.2f}M params, {width_of(o.spec)})" for o in orders.values()),
        )
        return list(orders.values())

    def settled(self, now: float) -> bool:
        """True when every task of the open round is answered, or its deadline has passed."""
        with self._lock:
            return self._open is None or self._open.settled(now)

    def record_traffic(self, device_id: str, *, bytes_out: int = 0, bytes_in: int = 0) -> None:
        """Count bytes sent to / received from a device during the open round (for the round's line)."""
        with self._lock:
            if self._open is not None:
                self._open.count_traffic(device_id, bytes_out, bytes_in)

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
        values, a change above the order's ``max_delta_norm``, non-positive sample counts, and sample
        counts or peaks above what the device declared (:func:`check_reported`) are refused (status
        "late" / "rejected"), never merged.
        ``values_checked``: the transport already checked finite values and the norm bound (the wire
        protocol does, with ``order.max_update_norm``), so that pass over the tensors is not repeated.
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
            record = self.registry.record(order.device_id)
            check_reported(record, num_samples=num_samples, peak_rss_bytes=peak_rss_bytes)
            update = accept_tensors(
                self.parent, order, tensors, num_samples=num_samples, encoding=encoding, values_checked=values_checked
            )
        except EdgeFMError as exc:
            with self._lock:
                return rnd.answer(task_id, "rejected", str(exc), self.registry.record(order.device_id))
        with self._lock:
            if rnd.closed or task_id in rnd.outcomes:
                return DeviceOutcome(order.device_id, task_id, "late", "arrived after the round's deadline")
            rnd.updates[task_id] = update
            outcome = rnd.answer(
                task_id,
                "ok",
                "",
                self.registry.record(order.device_id),
                num_samples=num_samples,
                peak_rss_bytes=peak_rss_bytes,
                step_time_s=step_time_s,
                train_loss=float((metrics or {}).get("loss", float("nan"))),
            )
        self.registry.note_peak(order.device_id, peak_rss_bytes)
        return outcome

    def task_failed(self, task_id: str, reason: str, *, device_id: str | None = None) -> DeviceOutcome | None:
        """The device could not deliver (it reported an error, disconnected, or sent a bad update).

        ``device_id``: who says so; a task sent to another device is not theirs to fail (ignored).
        """
        with self._lock:
            rnd = self._open
            if rnd is None or task_id not in rnd.orders or task_id in rnd.outcomes or rnd.closed:
                return None
            if device_id is not None and rnd.orders[task_id].device_id != device_id:
                logger.warning("device %s named task %s, which is not its own: ignored", device_id, task_id[:64])
                return None
            return rnd.answer(task_id, "failed", reason, self.registry.record(rnd.orders[task_id].device_id))

    def close_round(self, now: float) -> None:
        """Stop accepting results; unanswered tasks become "missing" (deadline or no reply)."""
        with self._lock:
            rnd = self._open
            if rnd is None or rnd.closed:
                return
            reason = "deadline passed" if now >= rnd.deadline else "no reply"
            for task_id in rnd.pending():
                rnd.answer(task_id, "missing", reason, self.registry.record(rnd.orders[task_id].device_id))
            rnd.closed = True

    def finish_round(self) -> RoundSummary:
        """Merge the round's updates into the global model, evaluate it, record the round."""
        with self._lock:
            rnd = self._open
            if rnd is None or not rnd.closed:
                raise EdgeFMError("close_round() must come before finish_round()")
            updates = rnd.accepted()
            senders = [rnd.orders[t].device_id for t in rnd.orders if t in rnd.updates]
            self.phase = "aggregating"
        parent, merge = self._merge(rnd.index, updates, senders)
        privacy = self._privacy_record(len(rnd.orders), composed=bool(updates))
        self.phase = "evaluating"
        metrics = dict(self._evaluator(parent)) if self._evaluator is not None else {}
        if collapse_note(metrics):
            logger.warning("round %d: the global model %s", rnd.index, collapse_note(metrics))
        digest = state_digest(parent.state)
        outcomes = rnd.final_outcomes()
        summary = RoundSummary(rnd.index, self.federation.rounds, outcomes, metrics, digest, merge, privacy)
        with self._lock:
            self.parent, self._digest = parent, digest
            self._round = rnd.index
            self._open = None
            self.phase = "waiting"
            self.registry.note_round(rnd.index, outcomes)
            self._history.append(summary.to_json())
        return summary

    def _merge(
        self, index: int, updates: Sequence[ClientUpdate], senders: Sequence[str]
    ) -> tuple[ParentModel, dict[str, Any]]:
        """The round's updates merged (``[aggregation]`` rule, or central DP), and what the rule did.

        A merge that would make any weight non-finite is refused: the global model stays as it was.
        """
        if not updates:
            return self.parent, {}
        fed = self.federation
        noise = fed.privacy.noise(self._seed, index) if fed.privacy.mode == "central" else None
        parent, merged = aggregate_round(self.parent, updates, self._optimizer, rule=fed.aggregation, noise=noise)
        clipped = {d: round(s, 4) for d, s in zip(senders, merged.scales, strict=True) if s < 1.0}
        capped = {
            d: w
            for d, w, u in zip(senders, merged.weights, updates, strict=True)
            if noise is None and w < u.num_samples
        }
        rule = "dp-fedavg" if noise is not None else fed.aggregation.describe()
        bad = [n for n, t in parent.state.items() if t.is_floating_point() and not bool(t.isfinite().all())]
        if bad:  # every update was checked; this is a last line of defence for the checkpoint
            logger.error("round %d: the merge gave non-finite values (%s): the global model stays", index, bad[0])
            return self.parent, {"rule": rule, "clipped": clipped, "capped": capped, "refused": "non-finite"}
        return parent, {"rule": rule, "clipped": clipped, "capped": capped}

    def _privacy_record(self, selected: int, *, composed: bool) -> dict[str, Any] | None:
        """The round's DP record (None without DP): the event composed, and epsilon so far."""
        dp = self.federation.privacy
        if not dp.enabled:
            return None
        q, z = round_event(dp.mode, selected, len(self.registry.to_json()), dp.noise_multiplier)
        if composed:  # a round that merged nothing released nothing
            self._accountant.compose(q, z)
        epsilon = self._accountant.epsilon()
        return {
            "mode": dp.mode,
            "epsilon": epsilon if math.isfinite(epsilon) else None,  # None: no noise, no guarantee
            "delta": dp.delta,
            "q": q,
            "noise_multiplier": z,
            "clip_norm": dp.clip_norm,
            "composed": composed,
        }

    # ---------------------------------------------------------------------------- checkpoints

    def snapshot(self) -> EngineState:
        """Everything needed to continue the run later (between rounds)."""
        with self._lock:
            if self._open is not None:
                raise EdgeFMError("snapshot() between rounds only")
            return EngineState(
                run_id=self.run_id,
                round=self._round,
                task=self.parent.task,
                model_config=self.model_config,
                weights=dict(self.parent.state),
                salience=self.salience,
                strategy=self.federation.strategy,
                optimizer_state=self._optimizer.state_dict(),
                devices=self.registry.to_json(),
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
        width: WidthPolicy = BUDGET,
        levers: LeverPolicy | None = None,
    ) -> FederationEngine:
        """An engine that continues from ``state`` (a checkpoint) with the given settings."""
        if state.strategy != federation.strategy:
            raise ConfigError(
                f"the run used strategy {state.strategy!r}; the config says {federation.strategy!r}"
                " (start a new run directory to change it)"
            )
        parent = ParentModel(family_for(state.model_config), dict(state.model_config), state.task, dict(state.weights))
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
            width=width,
            levers=levers,
        )
        engine.registry.load(state.devices, keep=devices)
        return engine
