"""The coordinator's websocket server: devices connect, the federation engine's rounds go out to them.

All round logic lives in :class:`~coordinator.federation._engine.FederationEngine`; this module is transport:

- ``process_request`` checks the device's bearer token before the websocket opens (HTTP 401, no model
  byte sent) and bounds the number of connections (HTTP 503);
- TLS through an ``ssl`` context; ``max_size`` is the protocol's frame limit; no compression;
- each connection runs a :class:`~edge_sdk.protocol.CoordinatorConnection`: frames in, events out;
  a device's fault (bad frame, wrong version, oversized message, wrong tensors, NaN) gets an Error
  and a close code, is logged, and fails only that device's task;
- the round loop waits (bounded) for devices, sends each order, waits for the results until the
  deadline, and has the engine aggregate (in a worker thread) and the checkpoint written;
- when the last round is done, every connected device that announces the ``deploy`` capability is sent
  its inference sub-network (``_deploy``) and the answers are recorded in ``run_dir/deployments.json``;
  :meth:`CoordinatorServer.deploy` does the same for one device on demand, and so does an operator's
  ``GET /deploy/<device>`` with ``Authorization: Bearer <[deploy] operator_token>`` (``GET
  /deployments`` lists the records).

Every wait is bounded: the Hello (``hello_timeout_s``), devices before a round (``device_wait_s``),
results (``round_deadline_s``), deploys (``[deploy] timeout_s``), sends (websocket keepalive) and
closes (``close_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from coordinator.federation import (
    DeployConfig,
    DeployOrder,
    DeployOutcome,
    FederationEngine,
    ServerConfig,
    TrainOrder,
    make_order,
    outcome,
    save_checkpoint,
)
from coordinator.serve._security import TokenTable
from edge_sdk._errors import BudgetError, EdgeFMError, ProfileError, ProtocolError
from edge_sdk.protocol import (
    CLOSE_REJECTED,
    CLOSE_REPLACED,
    CLOSE_RUN_COMPLETE,
    ByeReceived,
    ConnectionLost,
    ConnectionState,
    CoordinatorConnection,
    DeployResultReceived,
    ErrorCode,
    ErrorReceived,
    Event,
    HelloReceived,
    ProtocolViolation,
    UpdateReceived,
    UpdateRejected,
    WireLimits,
    thaw_json,
)

__all__ = ["CoordinatorServer", "RunAbortedError"]

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0
_CLOSE_TRY_AGAIN = 1013  # RFC 6455 "try again later": the device reconnects
DEPLOYMENTS_FILE = "deployments.json"
_DeployAnswer = tuple[bool, dict[str, float], str]  # ok, metrics, message


class RunAbortedError(EdgeFMError):
    """Not enough devices came within the wait; the last checkpoint stands (resume later)."""


class _Session:
    """One device's live connection: its websocket, its protocol state machine, its counters."""

    def __init__(self, name: str, ws: ServerConnection, limits: WireLimits) -> None:
        self.name = name
        self.ws = ws
        self.conn = CoordinatorConnection(limits=limits)
        self.send_lock = asyncio.Lock()
        self.admitted = False
        self.bytes_in = 0
        self.mark_in = 0  # bytes_in when the current task was sent

    @property
    def idle(self) -> bool:
        return self.admitted and self.conn.state is ConnectionState.READY and self.ws.state is State.OPEN

    async def flush(self) -> int:
        """Send everything the state machine queued, in order; returns the bytes sent."""
        sent = 0
        async with self.send_lock:
            for frame in self.conn.data_to_send():
                await self.ws.send(frame)
                sent += len(frame)
        return sent


class CoordinatorServer:
    """Serve one run: ``await server.run()`` returns when every round is done (or raises RunAbortedError)."""

    def __init__(
        self,
        engine: FederationEngine,
        config: ServerConfig,
        tokens: Mapping[str, str],
        *,
        run_dir: Path | None = None,
        keep_checkpoints: int = 3,
        ssl_context: ssl.SSLContext | None = None,
        deploy: DeployConfig | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.run_dir = run_dir
        self.keep_checkpoints = keep_checkpoints
        self.deploy_config = deploy  # None or enabled = false: no deploys at all
        self.deployments: list[DeployOutcome] = []
        self._deploy_waiters: dict[str, asyncio.Future[_DeployAnswer]] = {}
        self._deploying: set[str] = set()
        self._deploy_limit = asyncio.Semaphore(config.send_concurrency)
        operator = deploy.operator_token if deploy is not None else None
        self._operator = TokenTable({"operator": operator}) if operator else None
        self._tokens = TokenTable(tokens)
        self._ssl = ssl_context
        self._limits = WireLimits(max_chunk_bytes=config.chunk_bytes)
        self._sessions: dict[str, _Session] = {}
        self._admitted: dict[ServerConnection, str] = {}  # passed the token check, handler not started
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._stopping = False
        self._background: set[asyncio.Future[Any]] = set()
        self.port: int | None = None

    # --------------------------------------------------------------------------------- serving

    async def start(self) -> int:
        """Listen; returns the bound port (also logged, and written to ``port_file`` if set)."""
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            ssl=self._ssl,
            process_request=self._process_request,
            max_size=self._limits.max_frame_bytes,
            compression=None,
            open_timeout=self.config.hello_timeout_s,
            close_timeout=_CLOSE_TIMEOUT_S,
            ping_interval=20,
            ping_timeout=20,
        )
        sockets = list(self._server.sockets)
        self.port = int(sockets[0].getsockname()[1])
        scheme = "wss" if self._ssl is not None else "ws"
        logger.info(
            "listening on %s://%s:%d (%d devices may connect)",
            scheme,
            self.config.host,
            self.port,
            len(self._tokens),
        )
        if self.config.port_file is not None:
            _write_atomic(self.config.port_file, f"{self.port}\n")
        return self.port

    async def run(self) -> None:
        """Start (if needed) and drive rounds until the run is finished; then say goodbye to devices."""
        if self._server is None:
            await self.start()
        try:
            was_finished = self.engine.finished
            while not self.engine.finished:
                await self._one_round()
            logger.info("run complete: %d rounds", self.engine.round)
            if self._deploys_on:
                if was_finished:  # a finished run resumed: its devices have yet to come back
                    await self._wait_for_idle(self.engine.federation.device_wait_s)
                await self.deploy_all()
            await self._close_all(CLOSE_RUN_COMPLETE, "run complete")
        finally:
            await self.stop()

    async def stop(self, code: int = 1001, reason: str = "coordinator shutting down") -> None:
        """Close every connection (devices will reconnect unless the run is complete) and the listener."""
        if self._stopping:
            return
        self._stopping = True
        await self._close_all(code, reason)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _CLOSE_TIMEOUT_S + 5)

    async def _close_all(self, code: int, reason: str) -> None:
        sessions = list(self._sessions.values())
        for session in sessions:
            with contextlib.suppress(ProtocolError, ConnectionClosed):
                if session.conn.state is not ConnectionState.CLOSED:
                    session.conn.send_bye(reason=reason, code=code)
                    await asyncio.wait_for(session.flush(), _CLOSE_TIMEOUT_S)
        await asyncio.gather(*(self._close(s.ws, code, reason) for s in sessions), return_exceptions=True)

    # ---------------------------------------------------------------------------------- rounds

    def _idle(self) -> list[str]:
        """Devices a round may take: connected, admitted, no task outstanding, no deploy in preparation."""
        return sorted(name for name, s in self._sessions.items() if s.idle and name not in self._deploying)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))

    async def _wait_for_idle(self, wait_s: float) -> None:
        """Wait (at most ``wait_s``) until the devices a round would wait for are connected and idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(self._idle()) < self.engine.wait_target() and loop.time() < deadline:
            await self._wait_change(deadline - loop.time())

    async def _wait_for_devices(self) -> list[str]:
        loop = asyncio.get_running_loop()
        wait_s = self.engine.federation.device_wait_s
        deadline = loop.time() + wait_s
        reported = -1
        while True:
            idle, target = self._idle(), self.engine.wait_target()
            if len(idle) >= target:
                return idle
            if loop.time() >= deadline:
                break
            if len(idle) != reported:
                logger.info(
                    "round %d: waiting for devices: %d of %d idle (at most %.0f s more)",
                    self.engine.round + 1,
                    len(idle),
                    target,
                    deadline - loop.time(),
                )
                reported = len(idle)
            await self._wait_change(deadline - loop.time())
        idle = self._idle()
        if self.engine.can_start(len(idle)):
            logger.info(
                "round %d: starting with %d device(s) after waiting %.0f s",
                self.engine.round + 1,
                len(idle),
                wait_s,
            )
            return idle
        raise RunAbortedError(
            f"round {self.engine.round + 1}: only {len(idle)} device(s) after waiting {wait_s:.0f} s,"
            f" at least {self.engine.federation.min_devices} needed;"
            f" the checkpoint of round {self.engine.round} stands"
            " (restart with --resume)"
        )

    async def _one_round(self) -> None:
        loop = asyncio.get_running_loop()
        idle = await self._wait_for_devices()
        started = time.monotonic()
        digest = await asyncio.to_thread(self.engine.weights_digest)
        logger.info("round %d starts from global weights sha256 %s", self.engine.round + 1, digest)
        orders = self.engine.begin_round(idle, loop.time())
        limit = asyncio.Semaphore(self.config.send_concurrency)

        async def send(order: TrainOrder) -> None:
            async with limit:
                await self._send_order(order)

        # Sends run alongside the wait: a slow link cannot hold the round past its deadline.
        sends = [asyncio.ensure_future(send(order)) for order in orders]
        while not self.engine.settled(loop.time()):
            deadline = self.engine.deadline
            assert deadline is not None
            await self._wait_change(deadline - loop.time())
        self.engine.close_round(loop.time())
        for task in sends:
            task.cancel()  # a no-op for the finished ones
        await asyncio.gather(*sends, return_exceptions=True)
        summary = await asyncio.to_thread(self.engine.finish_round)
        where = ""
        if self.run_dir is not None:
            state = self.engine.snapshot()
            saving = asyncio.ensure_future(
                asyncio.to_thread(save_checkpoint, self.run_dir, state, keep=self.keep_checkpoints)
            )
            path = await asyncio.shield(saving)  # a stop request must not interrupt the write
            where = f"; checkpoint {path}"
        logger.info("%s; %.1f s%s", summary.log_line(), time.monotonic() - started, where)

    async def _send_order(self, order: TrainOrder) -> None:
        session = self._sessions.get(order.device_id)
        if session is None or not session.idle:
            self.engine.task_failed(order.task_id, "disconnected before its task was sent")
            return
        try:
            order.send(session.conn)
        except ProtocolError as exc:  # e.g. the device's transfer limit is below the sub-network
            logger.warning("round %d: cannot send task to %s: %s", order.round, order.device_id, exc)
            self.engine.task_failed(order.task_id, f"cannot send: {exc}")
            return
        session.mark_in = session.bytes_in
        try:
            sent = await session.flush()
        except ConnectionClosed:
            self.engine.task_failed(order.task_id, "disconnected while its task was sent")
            self._wake()
            return
        except asyncio.CancelledError:  # the deadline passed mid-transfer: the stream is cut, so is the link
            logger.warning(
                "round %d: deadline passed while sending to %s: closing", order.round, order.device_id
            )
            await self._close(session.ws, _CLOSE_TRY_AGAIN, "round deadline passed during the transfer")
            raise
        self.engine.record_traffic(order.device_id, bytes_out=sent)
        logger.info(
            "round %d: sent task %s to %s (%.1f MB)", order.round, order.task_id, order.device_id, sent / 1e6
        )

    # --------------------------------------------------------------------------------- deploys

    @property
    def _deploys_on(self) -> bool:
        return self.deploy_config is not None and self.deploy_config.enabled

    def _deploy_refusal(self, device_id: str) -> str | None:
        """Why ``device_id`` cannot be sent a deploy now, or None."""
        if not self._deploys_on:
            return "deployment is off ([deploy] enabled = false)"
        if self._stopping:
            return "the coordinator is stopping"
        session = self._sessions.get(device_id)
        if session is None or not session.admitted:
            return "not connected"
        hello = session.conn.hello
        if hello is None or "deploy" not in hello.capabilities:
            return "its SDK does not deploy models (no 'deploy' capability in its Hello)"
        if device_id in self._deploying:
            return "a deploy to it is already running"
        if not session.idle:
            return "busy with a task"
        return None

    async def deploy_all(self) -> list[DeployOutcome]:
        """Deploy to every connected device at once (sends bounded by ``send_concurrency``)."""
        names = sorted(name for name, s in self._sessions.items() if s.admitted)
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
        "skipped" (not connected, busy, or its SDK does not deploy). Every outcome is logged and recorded
        (:attr:`deployments`, and ``run_dir/deployments.json``).
        """
        config = self.deploy_config or DeployConfig()
        task_id = task_id or _deploy_task_id(self.engine.round, device_id)
        refusal = self._deploy_refusal(device_id)
        if refusal is not None:
            return self._record(DeployOutcome(device_id, task_id, self.engine.round, "skipped", refusal))
        self._deploying.add(device_id)
        try:
            return self._record(await self._deploy(device_id, task_id, config))
        finally:
            self._deploying.discard(device_id)
            self._deploy_waiters.pop(task_id, None)
            self._wake()

    async def _deploy(self, device_id: str, task_id: str, config: DeployConfig) -> DeployOutcome:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + config.timeout_s
        async with self._deploy_limit:  # bounds the extracted weights held at once
            try:
                order = await asyncio.to_thread(make_order, self.engine, device_id, config, task_id)
            except (EdgeFMError, KeyError) as exc:
                reason = f"cannot plan its inference sub-network: {exc}"
                return DeployOutcome(device_id, task_id, self.engine.round, "failed", reason)
            waiter: asyncio.Future[_DeployAnswer] = loop.create_future()
            self._deploy_waiters[task_id] = waiter
            try:
                sent = await asyncio.wait_for(self._send_deploy(order), max(0.0, deadline - loop.time()))
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

    async def _send_deploy(self, order: DeployOrder) -> int | str:
        """Send a Deploy and its weights; the bytes sent, or why it could not be sent."""
        session = self._sessions.get(order.device_id)
        if session is None or not session.idle:
            return "disconnected or busy before its model was sent"
        try:
            session.conn.send_deploy(
                task_id=order.task_id,
                round=order.round,
                spec=order.plan.inference.spec.to_dict(),
                model_config=order.model_config,
                settings=order.settings,
                tensors=order.tensors,
            )
        except ProtocolError as exc:  # e.g. the device's transfer limit is below the sub-network
            return f"cannot send: {exc}"
        try:
            sent = await session.flush()
        except ConnectionClosed:
            return "disconnected while its model was sent"
        except asyncio.CancelledError:  # the deploy timed out mid-transfer: the stream is cut, so is the link
            await self._close(session.ws, _CLOSE_TRY_AGAIN, "deploy timed out during the transfer")
            raise
        logger.info("sent deploy %s to %s (%.1f MB)", order.task_id, order.device_id, sent / 1e6)
        return sent

    def _deploy_answered(self, task_id: str | None, ok: bool, metrics: Mapping[str, float], message: str) -> bool:
        """Hand a device's answer (or its failure) to the deploy awaiting it; False if none is."""
        waiter = self._deploy_waiters.pop(task_id, None) if task_id else None
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_result((ok, dict(metrics), message))
        return True

    def _record(self, result: DeployOutcome) -> DeployOutcome:
        self.deployments.append(result)
        logger.log(logging.INFO if result.ok else logging.WARNING, "%s", result.log_line())
        if self.run_dir is not None:
            try:
                text = json.dumps([d.to_json() for d in self.deployments], indent=1) + "\n"
                _write_atomic(self.run_dir / DEPLOYMENTS_FILE, text)
            except OSError as exc:
                logger.warning("cannot write %s: %s", self.run_dir / DEPLOYMENTS_FILE, exc)
        return result

    def _operator_request(self, connection: ServerConnection, request: Request) -> Response:
        """``GET /deploy/<device>`` (start a deploy: 202) and ``GET /deployments`` (the records: 200)."""
        peer = _peer(connection)
        if self._operator is None or not self._deploys_on:
            return _json_response(
                connection,
                http.HTTPStatus.NOT_FOUND,
                {"error": "on-demand deploys are off: set [deploy] operator_token (and enabled = true)"},
            )
        if self._operator.identify(request.headers.get("Authorization")) is None:
            logger.warning("refused an operator request from %s: missing or wrong operator token", peer)
            response = _json_response(connection, http.HTTPStatus.UNAUTHORIZED, {"error": "bad operator token"})
            response.headers["WWW-Authenticate"] = 'Bearer realm="edge-fm operator"'
            return response
        path = request.path.split("?", 1)[0].rstrip("/")
        if path == "/deployments":
            return _json_response(
                connection, http.HTTPStatus.OK, {"deployments": [d.to_json() for d in self.deployments]}
            )
        device_id = path[len("/deploy/") :] if path.startswith("/deploy/") else ""
        if not device_id or "/" in device_id:
            return _json_response(
                connection, http.HTTPStatus.NOT_FOUND, {"error": "use GET /deploy/<device> or GET /deployments"}
            )
        refusal = self._deploy_refusal(device_id)
        if refusal is not None:
            status = http.HTTPStatus.NOT_FOUND if refusal == "not connected" else http.HTTPStatus.CONFLICT
            return _json_response(connection, status, {"device": device_id, "error": refusal})
        task_id = _deploy_task_id(self.engine.round, device_id)
        running = asyncio.ensure_future(self.deploy(device_id, task_id=task_id))
        self._background.add(running)
        running.add_done_callback(self._background.discard)
        logger.info("operator at %s asked for a deploy to %s: %s", peer, device_id, task_id)
        return _json_response(
            connection,
            http.HTTPStatus.ACCEPTED,
            {"device": device_id, "task_id": task_id, "round": self.engine.round, "status": "started"},
        )

    # ----------------------------------------------------------------------------- connections

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0].startswith(("/deploy/", "/deployments")):
            return self._operator_request(connection, request)
        name = self._tokens.identify(request.headers.get("Authorization"))
        peer = _peer(connection)
        if name is None:
            logger.warning("refused a connection from %s: missing or unknown bearer token (HTTP 401)", peer)
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or unknown bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="edge-fm"'
            return response
        self._admitted = {c: n for c, n in self._admitted.items() if c.state is not State.CLOSED}
        if self._stopping or len(self._sessions) + len(self._admitted) >= self.config.max_connections:
            logger.warning(
                "refused %s from %s: %d connections is the limit (HTTP 503)",
                name,
                peer,
                self.config.max_connections,
            )
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, retry later\n"
            )
        self._admitted[connection] = name
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        name = self._admitted.pop(ws, None)
        if name is None:  # cannot happen: process_request admitted it
            await self._close(ws, 1008, "not authorized")
            return
        session = _Session(name, ws, self._limits)
        previous = self._sessions.get(name)
        self._sessions[name] = session
        if previous is not None:
            logger.info("device %s connected again: closing its previous connection", name)
            self._lost(previous, CLOSE_REPLACED, "replaced by a new connection")
            closing = asyncio.ensure_future(
                self._close(previous.ws, CLOSE_REPLACED, "replaced by a new connection")
            )
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)
        logger.info("device %s connected from %s", name, _peer(ws))
        try:
            await self._converse(session)
        except ConnectionClosed:
            pass
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("device %s: internal error", name)
            await self._close(ws, 1011, "internal error")
        finally:
            self._lost(session, ws.close_code, ws.close_reason or "")
            clean = ws.close_code in (1000, 1001, CLOSE_REPLACED, CLOSE_RUN_COMPLETE)
            logger.log(
                logging.INFO if clean else logging.WARNING,
                "device %s disconnected (code %s%s)",
                name,
                ws.close_code,
                f" {ws.close_reason}" if ws.close_reason else "",
            )
            if self._sessions.get(name) is session:
                del self._sessions[name]
                self.engine.device_disconnected(name)
            self._wake()

    async def _converse(self, session: _Session) -> None:
        ws = session.ws
        try:
            first = await asyncio.wait_for(ws.recv(), self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            logger.warning(
                "device %s sent no Hello within %.0f s: closing", session.name, self.config.hello_timeout_s
            )
            await self._close(ws, 1008, "no Hello in time")
            return
        if not await self._on_frame(session, first):
            return
        async for frame in ws:
            if not await self._on_frame(session, frame):
                return

    async def _on_frame(self, session: _Session, frame: str | bytes) -> bool:
        """Handle one frame; False when the connection is over."""
        if isinstance(frame, (bytes, bytearray)):
            session.bytes_in += len(frame)
        else:
            session.bytes_in += len(frame.encode("utf-8"))
        events = session.conn.receive(frame)
        keep_going = True
        for event in events:
            keep_going = self._on_event(session, event) and keep_going
        await session.flush()
        if not keep_going:
            violation = next((e for e in events if isinstance(e, ProtocolViolation)), None)
            if violation is not None:
                await self._close(session.ws, violation.close_code, violation.close_reason)
            else:
                bye = next((e for e in events if isinstance(e, ByeReceived)), None)
                code = bye.bye.code if bye is not None else CLOSE_REJECTED
                await self._close(session.ws, code, bye.bye.reason if bye is not None else "rejected")
        return keep_going

    def _on_event(self, session: _Session, event: Event) -> bool:
        name, engine, now = session.name, self.engine, asyncio.get_running_loop().time()
        if isinstance(event, HelloReceived):
            return self._admit(session, event)
        if isinstance(event, UpdateReceived):
            update = event.update
            engine.record_traffic(name, bytes_in=session.bytes_in - session.mark_in)
            outcome = engine.accept_update(
                update.task_id,
                event.tensors,
                num_samples=update.num_samples,
                now=now,
                encoding=update.encoding,
                metrics=update.metrics,
                peak_rss_bytes=update.peak_rss_bytes,
                step_time_s=update.step_time_s,
                values_checked=True,  # the protocol checked finite values and the norm bound
            )
            if outcome.status != "ok":
                logger.warning(
                    "device %s: update for %s not used: %s (%s)",
                    name,
                    update.task_id,
                    outcome.status,
                    outcome.reason,
                )
            self._wake()
        elif isinstance(event, UpdateRejected):
            logger.warning("device %s: update for %s rejected: %s", name, event.task_id, event.reason)
            engine.task_failed(event.task_id, f"update rejected: {event.reason}")
            self._wake()
        elif isinstance(event, DeployResultReceived):
            result = event.result
            if not self._deploy_answered(result.task_id, result.ok, result.metrics, result.message):
                logger.warning("device %s: late answer to deploy %s ignored", name, result.task_id)
            self._wake()
        elif isinstance(event, ErrorReceived):
            error = event.error
            logger.warning(
                "device %s reports %s%s: %s",
                name,
                error.code,
                f" for task {error.task_id}" if error.task_id else "",
                error.message,
            )
            reason = f"device error {error.code}: {error.message[:200]}"
            if error.task_id and not self._deploy_answered(error.task_id, False, {}, reason):
                engine.task_failed(error.task_id, reason)
            self._wake()
        elif isinstance(event, ProtocolViolation):
            logger.warning(
                "device %s broke the protocol (close %d): %s", name, event.close_code, event.reason
            )
            reason = f"protocol violation: {event.reason[:200]}"
            if event.task_id and not self._deploy_answered(event.task_id, False, {}, reason):
                engine.task_failed(event.task_id, reason)
            self._wake()
            return False
        elif isinstance(event, ByeReceived):
            logger.info("device %s says goodbye (%d %s)", name, event.bye.code, event.bye.reason)
            pending = event.pending_task_id
            if pending and not self._deploy_answered(pending, False, {}, "device left"):
                engine.task_failed(pending, "device left")
            self._wake()
            return False
        else:
            logger.info("device %s: ignoring %s", name, type(event).__name__)
        return True

    def _admit(self, session: _Session, event: HelloReceived) -> bool:
        hello = event.hello
        try:
            plan = self.engine.admit(session.name, thaw_json(hello.profile))
        except (BudgetError, ProfileError) as exc:
            logger.warning("device %s refused: %s", session.name, exc)
            session.conn.send_error(code=ErrorCode.REJECTED, message=str(exc)[:2000])
            session.conn.send_bye(reason="rejected", code=CLOSE_REJECTED)
            return False
        session.conn.send_welcome(
            run_id=self.engine.run_id,
            round=self.engine.round,
            server_time=time.time(),
            device_id=session.name,
        )
        session.admitted = True
        logger.info(
            "device %s (sdk %s, says it is %r) joined: %.2fM-parameter sub-network",
            session.name,
            hello.sdk_version,
            hello.device_id,
            plan.params / 1e6,
        )
        self._wake()
        return True

    def _lost(self, session: _Session, code: int | None, reason: str) -> None:
        """The connection is gone: a task it owed fails now (the round goes on without it)."""
        for event in session.conn.receive_close(code, reason):
            if isinstance(event, ConnectionLost) and event.pending_task_id:
                logger.warning(
                    "device %s disconnected (code %s) during task %s",
                    session.name,
                    code,
                    event.pending_task_id,
                )
                reason = f"disconnected (code {code})"
                if not self._deploy_answered(event.pending_task_id, False, {}, reason):
                    self.engine.task_failed(event.pending_task_id, reason)

    @staticmethod
    async def _close(ws: ServerConnection, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code, reason), _CLOSE_TIMEOUT_S + 1)


def _peer(connection: ServerConnection) -> str:
    address: Any = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _deploy_task_id(round_: int, device_id: str) -> str:
    return f"d{round_}-{device_id}-{uuid.uuid4().hex[:8]}"


def _json_response(connection: ServerConnection, status: http.HTTPStatus, doc: Mapping[str, Any]) -> Response:
    response = connection.respond(status, json.dumps(doc, indent=1) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
