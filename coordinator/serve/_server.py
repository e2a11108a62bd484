"""The coordinator's websocket server: devices connect, the federation's rounds go out to them.

This module is connections and I/O only. What a device's messages do to the run is the federation's
:class:`~coordinator.federation.DeviceSession` (one per connection); when rounds start, wait and end
is its :class:`~coordinator.federation.RoundLoop` (the simulator drives the same two). Here:

- the door (:class:`~coordinator.serve._gate.Gate`, websockets' ``process_request``) answers every
  HTTP request before a websocket opens: 400 for a doubled ``Authorization`` header, 401 for a
  missing or unknown bearer token (no model byte sent), 503 above ``max_connections`` sockets
  (counted from accept, half-open ones too), 409 for a device that is already connected; an
  operator's ``GET /deploy/<device>`` and ``GET /deployments`` go to :mod:`~coordinator.serve._operator`;
- **one connection per device**: a second connection with a device's token is refused (409) while the
  device's connection is open, so a stolen or copied token cannot evict the device or fail its task;
  a device whose old connection died silently gets back in once keepalive closes the old one (about
  40 s), retrying the 409 with its backoff;
- TLS through an ``ssl`` context; ``max_size`` is the protocol's frame limit; no compression; at most
  ``RECEIVE_QUEUE_FRAMES`` frame read ahead per connection, and binary messages taken frame by frame
  (``websocket_messages``: an update arriving holds a frame or two, at most 2 chunks, beyond its own
  buffer; a task being sent, less than one: see ``Connection.flush``);
- each connection feeds its frames to its session and sends what the session queued. The first frame
  (the Hello: admission plans the device's sub-network, a search of a tenth of a second or more) is
  handled in a worker thread, so other devices are served meanwhile. A device's fault (bad frame,
  wrong version, oversized message, wrong tensors, NaN) gets an Error and a close code, is logged
  (rate-limited per device), and fails only that device's task;
- the round loop's steps are carried out: wait for a change, send the orders (alongside the wait, so a
  slow link cannot hold a round past its deadline), merge and checkpoint in a worker thread;
- when the last round is done, every connected device that can is sent its inference sub-network
  (:mod:`~coordinator.serve._deploys`); :meth:`CoordinatorServer.deploy` does the same for one device.

Every wait is bounded: the upgrade request (``HANDSHAKE_TIMEOUT_S``), the Hello (``hello_timeout_s``),
devices before a round (``device_wait_s``), results (``round_deadline_s``), deploys (``[deploy]
timeout_s``), sends (websocket keepalive), closes (``close_timeout``) and :meth:`CoordinatorServer.stop`
(its ``grace``: then every socket still open is cut). A stop waits at most ``FINISH_GRACE_S`` for a
merge and checkpoint in progress; a checkpoint left unfinished is never half-written (the previous
one stands, and the round is redone on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from coordinator.federation import (
    DeployConfig,
    DeployOutcome,
    DeviceSession,
    FederationEngine,
    FinishRound,
    LogLimiter,
    RoundLoop,
    RoundObserver,
    RoundResult,
    RunAbortedError,
    SendOrders,
    ServerConfig,
    TrainOrder,
    WaitFor,
    clip,
    save_checkpoint,
)
from coordinator.serve._connection import (
    CHANNEL_GRACE_S,
    CLOSE_TIMEOUT_S,
    CLOSE_TRY_AGAIN,
    Changes,
    Connection,
    SharedEncodings,
    close_quietly,
    peer,
    start_thread,
    write_atomic,
)
from coordinator.serve._deploys import DEPLOYMENTS_FILE, DeployService
from coordinator.serve._gate import HANDSHAKE_TIMEOUT_S, Gate
from coordinator.serve._metrics import RunMetrics
from coordinator.serve._operator import OperatorHTTP
from coordinator.serve._security import TokenTable
from coordinator.serve._status import StatusBoard
from edge_sdk import DataChannel, serve_data_channels, websocket_messages
from edge_sdk._errors import ProtocolError
from edge_sdk.protocol import (
    CLOSE_REPLACED,
    CLOSE_RUN_COMPLETE,
    DEFAULT_MAX_TRANSFER_BYTES,
    ChannelTokens,
    ConnectionState,
    WireLimits,
)

__all__ = ["DEPLOYMENTS_FILE", "FINISH_GRACE_S", "CoordinatorServer", "RunAbortedError"]

logger = logging.getLogger(__name__)
_device_log = LogLimiter(logger)  # keyed by device name: connects and disconnects a device may cause

FINISH_GRACE_S = 2.0  # how long a stop waits for a merge and checkpoint in progress
# Frames websockets reads ahead per connection before it stops reading the socket (its default is 16,
# i.e. 16 to 64 MiB of chunks per device receiving an update).
RECEIVE_QUEUE_FRAMES = 1


def transfer_limit(engine: FederationEngine) -> int:
    """The most one update may carry: the protocol's default, or 1.25 x the model's float weights if
    more (a device that trains the full model densely may send every weight back as float32)."""
    floats = sum(t.numel() * 4 for t in engine.parent.state.values() if t.is_floating_point())
    return max(DEFAULT_MAX_TRANSFER_BYTES, floats + floats // 4)


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
        observer: RoundObserver | None = None,
    ) -> None:
        self.engine = engine
        self.observer = observer  # hears each round start, its answers, its end (terminal progress)
        self.config = config
        self.run_dir = run_dir
        self.keep_checkpoints = keep_checkpoints
        self._ssl = ssl_context
        self._limits = WireLimits(max_chunk_bytes=config.chunk_bytes, max_transfer_bytes=transfer_limit(engine))
        self._connections: dict[str, Connection] = {}  # admitted devices (their Hello handled)
        self._changes = Changes()
        self.deploys = DeployService(
            engine,
            deploy,
            self._connections,
            run_dir=run_dir,
            concurrency=config.send_concurrency,
            wake=self._changes.wake,
        )
        self._operator = OperatorHTTP(self.deploys, deploy.operator_token if deploy is not None else None)
        self._gate = Gate(TokenTable(tokens), config.max_connections, self._operator)
        self.metrics = RunMetrics(tokens)  # this server's Prometheus registry (its own, not the global one)
        self.status = StatusBoard(engine, self._connections, self.deploys, self.metrics)  # the status page's view
        self._server: Server | None = None
        self._channels: asyncio.Server | None = None  # the data channel listener (``edge_sdk.client._channel``)
        self._channel_tokens: ChannelTokens[Connection] = ChannelTokens()
        self.data_port: int | None = None
        self._stopping = False
        self._sends: list[asyncio.Future[None]] = []  # the open round's deliveries
        self.encodings = SharedEncodings()  # the open round's tensors, laid out once per sub-network
        self.port: int | None = None

    @property
    def deployments(self) -> list[DeployOutcome]:
        """Every deploy's outcome so far (also in ``run_dir/deployments.json``)."""
        return self.deploys.records

    async def deploy(self, device_id: str, *, task_id: str | None = None) -> DeployOutcome:
        """Send ``device_id`` its inference sub-network now and await its answer (see ``DeployService``)."""
        return await self.deploys.deploy(device_id, task_id=task_id)

    # --------------------------------------------------------------------------------- serving

    async def start(self, sock: socket.socket | None = None) -> int:
        """Listen (on ``sock`` if given: bound and listening already); returns the bound port (also
        logged, and written to ``port_file`` if set)."""
        where: dict[str, Any] = (
            {"sock": sock} if sock is not None else {"host": self.config.host, "port": self.config.port}
        )
        self._server = await serve(
            self._handle,
            **where,
            ssl=self._ssl,
            process_request=self._gate.process_request,
            create_connection=self._gate.connection_class(),
            max_size=self._limits.websocket_max_size,
            max_queue=RECEIVE_QUEUE_FRAMES,
            compression=None,
            open_timeout=min(self.config.hello_timeout_s, HANDSHAKE_TIMEOUT_S),
            close_timeout=CLOSE_TIMEOUT_S,
            ping_interval=20,
            ping_timeout=20,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        if self.config.data_channel:
            self._channels = await serve_data_channels(
                self.config.host,
                self.config.data_port,
                self._ssl,
                self._accept_channel,
                max_pending=self.config.max_connections,
            )
            self.data_port = int(next(iter(self._channels.sockets)).getsockname()[1])
            logger.info("data channels on port %d", self.data_port)
        scheme = "wss" if self._ssl is not None else "ws"
        logger.info(
            "listening on %s://%s:%d (%d devices may connect)",
            scheme,
            self.config.host,
            self.port,
            len(self._gate.tokens),
        )
        if self.config.port_file is not None:
            write_atomic(self.config.port_file, f"{self.port}\n")
        return self.port

    async def run(self) -> None:
        """Start (if needed) and drive rounds until the run is finished; then say goodbye to devices."""
        if self._server is None:
            await self.start()
        try:
            was_finished = self.engine.finished
            await self._rounds()
            logger.info("run complete: %d rounds", self.engine.round)
            if self.deploys.enabled:
                self.status.deploying = True
                if was_finished:  # a finished run resumed: its devices have yet to come back
                    await self._wait_for_idle(self.engine.federation.device_wait_s)
                await self.deploys.deploy_all()
                self.status.deploying = False
            await self.stop(CLOSE_RUN_COMPLETE, "run complete")
        finally:
            await self.stop()

    async def stop(
        self, code: int = 1001, reason: str = "coordinator shutting down", *, grace: float = CLOSE_TIMEOUT_S
    ) -> None:
        """Say goodbye to every device at once (they reconnect unless the run is complete), close the
        listener, and after at most ``grace`` seconds cut every socket still open."""
        if self._stopping:
            return
        self._stopping = self._gate.stopping = self.deploys.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for task in self._sends:
            task.cancel()
        self._operator.cancel()
        goodbyes = [asyncio.ensure_future(self._goodbye(c, code, reason)) for c in self._connections.values()]
        if goodbyes:
            await asyncio.wait(goodbyes, timeout=max(0.0, deadline - loop.time()))
        if self._server is not None:
            self._server.close()  # stop listening; 503 to requests under way, 1001 to the others
            closed = asyncio.ensure_future(self._server.wait_closed())
            await asyncio.wait({closed}, timeout=max(0.0, deadline - loop.time()))
            self._gate.abort_all()
            await asyncio.wait({closed}, timeout=0.5)  # handlers see their sockets cut at once
            closed.cancel()
        for task in goodbyes:
            task.cancel()
        if self._channels is not None:
            self._channels.close()

    async def _goodbye(self, connection: Connection, code: int, reason: str) -> None:
        with contextlib.suppress(ProtocolError, ConnectionClosed):
            if connection.session.conn.state is not ConnectionState.CLOSED:
                connection.session.conn.send_bye(reason=reason, code=code)
                await connection.flush()
        await close_quietly(connection.ws, code, reason)

    # ---------------------------------------------------------------------------------- rounds

    def _idle(self) -> list[str]:
        """Devices a round may take: connected, admitted, no task outstanding, no deploy in preparation."""
        if self._stopping:
            return []
        return sorted(name for name, c in self._connections.items() if c.idle and name not in self.deploys.busy)

    async def _wait_for_idle(self, wait_s: float) -> None:
        """Wait (at most ``wait_s``) until the devices a round would wait for are connected and idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(self._idle()) < self.engine.selection.wait_target() and loop.time() < deadline:
            await self._changes.wait(deadline - loop.time())

    async def _rounds(self) -> None:
        """Carry out the round loop's steps until the run is complete."""
        loop = asyncio.get_running_loop()
        checkpoint = None
        if self.run_dir is not None:
            run_dir = self.run_dir
            checkpoint = lambda state: save_checkpoint(run_dir, state, keep=self.keep_checkpoints)  # noqa: E731
        rounds = RoundLoop(self.engine, checkpoint=checkpoint, observer=self.observer)
        limit = asyncio.Semaphore(self.config.send_concurrency)
        started = time.monotonic()
        while True:
            step = rounds.poll(self._idle(), loop.time())
            if isinstance(step, WaitFor):
                await self._changes.wait(step.until - loop.time())
            elif isinstance(step, SendOrders):
                started = time.monotonic()
                self.status.orders_sent(step.orders)
                self.encodings.clear()
                self._sends = [asyncio.ensure_future(self._send_order(order, limit)) for order in step.orders]
            elif isinstance(step, FinishRound):
                for task in self._sends:
                    task.cancel()  # a no-op for the finished ones
                await asyncio.gather(*self._sends, return_exceptions=True)
                self.encodings.clear()
                result = await self._finish(rounds)
                self.status.round_finished(result.summary)
                where = f"; checkpoint {result.checkpoint}" if result.checkpoint is not None else ""
                logger.info("%s; %.1f s%s", result.summary.log_line(), time.monotonic() - started, where)
            else:
                return

    @staticmethod
    async def _finish(rounds: RoundLoop) -> RoundResult:
        """Merge, evaluate and checkpoint in a worker thread; a stop waits for it at most ``FINISH_GRACE_S``."""
        work = start_thread(rounds.finish)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait({work}, timeout=FINISH_GRACE_S)
            if not work.done():
                logger.warning(
                    "stopping before the round's merge and checkpoint were done: the previous checkpoint stands"
                )
            raise

    async def _send_order(self, order: TrainOrder, limit: asyncio.Semaphore) -> None:
        async with limit:
            connection = self._connections.get(order.device_id)
            try:  # once per sub-network, off the event loop; every device of that sub-network shares it
                encoded = await self.encodings.get(order.tensors)
                if connection is not None and not connection.session.conn.chunk_xxh3:  # an older device
                    await asyncio.to_thread(lambda: encoded.sha256)  # its digest, once, off the loop too
            except ProtocolError:
                encoded = None  # start_task raises it again and fails the task
            connection = self._connections.get(order.device_id)
            if connection is None or not connection.idle:
                self.engine.task_failed(order.task_id, "disconnected before its task was sent")
                self._changes.wake()
                return
            if not connection.session.start_task(order, encoded):  # it cannot go: the task failed
                self._changes.wake()
                return
            try:
                sent = await connection.flush()
            except (ConnectionClosed, ConnectionError):
                self.engine.task_failed(order.task_id, "disconnected while its task was sent")
                self._changes.wake()
                return
            except asyncio.CancelledError:  # the deadline passed mid-transfer: the stream is cut, so is the link
                logger.warning("round %d: deadline passed while sending to %s: closing", order.round, order.device_id)
                await close_quietly(connection.ws, CLOSE_TRY_AGAIN, "round deadline passed during the transfer")
                raise
            connection.session.task_sent(order, sent)

    # ----------------------------------------------------------------------------- connections

    async def _handle(self, ws: ServerConnection) -> None:
        name = self._gate.claim(ws)
        if name is None:  # cannot happen: process_request admitted it
            await close_quietly(ws, 1008, "not authorized")
            return
        session = DeviceSession(self.engine, name, limits=self._limits, deploys=self.deploys)
        connection = Connection(ws, session)
        _device_log.info(name, "device %s connected from %s", name, peer(ws))
        try:
            await self._converse(connection)
        except ConnectionClosed:
            pass
        except Exception:  # a bug must cost one connection, never the server
            logger.exception("device %s: internal error", name)
            await close_quietly(ws, 1011, "internal error")
        finally:
            self._channel_tokens.revoke(connection)
            connection.close_channel()
            session.lost(ws.close_code, ws.close_reason or "")
            clean = ws.close_code in (1000, 1001, CLOSE_REPLACED, CLOSE_RUN_COMPLETE)
            _device_log.log(
                name,
                logging.INFO if clean else logging.WARNING,
                "device %s disconnected (code %s%s)",
                name,
                ws.close_code,
                f" {clip(ws.close_reason)}" if ws.close_reason else "",
            )
            if self._connections.get(name) is connection:
                del self._connections[name]
            if self._gate.release(name, ws) and name not in self._connections:  # no newer connection of it
                self.engine.registry.disconnected(name)
            self._changes.wake()

    def _accept_channel(self, token: bytes, channel: DataChannel) -> bool:
        """A data channel proved ``token``: bind it to the token's connection (one use per token)."""
        connection = self._channel_tokens.redeem(token)
        if (
            connection is None
            or connection.ws.state is not State.OPEN
            or connection.session.conn.state is ConnectionState.CLOSED
        ):
            return False
        connection.channel_opened(channel)
        self._changes.wake()
        logger.debug("device %s opened its data channel", connection.name)
        return True

    async def _converse(self, connection: Connection) -> None:
        """Feed the device's frames to its session (the first within ``hello_timeout_s``) until a close."""
        ws, session, loop = connection.ws, connection.session, asyncio.get_running_loop()
        try:
            first = await asyncio.wait_for(ws.recv(), self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            _device_log.warning(
                connection.name,
                "device %s sent no Hello within %.0f s: closing",
                connection.name,
                self.config.hello_timeout_s,
            )
            await close_quietly(ws, 1008, "no Hello in time")
            return
        if self.data_port is not None:  # offered in the Welcome if the Hello announces the capability
            session.data_channel = (self.data_port, self._channel_tokens.issue(connection))
        # The Hello's admission plans a sub-network: off the event loop. Nothing else touches the session
        # meanwhile: the connection is listed (for rounds, deploys and stop) only once it is handled.
        verdict = await start_thread(session.receive, first, loop.time())
        if not session.conn.channel_offered:
            self._channel_tokens.revoke(connection)
        else:  # a round waits (a little) for the device to open it: its first task can then use it
            connection.channel_due = time.monotonic() + CHANNEL_GRACE_S
            loop.call_later(CHANNEL_GRACE_S, self._changes.wake)
        if self._stopping:
            await close_quietly(ws, 1001, "coordinator shutting down")
            return
        self._connections[connection.name] = connection
        incoming = websocket_messages(ws)  # binary messages piece by piece, as the frames arrive
        while True:
            await connection.flush()
            if verdict.changed:
                self._changes.wake()
            if not verdict.go_on:
                assert verdict.close_code is not None
                await close_quietly(ws, verdict.close_code, verdict.close_reason)
                return
            frame = await anext(incoming)  # ConnectionClosed when the device goes
            verdict = await connection.receive(frame, loop.time())
