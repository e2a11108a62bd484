"""Progress in the terminal: the lines of a round as it happens, styled on a terminal, plain on a pipe,
log records for a daemon; and the simulator's round loop feeding them."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest

from coordinator._progress import RoundProgress, terminal_progress
from coordinator.federation import RoundSummary
from coordinator.federation._records import DeviceOutcome
from coordinator.simulation import run_simulation
from coordinator.simulation._config import parse_simulation_config

from .test_simulation import tiny_config, tiny_module
from .test_startup import Heard


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def summary(metrics: dict[str, float]) -> RoundSummary:
    outcomes = (DeviceOutcome("pi", "t1", "ok"), DeviceOutcome("nano", "t2", "failed", "disconnected"))
    return RoundSummary(2, 3, outcomes, metrics, "digest")


def feed(progress: RoundProgress, metrics: dict[str, float]) -> None:
    progress.round_started(2, 3, 2)
    progress.round_answered(2, 1, 2)
    progress.round_finished(summary(metrics))


def test_a_pipe_gets_plain_lines_as_the_round_happens() -> None:
    out = io.StringIO()
    feed(RoundProgress(out), {"accuracy": 0.8125, "loss": 0.431})
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 2/3: training on 2 device(s)"
    assert lines[1].startswith("round 2: 1/2 devices answered; ") and lines[1].endswith(" s")
    assert lines[2].startswith("round 2/3: accuracy 0.8125 loss 0.4310; 1/2 devices; ") and len(lines) == 3


def test_a_terminal_gets_rich_lines_and_no_validation_is_said() -> None:
    out = Terminal()
    feed(RoundProgress(out, label="raffm"), {})
    text = out.getvalue()
    assert "\x1b[" in text  # styled by rich
    assert "raffm round 2/3: no validation; 1/2 devices;" in text


def test_a_daemon_without_a_terminal_logs_its_progress(caplog: pytest.LogCaptureFixture) -> None:
    progress = terminal_progress(io.StringIO())  # not a terminal: log records
    with caplog.at_level(logging.INFO, logger="coordinator.progress"):
        feed(progress, {"accuracy": 0.5, "loss": 0.7})
    texts = [r.getMessage() for r in caplog.records if r.name == "coordinator.progress"]
    assert len(texts) == 3 and texts[2].startswith("round 2/3: accuracy 0.5000 loss 0.7000; 1/2 devices;")


def test_the_simulator_tells_its_observer_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_module().save_pretrained(tmp_path / "tiny", safe_serialization=True)
    monkeypatch.chdir(tmp_path)
    raw: dict[str, Any] = tiny_config(tmp_path / "run", federation={"rounds": 2})
    raw["devices"] = {"raspberry-pi-5-8gb": 4}
    config = parse_simulation_config(raw, base=tmp_path)
    heard = Heard()
    run_simulation(config, observer=heard)
    rounds = [c for c in heard.calls if c[0] in ("started", "finished")]
    chosen = heard.calls[0][3]
    assert rounds == [
        ("started", 1, 2, chosen),
        ("finished", 1, chosen),
        ("started", 2, 2, chosen),
        ("finished", 2, chosen),
    ]
