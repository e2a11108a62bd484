"""End to end: a coordinator and three devices as separate processes on 127.0.0.1, the real MiniLM.

What "within budget" compares. A device reports ``budget.usable``: the bytes that training may take
*beyond* its runtime footprint (Python, torch, transformers, the tokenizer and data, a warm-up step:
its resident set measured before any model byte arrived, ``budget.runtime_footprint``). The
coordinator plans against ``usable`` minus the safety margin (``min_margin``, 192 MiB: a
``--memory-budget`` budget has none of its own) with the memory model's runtime term set to 0. So
the test checks, per device and round,

    predicted training bytes (memory model, runtime excluded)  <= usable - margin
    measured peak RSS (VmHWM at the end of training) - runtime footprint  <= usable

i.e. both sides of the comparison leave the runtime out, consistently; the margin is there because
the memory model's figure is not an exact bound (docs/running.md, "Memory budget").
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint, state_digest
from coordinator.federation._config import FederationConfig
from edge_sdk._spec import SubnetSpec
from edge_sdk.scaling._extract import param_count
from edge_sdk.scaling._memory import Workload, training_estimate

from ._federation import coordinator, data_slices, device, free_port, read_port, write_config
from .models import minilm

pytestmark = pytest.mark.slow

BATCH, SEQ = 8, 64
TOKENS = {"small": "token-small-1111", "medium": "token-medium-2222", "large": "token-large-3333"}


MARGIN = FederationConfig().min_margin_bytes


def three_budgets() -> dict[str, int]:
    """Usable budgets that give MiniLM three different widths at batch 8, sequence 64."""
    parent = minilm()
    dims = parent.dims
    work = Workload(BATCH, SEQ)

    def need(spec: SubnetSpec) -> int:
        return training_estimate(spec, param_count(parent, spec), work, runtime=0).total

    smallest = need(SubnetSpec.uniform(dims, heads=1, ffn=dims.ffn // 48))
    full = need(SubnetSpec.full(dims))
    return {
        "small": MARGIN + int(smallest + 0.3 * (full - smallest)),
        "medium": MARGIN + int(smallest + 0.65 * (full - smallest)),
        "large": MARGIN + 2 * full,
    }


def outcomes(entry: Any) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in entry["devices"]}


def test_three_devices_train_three_widths_within_their_budgets(tmp_path: Path) -> None:
    budgets = three_budgets()
    # width planning end to end: levers off, so the three budgets buy three widths
    config = write_config(tmp_path, devices=TOKENS, rounds=2, min_devices=3, local_steps=2, levers=False)
    server = coordinator(config, tmp_path / "coordinator.log")
    devices = {}
    try:
        port = read_port(tmp_path, server)
        for (name, token), data in zip(TOKENS.items(), data_slices(tmp_path, 3, 64), strict=True):
            devices[name] = device(f"ws://127.0.0.1:{port}", token, data, str(budgets[name]), tmp_path / f"{name}.log")
        assert server.wait() == 0, server.text()[-4000:]
        for name, proc in devices.items():
            assert proc.wait() == 0, f"{name}:\n{proc.text()[-3000:]}"
    finally:
        for proc in [server, *devices.values()]:
            proc.kill()

    run_dir = tmp_path / "run"
    final = load_checkpoint(latest_checkpoint(run_dir))  # type: ignore[arg-type]
    assert final.round == 2 and len(final.history) == 2
    for entry in final.history:
        got = outcomes(entry)
        assert {n: d["status"] for n, d in got.items()} == dict.fromkeys(TOKENS, "ok"), entry
        params = [got[n]["params"] for n in ("small", "medium", "large")]
        assert params[0] < params[1] < params[2], params  # three widths, in budget order
        assert got["large"]["params_fraction"] == 1.0
        for name, d in got.items():
            assert d["usable_bytes"] == budgets[name]
            assert d["predicted_bytes"] <= d["usable_bytes"] - MARGIN, d
            assert 0 < d["runtime_bytes"] < d["peak_rss_bytes"], d
            assert d["peak_rss_bytes"] - d["runtime_bytes"] <= d["usable_bytes"], d  # see the module docstring
            # fp32 weights down; int8+zstd deltas up (the default update encoding): about a byte a parameter
            assert d["bytes_out"] > 4 * d["params"] and d["params"] // 2 < d["bytes_in"] < 2 * d["params"], d
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0
    # The global model changed, and it is what the checkpoint files hold.
    start = load_file(run_dir / "checkpoints" / "round-000000" / "weights.safetensors")
    end = load_file(run_dir / "checkpoints" / "round-000002" / "weights.safetensors")
    assert state_digest(end) == final.history[-1]["weights_digest"] != state_digest(start)
    for name in ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert not torch.equal(start[name], end[name]), name
    log = server.text()
    assert "round 1/2: 3/3 updates merged" in log and "round 2/2: 3/3 updates merged" in log


def test_a_killed_device_and_a_killed_coordinator_do_not_stop_the_run(tmp_path: Path) -> None:
    port = free_port()  # fixed, so that the restarted coordinator is where the devices look for it
    config = write_config(tmp_path, devices=TOKENS, port=port, rounds=2, min_devices=2, local_steps=1)
    url = f"ws://127.0.0.1:{port}"
    first = coordinator(config, tmp_path / "coordinator-1.log")
    procs = [first]
    try:
        read_port(tmp_path, first)
        devices = {}
        for (name, token), data in zip(TOKENS.items(), data_slices(tmp_path, 3, 48), strict=True):
            devices[name] = device(url, token, data, "3GB", tmp_path / f"{name}.log")
        procs += devices.values()

        # A device dies mid-round: its task was sent, its update never comes.
        first.wait_for("round 1: sent task r1-large-")
        devices["large"].kill()
        first.wait_for("checkpoint written: ")
        offset = first.wait_for("round-000001")
        round1 = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
        got = outcomes(round1.history[0])
        assert (got["small"]["status"], got["medium"]["status"]) == ("ok", "ok")
        assert got["large"]["status"] == "failed" and "disconnected" in got["large"]["reason"]
        assert round1.round == 1

        # The coordinator dies right after round 1 (SIGKILL: no goodbye, no cleanup).
        first.popen.send_signal(signal.SIGKILL)
        first.wait()
        assert offset > 0
        digest = state_digest(load_file(tmp_path / "run" / "checkpoints" / "round-000001" / "weights.safetensors"))

        second = coordinator(config, tmp_path / "coordinator-2.log", resume=True)
        procs.append(second)
        assert second.wait() == 0, second.text()[-4000:]
        for name in ("small", "medium"):  # the same processes, never restarted
            assert devices[name].wait() == 0, devices[name].text()[-3000:]
            assert "reconnecting in" in devices[name].text()
    finally:
        for proc in procs:
            proc.kill()

    log = second.text()
    assert f"1 of 2 rounds done, global weights sha256 {digest}" in log
    assert f"round 2 starts from global weights sha256 {digest}" in log
    final = load_checkpoint(latest_checkpoint(tmp_path / "run"))  # type: ignore[arg-type]
    assert final.round == 2 and final.run_id == round1.run_id
    assert final.history[0] == round1.history[0]  # round 1 is not redone or lost
    got = outcomes(final.history[1])
    assert {n: d["status"] for n, d in got.items()} == {"small": "ok", "medium": "ok"}
    assert state_digest(final.weights) != digest
