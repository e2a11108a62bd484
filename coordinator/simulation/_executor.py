"""Where simulated devices' tasks run: local worker processes, or a Ray cluster.

Both take the round's :class:`~coordinator.simulation._device.DeviceJob` list and yield each job's
:class:`~coordinator.simulation._device.DeviceReport` (or the exception it raised) as it completes, never
waiting past the round's deadline: jobs still running then are yielded as :class:`TimeoutError`.

- :class:`LocalExecutor`: a ``concurrent.futures.ProcessPoolExecutor`` (spawn start method: no fork
  of a process that already runs torch threads) with ``max_workers`` processes, each with
  ``threads`` torch threads. Task frames go through files (paths cross the process boundary).
  ``fresh_process`` starts a new process for every task (cleanest memory figures, slower).
- :class:`RayExecutor`: Ray tasks (``num_cpus = threads`` each, no retries), so a cluster bounds the
  parallelism by its CPUs; frames travel as bytes through Ray's object store. Tasks, not actors:
  actors that each hold CPUs deadlock once they outnumber the cores. Ray is an optional extra
  (``pip install 'edge-fm[ray]'``); without ``address`` a local Ray instance is started with
  ``max_workers x threads`` CPUs.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from coordinator.simulation._device import DeviceJob, DeviceReport, init_worker, run_device_job
from edge_sdk._errors import ConfigError

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor"]

logger = logging.getLogger(__name__)

Outcome = tuple[DeviceJob, DeviceReport | BaseException]


class Executor(Protocol):
    """Runs device jobs; the simulation calls :meth:`run` once per round and :meth:`close` at the end."""

    uses_files: bool  # True: jobs carry file paths (one machine); False: bytes (any machine)

    def run(self, jobs: Sequence[DeviceJob], timeout_s: float) -> Iterator[Outcome]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Worker processes on this machine (bounded by ``max_workers``)."""

    uses_files = True

    def __init__(self, max_workers: int = 1, threads: int = 1, *, fresh_process: bool = False) -> None:
        if max_workers < 1 or threads < 1:
            raise ConfigError(f"max_workers and threads must be >= 1, got {max_workers} and {threads}")
        self.max_workers, self.threads = max_workers, threads
        self._abandoned = False
        self._pool = ProcessPoolExecutor(
            max_workers=max_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(threads,),
            max_tasks_per_child=1 if fresh_process else None,
        )

    def run(self, jobs: Sequence[DeviceJob], timeout_s: float) -> Iterator[Outcome]:
        deadline = time.monotonic() + timeout_s
        futures: dict[Future[DeviceReport], DeviceJob] = {self._pool.submit(run_device_job, job): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            for future in done:
                error = future.exception()
                yield futures[future], (error if error is not None else future.result())
            if not done and time.monotonic() >= deadline:
                break
        for future in pending:
            if not future.cancel():
                self._abandoned = True  # still running in a worker: it is stopped at close()
            yield futures[future], TimeoutError(f"no result within {timeout_s:.0f} s")

    def close(self) -> None:
        if self._abandoned:  # a task past its deadline may never end: stop our workers, do not wait
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.terminate()
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks on a local instance or a cluster (``address``)."""

    uses_files = False

    def __init__(self, max_workers: int = 1, threads: int = 1, *, address: str | None = None) -> None:
        try:
            import ray
        except ModuleNotFoundError:
            raise ConfigError("the Ray engine needs Ray: pip install 'edge-fm[ray]'") from None
        self._ray: Any = ray
        self.threads = threads
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=max_workers * threads,
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=512 * 1024**2,
                )
            self._started = True
        else:
            self._started = False
        self._remote = ray.remote(num_cpus=threads, max_retries=0)(run_device_job)
        logger.info("Ray: %s CPUs in the cluster", ray.cluster_resources().get("CPU"))

    def run(self, jobs: Sequence[DeviceJob], timeout_s: float) -> Iterator[Outcome]:
        ray = self._ray
        deadline = time.monotonic() + timeout_s
        refs = {self._remote.remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for ref in done:
                try:
                    yield refs[ref], ray.get(ref, timeout=60)
                except Exception as exc:  # a task's error, or the worker died
                    yield refs[ref], exc
            if not done and time.monotonic() >= deadline:
                break
        for ref in pending:
            ray.cancel(ref, force=True)
            yield refs[ref], TimeoutError(f"no result within {timeout_s:.0f} s")

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_executor(
    engine: str, *, max_workers: int, threads: int, fresh_process: bool = False, address: str | None = None
) -> Executor:
    """An executor by name: ``"local"`` or ``"ray"``."""
    if engine == "local":
        return LocalExecutor(max_workers, threads, fresh_process=fresh_process)
    if engine == "ray":
        return RayExecutor(max_workers, threads, address=address)
    raise ConfigError(f"unknown engine {engine!r} (known: 'local', 'ray')")
