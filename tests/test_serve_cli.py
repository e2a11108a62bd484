"""``edge-coordinator serve`` as a process: a signal stops it cleanly, a used run directory needs --resume."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from coordinator.federation._checkpoint import latest_checkpoint

from ._federation import coordinator, read_port, write_config

pytestmark = pytest.mark.slow


def test_sigterm_stops_the_daemon_and_a_used_run_dir_needs_resume(tmp_path: Path) -> None:
    config = write_config(tmp_path, devices={"a": "token-aaaa-1111"}, rounds=1)
    first = coordinator(config, tmp_path / "first.log")
    try:
        read_port(tmp_path, first)
        first.wait_for("waiting for devices")
        first.popen.send_signal(signal.SIGTERM)
        assert first.wait() == 130, first.text()[-3000:]
    finally:
        first.kill()
    assert "stopping on a signal: the checkpoint of round 0 stands" in first.text(), first.text()[-3000:]
    assert latest_checkpoint(tmp_path / "run") is not None, first.text()[-3000:]

    second = coordinator(config, tmp_path / "second.log")
    assert second.wait() == 2, second.text()[-3000:]
    assert "already holds a run (checkpoint round-000000): pass --resume" in second.text(), second.text()[-3000:]

    (tmp_path / "run" / "checkpoints" / "LATEST").unlink()  # lost by hand or by a damaged disk
    third = coordinator(config, tmp_path / "third.log")
    assert third.wait() == 2, third.text()[-3000:]  # still refused: the run's folders are not written over
    assert "names no complete checkpoint" in third.text(), third.text()[-3000:]
    assert "already holds a run (checkpoint round-000000): pass --resume" in third.text(), third.text()[-3000:]
