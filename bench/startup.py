"""How long the command line takes before it is useful: serve to listening, plan, profile.

    python bench/startup.py [--repeat 3] [--skip-serve]

- ``serve``: launches ``edge-coordinator serve`` on a copy of ``examples/run.toml`` (the real
  all-MiniLM-L6-v2, its validation set, a free port, a run folder in a temporary directory) and
  polls the port; prints the seconds from launch until a TCP connection is accepted (devices'
  connections wait in the kernel's backlog from then on), and until an HTTP request is answered
  (the websocket server runs: devices are admitted), then stops the process (SIGTERM);
- ``plan``: the wall time of ``edge-coordinator plan --model all-MiniLM-L6-v2 --memory 1GB``;
- ``profile``: the wall time of ``edge-sdk profile --json``, and with ``--no-probe``.

Each figure is measured in ``--repeat`` fresh processes (run from this checkout, with this
interpreter) sharing one new edge-fm cache folder (``$EDGE_FM_CACHE``): the first run meets it
empty (a new installation), the others find what the first remembered (the ranked model, the
runtime footprint); the first and the median of the others are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "run.toml"
POLL_S = 0.02
SERVE_LIMIT_S = 180.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_config(folder: Path, port: int) -> Path:
    """``examples/run.toml`` with the port, the run folder and the data path made local to ``folder``."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^port = \d+", f"port = {port}", text)
    text = re.sub(r'(?m)^host = "[^"]*"', 'host = "127.0.0.1"', text)
    text = re.sub(r'(?m)^dir = "[^"]*"', f'dir = "{(folder / "run").as_posix()}"', text)
    text = text.replace('data = "data/sst2/dev.tsv"', f'data = "{(EXAMPLE.parent / "data/sst2/dev.tsv").as_posix()}"')
    path = folder / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _listening(port: int) -> bool:
    """The port accepts a TCP connection (the kernel's backlog counts: a device's connect succeeds)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _answering(port: int) -> bool:
    """An HTTP request gets an answer (the websocket server runs: a device's handshake is answered)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return bool(s.recv(12))
    except OSError:
        return False


def serve_to_listening() -> tuple[float, float]:
    """Seconds from launching ``serve`` to its port accepting a TCP connection, and to its first HTTP answer."""
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        config = _serve_config(Path(tmp), port)
        cmd = [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            tcp = _until(lambda: _listening(port), proc, t0)
            http = _until(lambda: _answering(port), proc, t0)
            return tcp, http
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _until(ready: Callable[[], bool], proc: subprocess.Popen[str], t0: float) -> float:
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if time.perf_counter() - t0 > SERVE_LIMIT_S:
            raise RuntimeError(f"serve not ready after {SERVE_LIMIT_S:.0f} s")
        time.sleep(POLL_S)
    return time.perf_counter() - t0


def wall_time(args: list[str]) -> float:
    """Seconds a command takes, start to exit (it must succeed)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], env=_env(), check=True, capture_output=True)
    return time.perf_counter() - t0


def _show(label: str, times: list[float]) -> None:
    """The first run (an empty edge-fm cache) and the median of the others (the cache filled by it)."""
    cold, warm = times[0], times[1:]
    text = f"{label:58s} first {cold:6.2f} s"
    if warm:
        shown = ", ".join(f"{t:.2f}" for t in warm)
        text += f"   then median {statistics.median(warm):6.2f} s ({shown})"
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per figure")
    parser.add_argument("--skip-serve", action="store_true", help="only plan and profile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EDGE_FM_CACHE"] = cache  # the first run of each command fills it, the others use it
        if not args.skip_serve:
            serves = [serve_to_listening() for _ in range(args.repeat)]
            _show("serve (MiniLM): port accepts TCP", [tcp for tcp, _ in serves])
            _show("serve (MiniLM): first HTTP answer (devices admitted)", [http for _, http in serves])
        cases: list[tuple[str, list[str]]] = [
            (
                "edge-coordinator plan --model all-MiniLM-L6-v2 --memory 1GB",
                ["coordinator.cli", "plan", "--model", "all-MiniLM-L6-v2", "--memory", "1GB"],
            ),
            ("edge-sdk profile --json", ["edge_sdk.cli", "profile", "--json"]),
            ("edge-sdk profile --json --no-probe", ["edge_sdk.cli", "profile", "--json", "--no-probe"]),
        ]
        for label, command in cases:
            _show(label, [wall_time(command) for _ in range(args.repeat)])


if __name__ == "__main__":
    main()
