"""The daemon: websocket connections and I/O around the federation engine, deploys, operator HTTP,
validation of the global model, and the run's entry points."""

from coordinator.serve._run import build_engine, prepare_run, run_coordinator, serve_async
from coordinator.serve._server import CoordinatorServer, RunAbortedError

__all__ = ["CoordinatorServer", "RunAbortedError", "build_engine", "prepare_run", "run_coordinator", "serve_async"]
