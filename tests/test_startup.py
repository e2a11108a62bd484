"""Starting up: what is checked before the model loads, and a coordinator that listens before its
round-0 evaluation is done.

- ``serve`` on a port that is taken: exit code 2, one line on stderr, no run folder;
- a data file the run cannot use (missing, wrong columns, not UTF-8, a row with a field too many):
  an error naming it, and the model-load function never called (``serve`` and ``simulate``);
- devices connect and are admitted while the round-0 evaluation is still running (held on an Event).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from coordinator.federation import load_config
from coordinator.serve import prepare_run, run_coordinator, serve_async
from coordinator.serve._validation import Validator
from coordinator.simulation import run_simulation
from coordinator.simulation._config import parse_simulation_config
from edge_sdk._errors import ConfigError

from ._federation import child_env, write_config
from .models import tiny_vocab_bert_dir
from .test_server import Device
from .test_simulation import tiny_config

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "token-aaaa-1111"
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with MiniLM's vocabulary (the packaged tokenizer applies)."""
    return tiny_vocab_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


class Loads:
    """Stands for the model-load function: records every call, and refuses to load anything."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        raise AssertionError("the model was loaded before the data was checked")


# ------------------------------------------------------------------------------------- the port


def test_serve_on_a_port_in_use_exits_2_with_one_line_and_writes_no_run_folder(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_config(tmp_path, devices={"a": TOKEN}, port=port)
        proc = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=child_env(),
            cwd=ROOT,
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"edge-coordinator serve: error: [server] port {port} is already in use"), lines
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- the data files

BAD_FILES = {
    "missing": None,
    "wrong columns": b"score\tcomment\n1\ta fine film\n",
    "not UTF-8": b"label\tsentence\n1\tun film tr\xe8s beau\n",
    "a row with a field too many": b"label\tsentence\n1\ta fine film\tand more\n",
    "no rows": b"label\tsentence\n",
}


def _bad_file(folder: Path, kind: str) -> Path:
    path = folder / "bad.tsv"
    content = BAD_FILES[kind]
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_serve_checks_its_data_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    loads = Loads()
    monkeypatch.setattr("coordinator.serve._run.ranked_parent", loads)
    path = write_config(tmp_path, devices={"a": TOKEN})
    bad = _bad_file(tmp_path, kind)
    path.write_text(path.read_text(encoding="utf-8").replace('data = "dev.tsv"', f'data = "{bad.name}"'))
    with pytest.raises(ConfigError, match=r"\[validation\] data: .*bad\.tsv"):
        run_coordinator(load_config(path))
    assert loads.calls == []
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", sorted(set(BAD_FILES) - {"missing"}))  # a missing file: the config reader says so
def test_simulate_checks_its_data_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, kind: str
) -> None:
    loads = Loads()
    monkeypatch.setattr("coordinator.simulation._run.ranked_parent", loads)
    bad = _bad_file(tmp_path, kind)
    data = {"kind": "tsv", "train": str(bad), "dev": str(ROOT / "examples/data/sst2/dev.tsv")}
    raw = tiny_config(tmp_path / "run", data=data, model={"name": str(tiny_model)})
    del raw["data"]["size"], raw["data"]["dev_size"], raw["data"]["vocab_size"], raw["data"]["seq_len"]
    config = parse_simulation_config(raw, base=tmp_path)
    with pytest.raises(ConfigError, match=r"\[data\] train: .*bad\.tsv"):
        run_simulation(config)
    assert loads.calls == []
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ round 0, later


def test_devices_are_admitted_while_round_0_is_still_evaluated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    evaluating, release = threading.Event(), threading.Event()
    evaluate = Validator.__call__

    def held(self: Validator, parent: Any) -> Any:
        evaluating.set()
        assert release.wait(TIMEOUT_S)
        return evaluate(self, parent)

    monkeypatch.setattr(Validator, "__call__", held)
    config = load_config(write_config(tmp_path, devices={"a": TOKEN}, model=str(tiny_model), rounds=1, seq_len=32))

    heard = Heard()

    async def scenario() -> None:
        engine, begin = prepare_run(config)
        serving = asyncio.ensure_future(serve_async(config, engine, handle_signals=False, begin=begin, observer=heard))
        try:
            while not (evaluating.is_set() and (tmp_path / "port").is_file()):
                await asyncio.sleep(0.02)
            port = int((tmp_path / "port").read_text())
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=8 << 20) as ws:
                device = Device(ws)
                await device.hello()  # welcomed while the evaluation is held
                assert not release.is_set() and engine.round == 0 and engine.deadline is None
                release.set()
                received = await device.task()  # the first round starts once round 0 is evaluated
                assert received.task.round == 1
                device.answer(received)
                await device.flush()
                assert await asyncio.wait_for(serving, TIMEOUT_S) == 0  # the run is complete
        finally:
            release.set()
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S * 2))
    assert (tmp_path / "run").is_dir()  # the round-0 checkpoint, written once the port was open
    # the terminal's progress heard the round as it happened
    assert heard.calls[:2] == [("started", 1, 1, 1), ("answered", 1, 1, 1)], heard.calls
    assert heard.calls[2][:2] == ("finished", 1) and len(heard.calls) == 3, heard.calls


class Heard:
    """A RoundObserver that records what it hears."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def round_started(self, round: int, rounds: int, devices: int) -> None:
        self.calls.append(("started", round, rounds, devices))

    def round_answered(self, round: int, answered: int, devices: int) -> None:
        self.calls.append(("answered", round, answered, devices))

    def round_finished(self, summary: Any) -> None:
        self.calls.append(("finished", summary.round, summary.aggregated))
