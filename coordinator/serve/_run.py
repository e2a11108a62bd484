"""Running a coordinator from a :class:`RunConfig`: build (or resume) the engine, serve the rounds.

Python API::

    from coordinator.federation._config import load_config
    from coordinator.serve._run import run_coordinator
    exit_code = run_coordinator(load_config("run.toml"), resume=True)

:func:`build_engine` alone gives the federation engine of a config (new, or from the run directory's
last checkpoint) without any network, e.g. for a simulator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import torch

from coordinator.federation import (
    LABELLED_TASKS,
    EngineState,
    FederationEngine,
    RoundObserver,
    RunConfig,
    latest_checkpoint,
    load_checkpoint,
    metrics_text,
    resolve_labels,
    save_checkpoint,
    task_config,
)
from coordinator.serve._connection import start_thread
from coordinator.serve._security import server_ssl_context
from coordinator.serve._server import FINISH_GRACE_S, CoordinatorServer
from coordinator.serve._startup import bind_listener, check_run
from coordinator.serve._status_http import open_status
from coordinator.serve._validation import ImageValidator, PromptValidator, Validator, calibration_batches
from edge_sdk import LabelMap, read_image_folder, read_rows
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import ranked_parent, resolve_model_dir

__all__ = [
    "EXIT_SIGNAL",
    "STOP_GRACE_S",
    "build_engine",
    "freeze_heap",
    "prepare_run",
    "run_coordinator",
    "serve_async",
]

logger = logging.getLogger(__name__)

EXIT_SIGNAL = 130  # stopped by SIGINT or SIGTERM
STOP_GRACE_S = 1.0  # on a signal: how long devices have to hear goodbye before their sockets are cut


AnyValidator = Validator | PromptValidator | ImageValidator


def _validator(config: RunConfig, model_dir: Path, labels: LabelMap | None) -> AnyValidator | None:
    """The ``[validation]`` evaluator: images, prompt/response records (``causal-lm``: no label map),
    or labelled texts."""
    val = config.validation
    if val is None:
        return None
    if Path(val.data).is_dir():  # an image folder, preprocessed as the model folder says
        images = ImageValidator(val.data, model_dir, batch_size=val.batch_size, limit=val.limit)
        if labels is not None:
            images.data.use_labels(labels)
        return images
    tokenizer = val.tokenizer or model_dir
    if not (Path(tokenizer) / "tokenizer.json").is_file():
        raise ConfigError(f"[validation]: {tokenizer} has no tokenizer.json: set [validation] tokenizer = DIR")
    seq_len = val.seq_len or config.training.seq_len
    if labels is None:
        return PromptValidator(
            val.data, tokenizer, seq_len=seq_len, batch_size=val.batch_size, limit=val.limit, format=val.format
        )
    return Validator(
        val.data,
        tokenizer,
        seq_len=seq_len,
        batch_size=val.batch_size,
        limit=val.limit,
        format=val.format,
        labels=labels,
    )


def run_labels(config: RunConfig) -> LabelMap | None:
    """A new run's label map: ``[model] labels``, else the labels of the ``[validation]`` data, else
    ``num_labels`` (2) unnamed classes; None for a task without labels (``causal-lm``)."""
    if config.model.task not in LABELLED_TASKS:
        return None
    val = config.validation
    observed = None
    if val is not None and config.model.labels is None and Path(val.data).is_dir():  # class sub-folders
        observed = list(read_image_folder(val.data, limit=val.limit, check=False).classes)
    elif val is not None and config.model.labels is None:
        observed = read_rows(val.data, val.format, limit=val.limit).labels
    return resolve_labels(config.model, observed)


def _resumed_labels(config: RunConfig, state: EngineState) -> LabelMap | None:
    """A resumed run keeps its label map (the checkpoint's); a config naming other labels is an error.
    None for a task without labels (``causal-lm``)."""
    if config.model.task not in LABELLED_TASKS:
        return None
    saved = LabelMap.from_model_config(state.model_config)
    if config.model.labels is not None and config.model.labels != saved:
        raise ConfigError(
            f"{config.run.dir} holds a run with {saved.describe()}; the config names {config.model.labels.describe()}"
        )
    return saved


def build_engine(config: RunConfig, *, resume: bool = False) -> FederationEngine:
    """The engine of ``config``: resumed from the run directory's last checkpoint, or a new run.

    A new run loads the model, ranks salience and reorders it once (``ranked_parent``), writes a
    round-0 checkpoint and evaluates it. Without ``resume``, a run directory that already holds a
    checkpoint is an error (never overwritten). :func:`prepare_run` does the same but writes nothing.
    """
    engine, begin = prepare_run(config, resume=resume)
    if begin is not None:
        begin()
    return engine


def prepare_run(config: RunConfig, *, resume: bool = False) -> tuple[FederationEngine, Callable[[], None] | None]:
    """The engine of ``config`` (as :func:`build_engine`), with nothing written or evaluated yet, and
    a new run's first step: write the round-0 checkpoint and evaluate the starting model (None when
    resumed). :func:`serve_async` takes that step in a worker thread once the port is open."""
    run_dir = config.run.dir
    model_dir = resolve_model_dir(config.model.name)
    latest = latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoint {latest.name}): pass --resume to continue it,"
            " or set another [run] dir"
        )
    if latest is not None:
        state = load_checkpoint(latest)
        validator = _validator(config, model_dir, _resumed_labels(config, state))
        return _resumed(config, latest, state, validator), None
    if resume:
        logger.info("--resume: %s has no checkpoint yet, starting a new run", run_dir)
    labels = run_labels(config)
    validator = _validator(config, model_dir, labels)
    engine = _new_run(config, model_dir, validator, labels)
    return engine, functools.partial(_begin, config, engine, validator)


def _resumed(
    config: RunConfig, checkpoint: Path, state: EngineState, validator: AnyValidator | None
) -> FederationEngine:
    if state.model_name and state.model_name != config.model.name:
        raise ConfigError(
            f"{config.run.dir} holds a run of model {state.model_name!r}; the config names {config.model.name!r}"
        )
    engine = FederationEngine.restore(
        state,
        config.federation,
        config.training,
        devices=list(config.devices),
        evaluator=validator,
        seed=config.model.seed,
        levers=config.levers,
    )
    logger.info(
        "resumed run %s from %s: %d of %d rounds done, global weights sha256 %s",
        engine.run_id,
        checkpoint,
        engine.round,
        config.federation.rounds,
        engine.weights_digest(),
    )
    return engine


def _new_run(
    config: RunConfig, model_dir: Path, validator: AnyValidator | None, labels: LabelMap | None
) -> FederationEngine:
    def calibration() -> list[dict[str, torch.Tensor]]:
        assert validator is not None  # the config requires [validation] for activation salience
        return calibration_batches(validator)

    parent, ranked = ranked_parent(
        model_dir,
        salience=config.model.salience,
        calibration=calibration,
        task=config.model.task,
        num_labels=len(labels) if labels is not None else 2,
        seed=config.model.seed,
        cache=True,  # a model ranked before (same files, task, labels, seed) is read back, not loaded
    )
    parent = dataclasses.replace(parent, config=task_config(parent, labels))  # sent with every task
    logger.info("the run's %s", labels.describe() if labels is not None else f"task: {parent.task}, no labels")
    engine = FederationEngine(
        parent,
        ranked,
        config.federation,
        config.training,
        devices=list(config.devices),
        evaluator=validator,
        seed=config.model.seed,
        model_name=config.model.name,
        levers=config.levers,
    )
    return engine


def _begin(config: RunConfig, engine: FederationEngine, validator: AnyValidator | None) -> None:
    """A new run's first step: the round-0 checkpoint, then the starting model's validation line."""
    path = save_checkpoint(config.run.dir, engine.snapshot(), keep=config.run.keep_checkpoints)
    logger.info("new run %s: global weights sha256 %s (%s)", engine.run_id, engine.weights_digest(), path)
    if validator is not None:
        metrics = validator(engine.parent)
        logger.info("round 0 (pre-trained model): %s", metrics_text(metrics))


def freeze_heap() -> int:
    """Collect, then move every object alive now into the collector's permanent generation; returns
    how many. Called once the engine is built: the model, torch and transformers are some 400,000
    objects that live as long as the process, and every full collection (set off as devices connect
    and leave) would otherwise walk them all while holding the event loop, about half a second.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve_async(
    config: RunConfig,
    engine: FederationEngine,
    *,
    handle_signals: bool = True,
    listener: socket.socket | None = None,
    begin: Callable[[], None] | None = None,
    observer: RoundObserver | None = None,
) -> int:
    """Serve ``engine``'s rounds to devices; returns 0 when the run is complete, 130 when stopped.

    ``listener``: a socket bound and listening already (:func:`bind_listener`); by default the
    server binds ``[server] host`` and ``port``. ``begin``: a new run's first step (from
    :func:`prepare_run`), taken in a worker thread once the port is open: devices connect and are
    admitted meanwhile, and the first round starts after it. ``observer``: hears the rounds as they
    happen (:class:`~coordinator.federation.RoundObserver`, e.g. progress in a terminal).

    SIGINT and SIGTERM stop it within a few seconds in any phase (their handlers are in place before
    the port opens): devices are told goodbye (1001: they reconnect when a coordinator is back),
    sockets still open after ``STOP_GRACE_S`` are cut, and a merge and checkpoint in progress get
    ``FINISH_GRACE_S`` to finish. The last checkpoint on disk stands (restart with ``--resume``).
    """
    logger.debug("%d objects of the startup heap left out of garbage collection", freeze_heap())
    server = _server(config, engine, observer)
    status = open_status(server, config.status, config.deploy.operator_token)  # the status page, if on
    logger.debug("%d objects of the startup heap left out of garbage collection", freeze_heap())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(listener)
        running = asyncio.ensure_future(_begin_then_run(server, begin))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if running.done():
            running.result()  # RunAbortedError and bugs propagate
            return 0
        logger.info("signal received: stopping (devices are told goodbye; they come back with the coordinator)")
        halting = asyncio.ensure_future(_halt(running))  # the run is cancelled while ...
        await server.stop(grace=STOP_GRACE_S)  # ... devices hear goodbye (this marks the server stopping first)
        await halting
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if status is not None:
            await status.close()
    latest = latest_checkpoint(config.run.dir)
    if latest is None:
        logger.info("stopping on a signal before the run's first checkpoint: nothing was written")
        return EXIT_SIGNAL
    number = latest.name.rpartition("-")[2]
    done = int(number) if number.isdigit() else engine.round
    logger.info("stopping on a signal: the checkpoint of round %d stands (restart with --resume)", done)
    return EXIT_SIGNAL


def _server(config: RunConfig, engine: FederationEngine, observer: RoundObserver | None) -> CoordinatorServer:
    ssl_context = (
        server_ssl_context(config.server.tls_cert, config.server.tls_key)
        if config.server.tls_cert is not None and config.server.tls_key is not None
        else None
    )
    return CoordinatorServer(
        engine,
        config.server,
        config.devices,
        run_dir=config.run.dir,
        keep_checkpoints=config.run.keep_checkpoints,
        ssl_context=ssl_context,
        deploy=config.deploy,
        observer=observer,
    )


async def _begin_then_run(server: CoordinatorServer, begin: Callable[[], None] | None) -> None:
    """A new run's first step off the event loop (the server answers devices meanwhile), then the rounds."""
    if begin is not None:
        await start_thread(begin)
    await server.run()


async def _halt(running: asyncio.Future[None]) -> None:
    """Cancel the run and wait for it, bounded (a merge and checkpoint in progress get
    ``FINISH_GRACE_S``); a cancellation that goes unheard is repeated once, then the run is left."""
    for wait_s in (FINISH_GRACE_S + 0.5, 0.5):
        if running.done():
            break
        running.cancel()
        await asyncio.wait({running}, timeout=wait_s)
    if not running.done():
        logger.warning("the run did not stop within %.1f s: leaving it", FINISH_GRACE_S + 1.0)
    elif not running.cancelled() and running.exception() is not None:
        logger.info("while stopping, the run ended with: %s", running.exception())


def run_coordinator(config: RunConfig, *, resume: bool = False, observer: RoundObserver | None = None) -> int:
    """Serve the run to the end (blocking); the process's exit code.

    In this order: what can be checked without the model is (:func:`check_run`), the port is bound
    (ConfigError if it is taken), the model is loaded (or the run resumed), the server starts, and a
    new run's round-0 checkpoint and evaluation run while devices connect.
    """
    check_run(config, resume=resume)
    listener = bind_listener(config.server)
    if listener is not None:
        logger.info("port %d bound; loading the model", listener.getsockname()[1])
    try:
        engine, begin = prepare_run(config, resume=resume)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    return run_bounded(serve_async(config, engine, listener=listener, begin=begin, observer=observer))


def run_bounded(main: Coroutine[Any, Any, int], cleanup_s: float = 0.5) -> int:
    """``asyncio.run(main)``, except that the tasks left over get at most ``cleanup_s`` to end once
    cancelled, and no thread is joined (the daemon's worker threads are daemon threads)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=cleanup_s))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
