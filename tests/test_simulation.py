"""Simulated federations on a tiny random BERT and token-id data: the CLI, width policies, Ray vs local.

Every device task runs in a worker process through the SDK's DeviceConnection and TaskRunner (the
path a real device runs); only protocol frames cross the process boundary.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from coordinator.cli._main import main as cli_main
from coordinator.federation._checkpoint import state_digest
from coordinator.simulation._config import (
    MethodConfig,
    load_simulation_config,
    parse_simulation_config,
)
from coordinator.simulation._executor import LocalExecutor
from coordinator.simulation._run import run_simulation
from edge_sdk._errors import ConfigError
from edge_sdk.scaling._parent import parent_from_module

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=2,
)


def tiny_module(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**TINY))


def tiny_config(run_dir: Path, **tables: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": {"name": "tiny", "seed": 3},
        "data": {
            "kind": "synthetic",
            "size": 1200,
            "dev_size": 128,
            "vocab_size": 64,
            "seq_len": 16,
            "partition": "dirichlet",
            "alpha": 0.5,
            "min_shard": 4,
        },
        "devices": {"raspberry-pi-4-2gb": 60, "jetson-nano-4gb": 30, "raspberry-pi-5-8gb": 10},
        "federation": {"rounds": 1, "fraction": 0.1, "min_devices": 1},
        "training": {"local_steps": 3, "batch_size": 8, "seq_len": 16, "lr": 3e-3},
        "simulation": {"engine": "local", "max_workers": 2, "threads": 1},
        "run": {"dir": str(run_dir)},
    }
    for name, values in tables.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def toml_text(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v) if not isinstance(v, list) else "[" + ", ".join(value(x) for x in v) + "]"

    return "\n".join(
        f"[{table}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in values.items()) for table, values in data.items()
    )


def test_cli_simulates_100_devices_with_10_percent_sampled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_module().save_pretrained(tmp_path / "tiny", safe_serialization=True)
    config = tmp_path / "sim.toml"
    config.write_text(toml_text(tiny_config(Path("run"))), encoding="utf-8")

    assert cli_main(["simulate", "--config", str(config)]) == 0

    run = tmp_path / "run"
    summary = json.loads((run / "simulation.json").read_text())
    assert len(summary["devices"]) == 100 and all(d["admitted"] for d in summary["devices"])
    assert sum(d["samples"] for d in summary["devices"]) == 1200  # shards cover the data
    record = json.loads((run / "rounds" / "round-001.json").read_text())
    devices = record["devices"]
    assert len(devices) == 10 and len({d["device_id"] for d in devices}) == 10
    assert all(d["status"] == "ok" for d in devices), devices
    assert record["aggregated"] == 10 and 0.0 <= record["accuracy"] <= 1.0
    for d in devices:
        assert d["params_fraction"] == 1.0  # tiny model: every budget fits it whole
        assert d["bytes_out"] > 4 * d["params"] and d["bytes_in"] > 4 * d["params"]
        assert d["train_time_s"] > 0 and d["step_time_s"] > 0
        assert d["baseline_rss_bytes"] > 0 and d["host_peak_rss_bytes"] >= d["baseline_rss_bytes"]
        assert d["layers"] == [[0, 2, 32], [1, 2, 32]]
    assert record["bytes_down"] == sum(d["bytes_out"] for d in devices)
    assert summary["weights_digest"] == record["weights_digest"]
    (width,) = summary["width_metrics"].values()  # one plan (the full model), scored at the end
    assert 0.0 <= width["accuracy"] <= 1.0 and (run / "final.safetensors").stat().st_size > 0
    assert summary["weights_digest"] != state_digest(tiny_module().state_dict())  # the model moved
    for name in ("summary.md", "accuracy.png", "bytes.png", "widths.png"):
        assert (run / name).stat().st_size > 0, name
    assert "| raffm |" in capsys.readouterr().out


def test_full_and_static_width_policies(tmp_path: Path) -> None:
    parent = parent_from_module(tiny_module())
    base = parse_simulation_config(
        tiny_config(
            tmp_path / "unused",
            devices={"raspberry-pi-4-2gb": 4, "jetson-nano-4gb": 2, "raspberry-pi-5-8gb": 0},
            federation={"fraction": 1.0},
        ),
        base=tmp_path,
    )
    executor = LocalExecutor(max_workers=2, threads=1)
    try:
        full = run_simulation(
            dataclasses.replace(base, method=MethodConfig(name="full", width="full", reorder=False)),
            parent=parent,
            executor=executor,
            run_dir=tmp_path / "full",
        )
        static = run_simulation(
            dataclasses.replace(base, method=MethodConfig(name="static", width="static", ratios=(1.0, 0.5))),
            parent=parent,
            executor=executor,
            run_dir=tmp_path / "static",
        )
    finally:
        executor.close()
    assert {d["params_fraction"] for d in full.devices} == {1.0}
    assert [d["layers"] for d in full.rounds[0]["devices"]] == [[[0, 2, 32], [1, 2, 32]]] * 6
    widths = sorted(d["layers"][0][1:] for d in static.devices)
    assert widths == [[1, 16]] * 3 + [[2, 32]] * 3  # half the devices at ratio 0.5, whatever their class
    assert all(d["status"] == "ok" for d in static.rounds[0]["devices"])
    assert full.weights_digest != static.weights_digest


def test_config_errors_name_the_table_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[devices\] raspberry-pi-9: .*unknown device class"):
        parse_simulation_config(tiny_config(tmp_path, devices={"raspberry-pi-9": 2}), base=tmp_path)
    with pytest.raises(ConfigError, match=r"\[method\]: unknown key"):
        parse_simulation_config(tiny_config(tmp_path, method={"widht": "full"}), base=tmp_path)
    with pytest.raises(ConfigError, match=r"\[simulation\] engine"):
        parse_simulation_config(tiny_config(tmp_path, simulation={"engine": "spark"}), base=tmp_path)
    example = load_simulation_config(ROOT / "examples" / "sim.toml")
    assert example.num_devices == 8 and example.simulation.budget_scale == 0.45


@pytest.mark.slow
def test_ray_engine_agrees_with_the_local_engine(tmp_path: Path) -> None:
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("ray is not installed (pip install 'edge-fm[ray]'): cannot compare the Ray engine")
    if sys.version_info >= (3, 14):
        pytest.skip("no Ray wheels for this Python")
    parent = parent_from_module(tiny_module())
    base = parse_simulation_config(
        tiny_config(
            tmp_path,
            devices={"raspberry-pi-4-2gb": 6, "jetson-nano-4gb": 4, "raspberry-pi-5-8gb": 0},
            federation={"rounds": 2, "fraction": 0.4},
        ),
        base=tmp_path,
    )
    local = run_simulation(base, parent=parent, run_dir=tmp_path / "local")
    ray_cfg = dataclasses.replace(base, simulation=dataclasses.replace(base.simulation, engine="ray"))
    remote = run_simulation(ray_cfg, parent=parent, run_dir=tmp_path / "ray")
    assert remote.weights_digest == local.weights_digest
    for a, b in zip(local.rounds, remote.rounds, strict=True):
        assert a["weights_digest"] == b["weights_digest"]
        assert a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]
        assert [d["device_id"] for d in a["devices"]] == [d["device_id"] for d in b["devices"]]
    assert local.weights_digest != state_digest(parent.state)
    assert np.isfinite(local.final_accuracy)
