"""The device side of a federated run: join a coordinator, train what it sends, return the update.

Python API (the user brings the data, and optionally the training function)::

    from edge_sdk.client._client import DeviceOptions, EdgeDevice
    from edge_sdk import DataFormat, read_rows
    from edge_sdk.training._runner import TextDataset

    data = TextDataset(read_rows("my.csv", DataFormat(text_column=("title", "body"))), tokenizer_dir=None)
    device = EdgeDevice(DeviceOptions(url="wss://coord:8765", token="..."), data, train_fn=None)
    tasks_done = device.run()                                       # blocks until the run is complete

On start the device detects its profile and memory budget (``detect_profile`` + ``compute_budget``,
or ``memory_budget`` / ``profile_name``) after importing its whole runtime, loading its data and
tokenizer and running one tiny training step (autograd's and the kernels' lazily made buffers), so
that the budget's runtime footprint covers them; the Hello carries
``{"device": profile, "budget": budget}``. Tasks run in a worker thread (keepalive pings keep being
answered); the update is the full trained weights, with the measured peak RSS (``VmHWM`` at the end
of training) and the median step time. With ``deploy_dir`` set the device also takes ``Deploy``
messages (its Hello announces the ``deploy`` capability): :class:`~edge_sdk.serving._install.Deployer` exports
the inference sub-network to ONNX in a worker thread, checks it and installs it in ``deploy_dir``.

Connections: ``Authorization: Bearer <token>``, TLS for ``wss://`` (``ca_file`` to trust a private
CA or a self-signed certificate), frames bounded by the protocol's limits, no compression. When the
connection drops (network, coordinator restart) the device reconnects by itself with exponential
backoff and jitter (:class:`~edge_sdk.client._backoff.Backoff`), a running task is abandoned within one
training step; it stops for good when the run is complete, when the coordinator refuses its token
(HTTP 401/403) or its budget, or after ``backoff.give_up_s`` without a working connection. Nothing
another connection does stops it: HTTP 409 (the coordinator holds a live connection for this device,
e.g. an old one that died silently and that keepalive closes within about 40 s) and close code 4001
(an older coordinator's "replaced by a new connection") are retried with the backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from edge_sdk import __version__
from edge_sdk._errors import BudgetError, ConfigError, EdgeFMError, ProtocolError
from edge_sdk._units import format_bytes
from edge_sdk.client._backoff import Backoff
from edge_sdk.client._channel import DataChannel, device_channel
from edge_sdk.client._progress import ProgressFn, StepLog, StepThrottle
from edge_sdk.client._stream import websocket_messages
from edge_sdk.protocol import (
    CAPABILITY_ENCODINGS,
    FEATURE_DATA_CHANNEL,
    ByeReceived,
    ChannelSend,
    Deploy,
    DeployReceived,
    DeviceConnection,
    ErrorCode,
    ErrorReceived,
    EvaluateTask,
    Event,
    Fragment,
    ProtocolViolation,
    TaskReceived,
    TaskRejected,
    TrainTask,
    WelcomeReceived,
    WireLimits,
    task_error_message,
)
from edge_sdk.protocol._closecodes import STOP_CODES
from edge_sdk.protocol._messages import FEATURE_PROGRESS
from edge_sdk.serving._install import Deployer
from edge_sdk.training._runner import BatchSource, TaskCancelledError, TaskRunner, TrainFn

__all__ = ["DeviceOptions", "EdgeDevice"]

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0
_CANCEL_WAIT_S = 600.0  # a cancelled task stops at its next batch; this bounds a pathological step


@dataclasses.dataclass(frozen=True)
class DeviceOptions:
    """How a device joins: where, with which token, which budget, how it reconnects."""

    url: str  # ws://host:port or wss://host:port
    token: str
    device_id: str = dataclasses.field(default_factory=socket.gethostname)  # informative; the token names it
    memory_budget: int | str | None = None  # usable training budget (e.g. "1.5GB"), instead of detection
    profile_name: str | None = None  # a named device class, instead of detection
    ca_file: Path | None = None  # PEM file of the CA (or self-signed certificate) to trust for wss://
    data_channel: bool = True  # take the coordinator's data channel for tensors, if it offers one
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    probe: bool = True  # run the ~1 s compute probe for the profile
    deploy_dir: Path | None = None  # where deployed inference models are installed (None: no deploys)
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    open_timeout_s: float = 20.0
    welcome_timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.url.startswith(("ws://", "wss://")):
            raise ConfigError(f"the coordinator URL must start with ws:// or wss://, got {self.url!r}")
        if not self.token:
            raise ConfigError("a device token is required")
        if self.ca_file is not None and not self.url.startswith("wss://"):
            raise ConfigError("--ca-file only applies to wss:// URLs")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


def _data_size(data: object) -> int | None:
    """The number of training samples of ``data``, when it says (``len``)."""
    try:
        size = len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
    return size if isinstance(size, int) and size >= 0 else None


@dataclasses.dataclass(frozen=True)
class _SessionEnd:
    """How a connection ended: was the device welcomed, should it stop for good, and why."""

    welcomed: bool
    stop: bool
    why: str


class EdgeDevice:
    """A device taking part in federated runs (see the module docstring)."""

    def __init__(
        self,
        options: DeviceOptions,
        data: BatchSource,
        *,
        train_fn: TrainFn | None = None,
        eval_data: BatchSource | None = None,
        on_progress: ProgressFn | None = None,
    ) -> None:
        self.options = options
        # (task_id, steps done, steps in all) of the running training task, at most once a second
        self.on_progress: ProgressFn = on_progress if on_progress is not None else StepLog()
        self.runner = TaskRunner(data, train_fn=train_fn, eval_data=eval_data, threads=options.threads)
        self.deployer = (
            Deployer(options.deploy_dir, data, threads=options.threads) if options.deploy_dir is not None else None
        )
        self.limits = WireLimits(max_chunk_bytes=options.chunk_bytes)
        self.tasks_done = 0
        self.deploys_done = 0  # models installed
        self._profile: dict[str, Any] | None = None
        self._rng = random.Random()

    # ------------------------------------------------------------------------------- profile

    def hello_profile(self) -> dict[str, Any]:
        """``{"device": DeviceProfile.to_dict(), "budget": MemoryBudget.to_dict(), "data": {"num_samples": n}}``.

        Detected once. ``data.num_samples`` is the size of the local training set: the coordinator holds
        every update's sample count (its weight in the mean) to it.
        """
        if self._profile is None:
            from edge_sdk.device._budget import compute_budget
            from edge_sdk.device._profile import detect_profile
            from edge_sdk.training._runtime import RUNTIME_MODULES, prepare_runtime

            prepare_runtime(self.options.threads)
            profile = detect_profile(runtime_modules=RUNTIME_MODULES, probe=self.options.probe)
            budget = compute_budget(
                profile, override=self.options.memory_budget, named_profile=self.options.profile_name
            )
            logger.info(
                "device profile: %s %s, %d cores; training budget %s (runtime footprint %s)",
                profile.system,
                profile.machine,
                profile.cpu_logical_cores,
                budget.describe(),
                format_bytes(budget.runtime_footprint),
            )
            self._profile = {"device": profile.to_dict(), "budget": budget.to_dict()}
            # what this device may be sent is bounded by what it can hold: a model over the default
            # transfer limit (SmolLM2-135M's fp32 weights are 538 MB) fits a device whose budget holds it
            if budget.usable > self.limits.max_transfer_bytes:
                self.limits = dataclasses.replace(self.limits, max_transfer_bytes=budget.usable)
            size = _data_size(self.runner.data)
            if size is not None:
                self._profile["data"] = {"num_samples": size}
        return self._profile

    # ----------------------------------------------------------------------------- main loop

    def run(self) -> int:
        """Join and take part until the run is complete (blocking); returns the number of tasks done."""
        return asyncio.run(self.run_async())

    async def run_async(self) -> int:
        self.hello_profile()
        backoff = self.options.backoff
        attempt = 0
        last_good = time.monotonic()
        while True:
            welcomed = False
            try:
                end = await self._session()
                if end.stop:
                    logger.info("stopping: %s (%d task(s) done)", end.why, self.tasks_done)
                    return self.tasks_done
                welcomed = end.welcomed
                logger.info("connection ended: %s", end.why)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    raise ConfigError(f"the coordinator refused this device's token (HTTP {status})") from None
                if status == 409:
                    logger.warning(
                        "the coordinator holds another live connection for this device (HTTP 409): retrying"
                        " (an old connection of this device is closed by keepalive within about 40 s)"
                    )
                else:
                    logger.warning("the coordinator answered HTTP %d", status)
            except InvalidURI as exc:
                raise ConfigError(f"bad coordinator URL: {exc}") from None
            except ssl.SSLCertVerificationError as exc:
                raise ConfigError(
                    f"TLS certificate verification failed ({exc.verify_message}): pass --ca-file with the"
                    " coordinator's CA or certificate"
                ) from None
            except (OSError, asyncio.TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                logger.warning(
                    "cannot reach the coordinator at %s: %s", self.options.url, f"{type(exc).__name__}: {exc}"
                )
            if welcomed:
                attempt, last_good = 0, time.monotonic()
            if time.monotonic() - last_good > backoff.give_up_s:
                raise EdgeFMError(
                    f"no working connection to {self.options.url} for {backoff.give_up_s:.0f} s: giving up"
                )
            delay = backoff.delay(attempt, self._rng)
            attempt += 1
            logger.info("reconnecting in %.1f s (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.options.url.startswith("wss://"):
            return None
        ca = self.options.ca_file
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)

    async def _session(self) -> _SessionEnd:
        """One connection, from Hello to close."""
        options = self.options
        async with connect(
            options.url,
            additional_headers={"Authorization": f"Bearer {options.token}"},
            ssl=self._ssl_context(),
            max_size=self.limits.websocket_max_size,
            compression=None,
            open_timeout=options.open_timeout_s,
            close_timeout=_CLOSE_TIMEOUT_S,
            ping_interval=20,
            ping_timeout=20,
        ) as ws:
            session = _Session(self, ws)
            return await session.run()


def _ignore_result(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a closed connection is noticed by the receiving loop


class _Session:
    """One connection's conversation (the device side of the protocol over one websocket)."""

    def __init__(self, device: EdgeDevice, ws: ClientConnection) -> None:
        self.device = device
        self.ws = ws
        self.conn = DeviceConnection(limits=device.limits)
        self.conn.defer_checks = True  # on_frame runs the received chunks' checks in a worker thread
        self.lock = asyncio.Lock()
        self.cancel = threading.Event()
        self.work: asyncio.Task[None] | None = None
        self.welcomed = False
        self.run_id: str | None = None
        self.channel: DataChannel | None = None  # the data channel, if the coordinator offered one

    async def flush(self) -> None:
        async with self.lock:
            # Chunk frames made one at a time as sent, each a fragmented message of views of the tensors.
            for frame in self.conn.frames_to_send(fragments=True):
                if not isinstance(frame, ChannelSend):
                    await self.ws.send(frame)
                elif self.channel is not None:
                    await self.channel.send(frame)
                else:  # the transfer was announced on a channel that closed since: the coordinator must know
                    await self.ws.close(1011, "the data channel closed")

    async def run(self) -> _SessionEnd:
        options = self.device.options
        self.conn.send_hello(
            device_id=options.device_id,
            sdk_version=__version__,
            profile=self.device.hello_profile(),
            capabilities=(
                "train",
                "evaluate",
                FEATURE_PROGRESS,
                CAPABILITY_ENCODINGS,
                *(("deploy",) if self.device.deployer else ()),
                *((FEATURE_DATA_CHANNEL,) if options.data_channel else ()),
            ),
        )
        await self.flush()
        try:
            first = await asyncio.wait_for(self.ws.recv(), options.welcome_timeout_s)
            await self.on_frame(first)
            async for frame in websocket_messages(self.ws):  # binary messages piece by piece
                await self.on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            await self.abandon()
            if self.channel is not None:
                self.channel.close()
        code, reason = self.ws.close_code, self.ws.close_reason or ""
        why = f"the connection closed (code {code}{' ' + reason if reason else ''})"
        return _SessionEnd(self.welcomed, code in STOP_CODES, why)

    async def abandon(self) -> None:
        """Stop a running task (it ends at its next batch) and wait for its thread, bounded."""
        self.cancel.set()
        if self.work is not None and not self.work.done():
            logger.info("abandoning the running task")
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.work), _CANCEL_WAIT_S)

    async def on_frame(self, frame: str | bytes | Fragment) -> None:
        events = self.conn.receive(frame)
        work = self.conn.take_work()  # received chunks' digests, copies and value checks: off the loop
        if work is not None:
            await asyncio.to_thread(work)
        if self.conn.channel_receiving:  # the transfer announced comes on the data channel, read into place
            channel = self.channel
            if channel is None:
                events += self.conn.channel_broken("it closed")
            else:
                events += await channel.receive(self.conn, unless=self.ws.wait_closed())
        for event in events:
            await self.on_event(event)
        await self.flush()

    async def on_event(self, event: Event) -> None:
        if isinstance(event, WelcomeReceived):
            welcome = event.welcome
            self.welcomed = True
            self.run_id = welcome.run_id
            if welcome.data_token:  # offered: open it before the next message (a task may use it)
                self.channel = await device_channel(
                    self.device.options.url, welcome.data_port, welcome.data_token, self.device._ssl_context()
                )
                if self.channel is not None:
                    self.conn.channel_opened()
                    self.channel.on_close = self.conn.channel_closed
            logger.info("joined run %s as %s (round %d done)", welcome.run_id, welcome.device_id, welcome.round)
        elif isinstance(event, TaskReceived):
            self.work = asyncio.ensure_future(self.do_task(event.task, dict(event.tensors)))
            self.work.add_done_callback(_log_escaped)
        elif isinstance(event, DeployReceived):
            if self.device.deployer is None:
                self.conn.send_error(
                    code=ErrorCode.UNSUPPORTED,
                    message="this client does not deploy models (no deploy folder)",
                    task_id=event.deploy.task_id,
                )
            else:
                self.work = asyncio.ensure_future(self.do_deploy(event.deploy, dict(event.tensors)))
                self.work.add_done_callback(_log_escaped)
        elif isinstance(event, TaskRejected):
            logger.warning("task %s rejected: %s", event.task_id, event.reason)
        elif isinstance(event, ErrorReceived):
            error = event.error
            logger.warning(
                "coordinator error %s%s: %s",
                error.code,
                f" (task {error.task_id})" if error.task_id else "",
                error.message,
            )
            if error.code == ErrorCode.REJECTED:
                raise BudgetError(f"the coordinator refused this device: {error.message}")
        elif isinstance(event, ByeReceived):
            logger.info("coordinator says goodbye: %d %s", event.bye.code, event.bye.reason)
            await self.flush()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(event.bye.code, event.bye.reason), _CLOSE_TIMEOUT_S + 1)
        elif isinstance(event, ProtocolViolation):
            logger.warning("the coordinator broke the protocol (close %d): %s", event.close_code, event.reason)
            await self.flush()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(event.close_code, event.close_reason), _CLOSE_TIMEOUT_S + 1)

    async def do_deploy(self, deploy: Deploy, tensors: dict[str, Any]) -> None:
        """Export, check and install a deployed model off the event loop; answer with a DeployResult."""
        deployer = self.device.deployer
        assert deployer is not None
        logger.info(
            "deploy %s: exporting the round-%d inference sub-network (%s)",
            deploy.task_id,
            deploy.round,
            "int8 and fp32" if deploy.settings.quantize else "fp32",
        )
        result = await asyncio.to_thread(deployer.deploy, deploy, tensors, run_id=self.run_id)
        del tensors
        if result.ok:
            self.device.deploys_done += 1
        with contextlib.suppress(ProtocolError):  # the connection may have closed meanwhile
            self.conn.send_deploy_result(
                task_id=deploy.task_id, ok=result.ok, metrics=result.metrics, message=result.message
            )
        with contextlib.suppress(ConnectionClosed):
            await self.flush()

    def progress(self, task_id: str, done: int, total: int) -> None:
        """A training step was reached (throttled): show it, and tell a coordinator that takes Progress."""
        with contextlib.suppress(Exception):  # a display's fault must not cost the task
            self.device.on_progress(task_id, done, total)
        if not self.conn.progress_accepted:
            return
        try:
            self.conn.send_progress(task_id=task_id, steps_done=done, steps_total=total)
        except ProtocolError:  # the task ended meanwhile, or a count is out of bounds: nothing to say
            return
        flushing = asyncio.ensure_future(self.flush())
        flushing.add_done_callback(_ignore_result)

    async def do_task(self, task: TrainTask | EvaluateTask, tensors: dict[str, Any]) -> None:
        """Run one task off the event loop and answer it: an Update / EvalResult, or an Error naming it.

        Any exception of the task (not only the SDK's own) becomes ``Error(task_failed)`` with the
        exception's type and message and a log line with its traceback; the device stays connected and
        takes the next task. A task abandoned because its connection closed sends nothing; asyncio's
        cancellation, KeyboardInterrupt and SystemExit are not caught (they stop the device).
        """
        runner, conn = self.device.runner, self.conn
        started = time.monotonic()
        try:
            if isinstance(task, TrainTask):
                on_step = StepThrottle(asyncio.get_running_loop(), functools.partial(self.progress, task.task_id))
                keep = conn.update_encoding is not None  # deltas: the received weights are kept
                output = await asyncio.to_thread(runner.train, task, tensors, self.cancel, on_step, keep_received=keep)
                del tensors
                logger.info(
                    "task %s: trained in %.1f s (%.3f s/step, loss %s), peak RSS %s; sending the update",
                    task.task_id,
                    time.monotonic() - started,
                    output.step_time_s,
                    f"{output.metrics['loss']:.4f}" if "loss" in output.metrics else "n/a",
                    format_bytes(output.peak_rss_bytes),
                )
                output.send(conn, task.task_id)
            else:
                samples, metrics = await asyncio.to_thread(runner.evaluate, task, tensors, self.cancel)
                conn.send_eval_result(task_id=task.task_id, num_samples=samples, metrics=metrics)
            self.device.tasks_done += 1
        except TaskCancelledError:
            logger.info("task %s abandoned: the connection closed", task.task_id)
            return
        except Exception as exc:  # any failure is reported: an unreported one would hold the round to its deadline
            message = task_error_message("train" if isinstance(task, TrainTask) else "evaluate", task.task_id, exc)
            logger.exception("%s; reporting it to the coordinator", message)
            with contextlib.suppress(ProtocolError):  # the connection may have closed meanwhile
                conn.send_error(code=ErrorCode.TASK_FAILED, message=message, task_id=task.task_id)
        with contextlib.suppress(ConnectionClosed):
            await self.flush()


def _log_escaped(work: asyncio.Future[None]) -> None:
    """Log what a task's coroutine let through (a bug: it answers every failure itself), never drop it."""
    if not work.cancelled() and work.exception() is not None:
        exc = work.exception()
        logger.error("a task's handler failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
