"""``make demo``'s entry point as a newcomer runs it: a real federation over loopback websockets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ._federation import child_env

pytestmark = pytest.mark.slow


def test_demo_runs_a_federation_and_serves_an_onnx_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.demo"],
        check=False,
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "report: " in out and "predicts " in out, out
    (folder,) = (tmp_path / "runs").glob("demo-*")
    history = json.loads((folder / "rounds.json").read_text())
    assert [h["round"] for h in history] == [1, 2, 3]
    for entry in history:
        got = {d["device_id"]: d for d in entry["devices"]}
        assert {n: d["status"] for n, d in got.items()} == {
            "raspberry-pi-4-2gb": "ok",
            "jetson-nano-4gb": "ok",
            "raspberry-pi-5-8gb": "ok",
        }
        # different classes, different sub-networks: the smallest device trains the smallest
        small, large = got["raspberry-pi-4-2gb"], got["raspberry-pi-5-8gb"]
        assert small["params"] < large["params"] and large["params_fraction"] == 1.0
        assert small["predicted_bytes"] <= small["usable_bytes"]
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0
    onnx = folder / "onnx" / "raspberry-pi-4-2gb"
    assert (onnx / "model.onnx").stat().st_size > 0 and (onnx / "edge_manifest.json").is_file()
    assert (folder / "summary.md").read_text().count("\n| ") >= 4
