"""Chaos: the coordinator is killed (SIGKILL) at random moments of a run; every checkpoint stands.

One real ``edge-coordinator serve`` process after another on the same run directory (``--resume``),
each killed a random delay (seeded) after it starts listening -- while it waits for the device, sends
a task, waits for the update, merges, evaluates or writes a checkpoint -- and one real ``edge-sdk
join`` device that outlives them all, reconnecting each time. After every kill each checkpoint on
disk must load (its blobs match their sha256), the latest round never goes back, and the history of
a later checkpoint begins with the history of an earlier one (a finished round is never redone or
lost). The last coordinator is left to finish the run.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint

from ._federation import coordinator, data_slices, device, free_port, write_config

pytestmark = pytest.mark.slow

ROUNDS = 5
KILLS = 4
SEED = 15


def checkpoints_hold(run_dir: Path) -> list[tuple[int, tuple[object, ...]]]:
    """Every checkpoint on disk, loaded (its digests checked): (round, history), oldest first."""
    folder = run_dir / "checkpoints"
    found = sorted(p for p in folder.glob("round-*") if p.is_dir()) if folder.exists() else []
    states = [load_checkpoint(p) for p in found]
    return [(s.round, tuple(s.history)) for s in states]


def test_a_coordinator_killed_at_random_moments_never_loses_or_corrupts_a_round(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    port = free_port()
    config = write_config(
        tmp_path, devices={"solo": "token-solo-1111"}, port=port, rounds=ROUNDS, local_steps=1, batch_size=4,
        seq_len=32, validation_rows=16,
    )  # fmt: skip
    (data,) = data_slices(tmp_path, 1, 24)
    solo = device(f"ws://127.0.0.1:{port}", "token-solo-1111", data, "3GB", tmp_path / "solo.log")
    procs = [solo]
    seen: list[tuple[int, tuple[object, ...]]] = []
    try:
        for kill in range(KILLS + 1):
            proc = coordinator(config, tmp_path / f"coordinator-{kill}.log", resume=kill > 0)
            procs.append(proc)
            if kill == KILLS:  # the last one finishes the run
                assert proc.wait() == 0, proc.text()[-4000:]
                break
            proc.wait_for("listening on")  # loaded: from here on, any moment of a round
            time.sleep(rng.uniform(0.0, 10.0))
            proc.popen.send_signal(signal.SIGKILL)
            proc.wait()
            held = checkpoints_hold(tmp_path / "run")
            latest = held[-1] if held else (0, ())
            previous = seen[-1] if seen else (0, ())
            assert latest[0] >= previous[0], (latest[0], previous[0])
            assert latest[1][: len(previous[1])] == previous[1]  # history only grows
            seen.append(latest)
        assert solo.wait() == 0, solo.text()[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    final = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    assert final.round == ROUNDS and len(final.history) == ROUNDS
    assert [h["round"] for h in final.history] == list(range(1, ROUNDS + 1))
    for rnd, history in seen:
        assert tuple(final.history[:rnd]) == history
