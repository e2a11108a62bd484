"""The coordinator's websocket server: devices connect, the federation engine's rounds go out to them.

All round logic lives in :class:`~coordinator._engine.FederationEngine`; this module is transport:

- ``process_request`` checks the device's bearer token before the websocket opens (HTTP 401, no model
  byte sent) and bounds the number of connections (HTTP 503);
- TLS through an ``ssl`` context; ``max_size`` is the protocol's frame limit; no compression;
- each connection runs a :class:`~edge_sdk.protocol.CoordinatorConnection`: frames in, events out;
  a device's fault (bad frame, wrong version, oversized message, wrong tensors, NaN) gets an Error
  and a close code, is logged, and fails only that device's task;
- the round loop waits (bounded) for devices, sends each order, waits for the results until the
  deadline, and has the engine aggregate (in a worker thread) and the checkpoint written.

Every wait is bounded: the Hello (``hello_timeout_s``), devices before a round (``device_wait_s``),
results (``round_deadline_s``), sends (websocket keepalive) and closes (``close_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from edge_sdk._closecodes import CLOSE_REJECTED, CLOSE_REPLACED, CLOSE_RUN_COMPLETE
from edge_sdk._errors import BudgetError, EdgeFMError, ProfileError, ProtocolError
from edge_sdk.protocol import (
    ByeReceived,
    ConnectionLost,
    ConnectionState,
    CoordinatorConnection,
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

from ._checkpoint import save_checkpoint
from ._config import ServerConfig
from ._engine import FederationEngine, TrainOrder
from ._security import TokenTable

__all__ = ["CoordinatorServer", "RunAbortedError"]

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0
_CLOSE_TRY_AGAIN = 1013  # RFC 6455 "try again later": the device reconnects


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
    ) -> None:
        self.engine = engine
        self.config = config
        self.run_dir = run_dir
        self.keep_checkpoints = keep_checkpoints
        self._tokens = TokenTable(tokens)
        self._ssl = ssl_context
        self._limits = WireLimits(max_chunk_bytes=config.chunk_bytes)
        self._sessions: dict[str, _Session] = {}
        self._admitted: dict[ServerConnection, str] = {}  # passed the token check, handler not started
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._stopping = False
        self._background: set[asyncio.Future[None]] = set()
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
            while not self.engine.finished:
                await self._one_round()
            logger.info("run complete: %d rounds", self.engine.round)
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
        return sorted(name for name, s in self._sessions.items() if s.idle)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))

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
            session.conn.send_train_task(
                task_id=order.task_id,
                round=order.round,
                spec=order.spec.to_dict(),
                model_config=order.model_config,
                settings=order.settings,
                tensors=order.tensors,
                max_update_norm=order.max_update_norm,
            )
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

    # ----------------------------------------------------------------------------- connections

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
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
        elif isinstance(event, ErrorReceived):
            error = event.error
            logger.warning(
                "device %s reports %s%s: %s",
                name,
                error.code,
                f" for task {error.task_id}" if error.task_id else "",
                error.message,
            )
            if error.task_id:
                engine.task_failed(error.task_id, f"device error {error.code}: {error.message[:200]}")
            self._wake()
        elif isinstance(event, ProtocolViolation):
            logger.warning(
                "device %s broke the protocol (close %d): %s", name, event.close_code, event.reason
            )
            if event.task_id:
                engine.task_failed(event.task_id, f"protocol violation: {event.reason[:200]}")
            self._wake()
            return False
        elif isinstance(event, ByeReceived):
            logger.info("device %s says goodbye (%d %s)", name, event.bye.code, event.bye.reason)
            if event.pending_task_id:
                engine.task_failed(event.pending_task_id, "device left")
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
                self.engine.task_failed(event.pending_task_id, f"disconnected (code {code})")

    @staticmethod
    async def _close(ws: ServerConnection, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code, reason), _CLOSE_TIMEOUT_S + 1)


def _peer(connection: ServerConnection) -> str:
    address: Any = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
