"""The daemon's deploy service: each connected device's inference sub-network, sent and awaited.

When the last round is done, every connected device that announces the ``deploy`` capability is
sent the sub-network its budget serves (planned by ``coordinator.federation``'s ``make_order``); an
operator can ask for one device's deploy at any time. Every deploy is bounded (``[deploy]
timeout_s``: transfer, export, checks and answer), and its outcome is logged and recorded in
:attr:`DeployService.records` and ``run_dir/deployments.json``. A device's answer (or its failure:
an Error, a violation, a Bye, a lost connection) reaches the deploy awaiting it through
:meth:`DeployService.answer`, which the device's session calls first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from coordinator.federation import DeployConfig, DeployOrder, DeployOutcome, FederationEngine, make_order, outcome
from coordinator.serve._connection import CLOSE_TRY_AGAIN, Connection, close_quietly, start_thread, write_atomic
from edge_sdk import format_bytes
from edge_sdk._errors import EdgeFMError, ProtocolError
from edge_sdk.protocol import EncodedTensors, prepare_tensors

__all__ = ["DEPLOYMENTS_FILE", "DeployService", "deploy_task_id"]

logger = logging.getLogger(__name__)

DEPLOYMENTS_FILE = "deployments.json"
_Answer = tuple[bool, dict[str, float], str]  # ok, metrics, message


def deploy_task_id(round_: int, device_id: str) -> str:
    return f"d{round_}-{device_id}-{uuid.uuid4().hex[:8]}"


class DeployService:
    """Deploys to the connections of one server (``connections``: device name -> live connection)."""

    def __init__(
        self,
        engine: FederationEngine,
        config: DeployConfig | None,
        connections: Mapping[str, Connection],
        *,
        run_dir: Path | None,
        concurrency: int,
        wake: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.config = config  # None or enabled = false: no deploys at all
        self.records: list[DeployOutcome] = []
        self.busy: set[str] = set()  # devices a deploy is being prepared for or sent to
        self.stopping = False
        self._connections = connections
        self._run_dir = run_dir
        self._waiters: dict[str, asyncio.Future[_Answer]] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._wake = wake

    @property
    def enabled(self) -> bool:
        return self.config is not None and self.config.enabled

    def refusal(self, device_id: str) -> str | None:
        """Why ``device_id`` cannot be sent a deploy now, or None."""
        if not self.enabled:
            return "deployment is off ([deploy] enabled = false)"
        if self.stopping:
            return "the coordinator is stopping"
        connection = self._connections.get(device_id)
        if connection is None or not connection.session.admitted:
            return "not connected"
        hello = connection.session.conn.hello
        if hello is None or "deploy" not in hello.capabilities:
            return "its SDK does not deploy models (no 'deploy' capability in its Hello)"
        if device_id in self.busy:
            return "a deploy to it is already running"
        if not connection.idle:
            return "busy with a task"
        return None

    def answer(self, task_id: str, ok: bool, metrics: Mapping[str, float], message: str) -> bool:
        """Hand a device's answer (or its failure) to the deploy awaiting it; False if none is."""
        waiter = self._waiters.pop(task_id, None)
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_result((ok, dict(metrics), message))
        return True

    async def deploy_all(self) -> list[DeployOutcome]:
        """Deploy to every connected device at once (sends bounded by ``send_concurrency``)."""
        names = sorted(name for name, c in self._connections.items() if c.session.admitted)
        if not names:
            logger.info("deploy: no device connected")
            return []
        logger.info("deploying inference models to %d device(s): %s", len(names), ", ".join(names))
        results = await asyncio.gather(*(self.deploy(name) for name in names), return_exceptions=True)
        done: list[DeployOutcome] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, DeployOutcome):
                done.append(result)
            elif isinstance(result, Exception):  # a bug must cost one deploy, never the run's end
                logger.error("deploy to %s: internal error", name, exc_info=result)
            else:
                raise result  # CancelledError, KeyboardInterrupt: the server is stopping
        return done

    async def deploy(self, device_id: str, *, task_id: str | None = None) -> DeployOutcome:
        """Send ``device_id`` its inference sub-network of the current global model; await its answer.

        Never raises for the device's faults: the outcome says "ok", "failed" (the device refused or
        failed the export, disconnected, or the transfer failed), "timeout" (``[deploy] timeout_s``) or
        "skipped" (not connected, busy, or its SDK does not deploy). Every outcome is logged and recorded.
        """
        config = self.config or DeployConfig()
        task_id = task_id or deploy_task_id(self.engine.round, device_id)
        refusal = self.refusal(device_id)
        if refusal is not None:
            return self._record(DeployOutcome(device_id, task_id, self.engine.round, "skipped", refusal))
        self.busy.add(device_id)
        try:
            return self._record(await self._deploy(device_id, task_id, config))
        finally:
            self.busy.discard(device_id)
            self._waiters.pop(task_id, None)
            self._wake()

    async def _deploy(self, device_id: str, task_id: str, config: DeployConfig) -> DeployOutcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + config.timeout_s
        async with self._limit:  # bounds the extracted weights held at once
            try:
                order = await start_thread(make_order, self.engine, device_id, config, task_id)
            except (EdgeFMError, KeyError) as exc:
                reason = f"cannot plan its inference sub-network: {exc}"
                return DeployOutcome(device_id, task_id, self.engine.round, "failed", reason)
            if not order.plan.fits:
                return outcome(dataclasses.replace(order, tensors={}), "skipped", _no_fit(order))
            waiter: asyncio.Future[_Answer] = loop.create_future()
            self._waiters[task_id] = waiter
            try:
                sent = await asyncio.wait_for(self._send(order), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                reason = f"the transfer did not finish within {config.timeout_s:.0f} s"
                return outcome(order, "timeout", reason, seconds=loop.time() - started)
            if isinstance(sent, str):
                return outcome(order, "failed", sent, seconds=loop.time() - started)
            order = dataclasses.replace(order, tensors={})  # sent: free the weights before the long wait
        try:
            ok, metrics, message = await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            reason = f"no answer within {config.timeout_s:.0f} s"
            return outcome(order, "timeout", reason, bytes_out=sent, seconds=loop.time() - started)
        return outcome(
            order,
            "ok" if ok else "failed",
            message if not ok else "",
            metrics=metrics,
            bytes_out=sent,
            seconds=loop.time() - started,
        )

    async def _send(self, order: DeployOrder) -> int | str:
        """Send a Deploy and its weights; the bytes sent, or why it could not be sent."""
        try:  # laid out and hashed off the event loop
            tensors: EncodedTensors | Mapping[str, Any] = await asyncio.to_thread(prepare_tensors, order.tensors)
        except ProtocolError:
            tensors = order.tensors  # send_deploy raises it again, and it is reported below
        connection = self._connections.get(order.device_id)
        if connection is None or not connection.idle:
            return "disconnected or busy before its model was sent"
        try:
            connection.session.conn.send_deploy(
                task_id=order.task_id,
                round=order.round,
                spec=order.plan.inference.spec.to_dict(),
                model_config=order.model_config,
                settings=order.settings,
                tensors=tensors,
            )
        except ProtocolError as exc:  # e.g. the device's transfer limit is below the sub-network
            return f"cannot send: {exc}"
        try:
            sent = await connection.flush()
        except ConnectionClosed:
            return "disconnected while its model was sent"
        except asyncio.CancelledError:  # the deploy timed out mid-transfer: the stream is cut, so is the link
            await close_quietly(connection.ws, CLOSE_TRY_AGAIN, "deploy timed out during the transfer")
            raise
        logger.info("sent deploy %s to %s (%.1f MB)", order.task_id, order.device_id, sent / 1e6)
        return sent

    def _record(self, result: DeployOutcome) -> DeployOutcome:
        self.records.append(result)
        logger.log(logging.INFO if result.ok else logging.WARNING, "%s", result.log_line())
        if self._run_dir is not None:
            try:
                text = json.dumps([d.to_json() for d in self.records], indent=1) + "\n"
                write_atomic(self._run_dir / DEPLOYMENTS_FILE, text)
            except OSError as exc:
                logger.warning("cannot write %s: %s", self._run_dir / DEPLOYMENTS_FILE, exc)
        return result


def _no_fit(order: DeployOrder) -> str:
    """Why a deploy whose export fits not even the device's training sub-network is not sent."""
    plan = order.plan
    return (
        f"its budget fits no deploy: the smallest it may serve (the {plan.training.params / 1e6:.1f}M-parameter"
        f" sub-network it trains) is predicted at {format_bytes(plan.inference.estimate.total)} to export and"
        f" serve, above its deploy budget of {format_bytes(plan.budget_bytes)}"
    )
