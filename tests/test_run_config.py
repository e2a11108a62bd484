"""The run configuration: the example parses, every bad value is a ConfigError naming its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from coordinator.federation._config import load_config, parse_config
from edge_sdk import ConfigError
from edge_sdk.client._backoff import Backoff

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "run.toml"

BASE: dict[str, Any] = {
    "model": {"name": "all-MiniLM-L6-v2"},
    "devices": {"a": "token-aaaa", "b": "token-bbbb"},
    "run": {"dir": "runs/x"},
}


def with_value(table: str, key: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.setdefault(table, {})[key] = value
    return data


def test_the_example_config_parses_with_paths_relative_to_it() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.model.name == "all-MiniLM-L6-v2" and cfg.model.task == "text-classification"
    assert cfg.federation.rounds == 10 and cfg.federation.strategy == "fedavg"
    assert cfg.training.batch_size == 8 and cfg.training.seq_len == 64
    assert cfg.validation is not None and cfg.validation.data == ROOT / "examples" / "data" / "sst2" / "dev.tsv"
    assert cfg.run.dir == ROOT / "examples" / "runs" / "sst2"
    assert cfg.server.chunk_bytes == 1 << 20 and not cfg.server.tls
    assert len(cfg.devices) == 3


def test_defaults_of_a_minimal_config() -> None:
    cfg = parse_config(BASE, base="/srv")
    assert cfg.run.dir == Path("/srv/runs/x")
    assert cfg.federation.fraction == 1.0 and cfg.federation.server_lr == 1.0
    assert cfg.validation is None and cfg.server.port == 8765
    assert dict(cfg.devices) == {"a": "token-aaaa", "b": "token-bbbb"}
    fedadam = parse_config(with_value("federation", "strategy", "fedadam"))
    assert fedadam.federation.server_lr == 1e-3


@pytest.mark.parametrize(
    ("table", "key", "value", "message"),
    [
        ("federation", "fraction", 1.5, r"\[federation\] fraction: must be <= 1"),
        ("federation", "fraction", 0, r"\[federation\] fraction: must be > 0"),
        ("federation", "rounds", 0, r"\[federation\] rounds: must be >= 1"),
        ("federation", "rounds", "ten", r"\[federation\] rounds: must be an integer"),
        ("federation", "min_devices", 3, r"\[federation\] min_devices: 3 is more than the 2 device"),
        ("federation", "strategy", "fedsgd", r"\[federation\] strategy: must be one of"),
        ("federation", "round_deadline_s", -1, r"\[federation\] round_deadline_s: must be > 0"),
        ("federation", "tau", 0.1, r"\[federation\] tau: only applies to strategy = 'fedadam'"),
        ("federation", "roundz", 3, r"\[federation\]: unknown key\(s\) roundz"),
        ("training", "lr", 0, r"\[training\] lr: must be > 0"),
        ("training", "batch_size", True, r"\[training\] batch_size: must be an integer"),
        ("training", "prox_mu", float("nan"), r"\[training\] prox_mu: must be a finite number"),
        ("model", "task", "token-classification", r"\[model\] task: must be one of"),
        ("model", "salience", "random", r"\[model\] salience: must be one of"),
        ("server", "port", 70000, r"\[server\] port: must be <= 65535"),
        ("server", "chunk_size", "64KiB", r"\[server\] chunk_size: must be between 1 MiB and 4 MiB"),
        ("server", "chunk_size", "2M", r"\[server\] chunk_size: ambiguous unit"),
        (
            "server",
            "tls_cert",
            "/nonexistent/cert.pem",
            r"\[server\] tls_cert: /nonexistent/cert.pem does not exist",
        ),
        ("server", "max_connections", 0, r"\[server\] max_connections: must be >= 1"),
        ("validation", "data", "/nonexistent.tsv", r"\[validation\] data: /nonexistent.tsv does not exist"),
        ("devices", "c", "short", r"\[devices\] c: the token must be a string of at least 8"),
        ("devices", "bad name!", "token-cccc", r"\[devices\] bad name!: device names are"),
        ("devices", "c", "token-aaaa", r"\[devices\] c: two devices share this token"),
        ("run", "keep_checkpoints", 0, r"\[run\] keep_checkpoints: must be >= 1"),
    ],
)
def test_a_bad_value_names_its_table_and_key(table: str, key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(with_value(table, key, value), where="run.toml")


def test_structural_errors() -> None:
    with pytest.raises(ConfigError, match=r"the \[model\] table is required"):
        parse_config({k: v for k, v in BASE.items() if k != "model"})
    with pytest.raises(ConfigError, match=r"unknown table\(s\) modle"):
        parse_config({**BASE, "modle": {}})
    with pytest.raises(ConfigError, match=r"\[model\] name: is required"):
        parse_config({**BASE, "model": {}})
    with pytest.raises(ConfigError, match=r"\[devices\]: name at least one device"):
        parse_config({**BASE, "devices": {}})
    with pytest.raises(ConfigError, match=r"\[server\] tls_key: tls_cert and tls_key go together"):
        parse_config({**BASE, "server": {"tls_cert": str(EXAMPLE)}})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_backoff_grows_is_capped_and_jittered() -> None:
    import random

    backoff = Backoff(initial_s=0.5, factor=2.0, max_s=4.0, jitter=0.5)
    rng = random.Random(0)
    for attempt in range(12):
        cap = min(4.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(50)]
        assert all(cap * 0.5 <= d <= cap for d in delays)
        assert len(set(delays)) > 1  # jittered
    with pytest.raises(ConfigError):
        Backoff(initial_s=5, max_s=1)
    with pytest.raises(ConfigError):
        Backoff(jitter=1.0)
