"""Many devices on one coordinator: ``bench/scale.py`` at a reduced size, and the daemon's frozen heap.

The load test runs the benchmark itself in a subprocess (its own processes: the real coordinator and
two device processes on 127.0.0.1): 200 devices connect, say Hello and open the data channel the
coordinator offers (as the SDK does), one round trains 20 of them for real (the SDK's TaskRunner),
their tasks travel on the channel, and every device pings the coordinator throughout. Asserted: every
device welcomed, every task sent, answered and merged, every ping answered, every device told the
run is complete. The times and stalls are printed, never asserted (a loaded CI machine decides them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from coordinator.federation import parse_config
from coordinator.serve import build_engine, serve_async
from edge_sdk.protocol import CLOSE_RUN_COMPLETE

from ._federation import child_env
from .models import ROOT, tiny_model

DEVICES, TRAIN = 200, 20


def test_two_hundred_devices_connect_and_twenty_train_one_round(tmp_path: Path) -> None:
    args = ["--devices", str(DEVICES), "--train", str(TRAIN), "--procs", "2", "--idle-s", "1", "--ping-every", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), *args, "--json", "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:] + (tmp_path / "coordinator.log").read_text()[-4000:]
    result = json.loads(done.stdout)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import scale  # type: ignore[import-not-found]

        print(scale.text(result))  # the figures, for whoever reads the test's output
    finally:
        sys.path.remove(str(ROOT / "bench"))
    coordinator, devices = result["coordinator"], result["devices_side"]
    assert devices["welcomed"] == DEVICES and devices["refused"] == []
    assert coordinator["tasks_sent"] == TRAIN and devices["tasks"] == devices["updates"] == TRAIN
    assert result["data_channel"] and devices["on_channel"] == TRAIN  # as the SDK: tasks on the data channel
    assert coordinator["outcomes"] == {"ok": TRAIN}  # every reply merged
    assert devices["pings"] > DEVICES and devices["unanswered"] == 0
    assert devices["closes"] == {str(CLOSE_RUN_COMPLETE): DEVICES}  # all still connected when the run ended
    assert 0 < coordinator["rss_per_device"] < 1 << 20  # reported in the docs; bounded loosely here


@pytest.fixture
def unfrozen() -> object:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of this worker's tests collect as before


def test_the_daemon_freezes_its_startup_heap_out_of_garbage_collection(tmp_path: Path, unfrozen: object) -> None:
    """A full collection would walk the model, torch and transformers (some 400,000 objects) on every
    run of the collector's oldest generation, holding the event loop about half a second each time."""
    tiny_model("bert").save_pretrained(tmp_path / "model", safe_serialization=True)
    text = f"""
[model]
name = "{tmp_path / "model"}"
num_labels = 3
[federation]
rounds = 1
device_wait_s = 60
[server]
port = 0
port_file = "port"
[devices]
a = "token-of-a"
[run]
dir = "run"
[deploy]
enabled = false
"""
    config = parse_config(tomllib.loads(text), base=tmp_path)
    engine = build_engine(config)
    tracked = len(gc.get_objects())

    async def main() -> int:
        serving = asyncio.ensure_future(serve_async(config, engine, handle_signals=False))
        try:
            for _ in range(600):
                if (tmp_path / "port").exists():
                    return gc.get_freeze_count()
                await asyncio.sleep(0.05)
            raise AssertionError("the coordinator did not start")
        finally:
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving

    assert asyncio.run(main()) >= tracked // 2
