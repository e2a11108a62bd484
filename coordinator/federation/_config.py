"""The run configuration of ``edge-coordinator serve``: frozen dataclasses read from a TOML file.

Every bad value is a :class:`~edge_sdk.ConfigError` naming the file, the table and the key
(``run.toml: [federation] fraction: must be in (0, 1], got 1.5``); unknown keys are errors too, so a
typo is never silently ignored. Relative paths are resolved against the config file's folder. The
tables a simulation shares (``[model]``, ``[federation]``, ``[training]``) are read by ``_tables``.

Tables and keys (see ``examples/run.toml`` and ``docs/running.md``):

- ``[model]`` name (folder or packaged name), task, labels, num_labels, seed, salience;
- ``[federation]`` rounds, fraction, min_devices, device_wait_s, round_deadline_s, strategy,
  server_lr, beta1, beta2, tau, max_update_norm_ratio, min_margin;
- ``[aggregation]`` (optional) rule, trim, clip, clip_factor, weight_cap (robust merging);
- ``[privacy]`` (optional) mode, clip_norm, noise_multiplier, delta, reproducible (DP-FedAvg);
- ``[training]`` local_steps, lr, batch_size, seq_len, prox_mu;
- ``[validation]`` (optional) data, limit, batch_size, tokenizer, seq_len, and how the file is read:
  format, delimiter, text_column, text_pair_column, label_column, text_separator (docs/data.md);
- ``[server]`` host, port, port_file, tls_cert, tls_key, max_connections, chunk_size,
  hello_timeout_s, send_concurrency;
- ``[devices]`` name = "bearer token", one line per device;
- ``[run]`` dir, keep_checkpoints;
- ``[deploy]`` (optional) enabled, batch_size, seq_len, quantize, timeout_s, operator_token (and
  labels, read as ``[model] labels``);
- ``[status]`` (optional) enabled, host, port: the status page and metrics, behind the operator token
  (on by default when ``[deploy] operator_token`` is set).

:class:`FederationConfig` and :class:`TrainingConfig` are all the federation engine needs; a
simulator builds them directly, without a file.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.federation._tables import (
    STRATEGIES,
    TASKS,
    FederationConfig,
    ModelConfig,
    Table,
    TrainingConfig,
    read_data_format,
    read_federation,
    read_labels,
    read_levers,
    read_model,
    read_toml,
    read_training,
    table_reader,
)
from edge_sdk import DataFormat
from edge_sdk._errors import ConfigError
from edge_sdk.protocol import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from edge_sdk.scaling import LeverPolicy

__all__ = [
    "DEVICE_NAME",
    "STRATEGIES",
    "TASKS",
    "DeployConfig",
    "FederationConfig",
    "ModelConfig",
    "RunConfig",
    "ServerConfig",
    "StatusConfig",
    "StorageConfig",
    "TrainingConfig",
    "ValidationConfig",
    "load_config",
    "parse_config",
]

DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_TOKEN_CHARS = 8


@dataclass(frozen=True)
class ValidationConfig:
    data: Path  # a CSV, TSV, JSON Lines or Parquet file of labelled texts (docs/data.md)
    format: DataFormat = field(default_factory=DataFormat)  # format, delimiter, which columns
    limit: int | None = 512
    batch_size: int = 32
    tokenizer: Path | None = None  # folder with tokenizer.json; default: the model folder
    seq_len: int | None = None  # tokens per example; default: [training] seq_len


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (logged, and written to port_file)
    port_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = 256
    chunk_bytes: int = 1 << 20
    hello_timeout_s: float = 30.0
    send_concurrency: int = 4  # tasks whose weights are sent at the same time (bounds memory)
    data_channel: bool = True  # offer devices a TCP data channel for tensor chunks (``edge_sdk.protocol._channel``)
    data_port: int = 0  # the data channel's port (0: any free port, announced in each Welcome)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class StorageConfig:
    dir: Path
    keep_checkpoints: int = 3


@dataclass(frozen=True)
class DeployConfig:
    """Inference models for the devices: planned per device, exported to ONNX on the device."""

    enabled: bool = True  # deploy when the run finishes (and allow on-demand deploys)
    batch_size: int = 1  # the inference workload the memory model plans for
    seq_len: int = 128  # ... and the served model's maximum sequence length
    quantize: bool = False  # also write a dynamic int8 model (per-channel weights) and measure its drift
    timeout_s: float = 600.0  # bound on one device's deploy: transfer, export, checks, answer
    operator_token: str | None = field(default=None, repr=False)  # bearer token of on-demand deploys


@dataclass(frozen=True)
class StatusConfig:
    """The status port: ``GET /`` (page), ``/status.json``, ``/metrics``, behind the operator token."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8766  # 0: any free port (logged)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    federation: FederationConfig
    training: TrainingConfig
    validation: ValidationConfig | None
    server: ServerConfig
    devices: Mapping[str, str]  # device name -> bearer token (read-only)
    run: StorageConfig
    deploy: DeployConfig = field(default_factory=DeployConfig)
    levers: LeverPolicy = field(default_factory=LeverPolicy)  # [levers]: what the planner may use
    status: StatusConfig = field(default_factory=StatusConfig)  # [status]: the status page and metrics
    source: Path | None = field(default=None, compare=False)


# ---------------------------------------------------------------------------------------- reading


_TABLES = (
    "model",
    "federation",
    "aggregation",
    "privacy",
    "training",
    "levers",
    "validation",
    "server",
    "devices",
    "run",
    "deploy",
    "status",
)


def _validation(t: Table) -> ValidationConfig:
    data = t.path("data", must_exist=True, required=True)
    assert data is not None
    limit = t.integer("limit", 512, low=0)
    cfg = ValidationConfig(
        data=data,
        limit=limit or None,
        batch_size=t.integer("batch_size", 32, low=1),
        tokenizer=t.path("tokenizer", must_exist=True),
        seq_len=t.integer("seq_len", None, low=2, high=8192) if t.has("seq_len") else None,
        format=read_data_format(t),
    )
    t.done()
    return cfg


def _server(t: Table) -> ServerConfig:
    cert = t.path("tls_cert", must_exist=True)
    key = t.path("tls_key", must_exist=True)
    if (cert is None) != (key is None):
        raise t.error("tls_key" if key is None else "tls_cert", "tls_cert and tls_key go together")
    chunk = t.size("chunk_size", 1 << 20)
    if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
        raise t.error("chunk_size", f"must be between 1 MiB and 4 MiB, got {chunk} bytes")
    cfg = ServerConfig(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 8765, low=0, high=65535),
        port_file=t.path("port_file"),
        tls_cert=cert,
        tls_key=key,
        max_connections=t.integer("max_connections", 256, low=1),
        chunk_bytes=chunk,
        hello_timeout_s=t.number("hello_timeout_s", 30.0, low=0.0, open_low=True),
        send_concurrency=t.integer("send_concurrency", 4, low=1),
        data_channel=t.flag("data_channel", True),
        data_port=t.integer("data_port", 0, low=0, high=65535),
    )
    t.done()
    return cfg


def _good_token(token: object) -> bool:
    return isinstance(token, str) and len(token) >= MIN_TOKEN_CHARS and token.isprintable() and " " not in token


_TOKEN_RULE = f"the token must be a string of at least {MIN_TOKEN_CHARS} printable characters without spaces"


def _devices(t: Table) -> Mapping[str, str]:
    tokens: dict[str, str] = {}
    for name, token in t.data.items():
        t.used.add(name)
        if not DEVICE_NAME.fullmatch(name):
            raise t.error(name, "device names are 1-64 letters, digits, '.', '_' or '-'")
        if not _good_token(token):
            raise t.error(name, _TOKEN_RULE)
        if token in tokens.values():
            raise t.error(name, "two devices share this token: give every device its own")
        tokens[name] = token
    if not tokens:
        raise t.error(None, 'name at least one device: name = "token"')
    return types.MappingProxyType(tokens)


def _run(t: Table) -> StorageConfig:
    directory = t.path("dir", required=True)
    assert directory is not None
    cfg = StorageConfig(dir=directory, keep_checkpoints=t.integer("keep_checkpoints", 3, low=1))
    t.done()
    return cfg


def _deploy(t: Table, *, device_tokens: Mapping[str, str]) -> DeployConfig:
    token = t.value("operator_token", None)
    if token is not None:
        if not _good_token(token):
            raise t.error("operator_token", _TOKEN_RULE)
        if token in device_tokens.values():
            raise t.error("operator_token", "must differ from every device's token")
    cfg = DeployConfig(
        enabled=t.flag("enabled", True),
        batch_size=t.integer("batch_size", 1, low=1),
        seq_len=t.integer("seq_len", 128, low=2, high=8192),
        quantize=t.flag("quantize", False),
        timeout_s=t.number("timeout_s", 600.0, low=0.0, open_low=True),
        operator_token=token,
    )
    t.done()
    return cfg


def _status(t: Table, *, operator_token: str | None) -> StatusConfig:
    enabled = t.flag("enabled", operator_token is not None)
    if enabled and operator_token is None:
        raise t.error("enabled", "the status page is behind the operator token: set [deploy] operator_token")
    cfg = StatusConfig(
        enabled=enabled,
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 8766, low=0, high=65535),
    )
    t.done()
    return cfg


def _with_deploy_labels(model: ModelConfig, t: Table) -> ModelConfig:
    """``[deploy] labels`` (the older place of the class names) as ``[model] labels``; not both."""
    labels = read_labels(t, "labels")
    if labels is None:
        return model
    if model.labels is not None:
        raise t.error("labels", "and [model] labels both name the classes: keep [model] labels only")
    if model.num_labels is not None and model.num_labels != len(labels):
        raise t.error("labels", f"names {len(labels)} classes; [model] num_labels is {model.num_labels}")
    return dataclasses.replace(model, labels=labels)


def parse_config(data: Mapping[str, Any], *, base: Path | str = ".", where: str = "config") -> RunConfig:
    """A :class:`RunConfig` from parsed TOML ``data``; relative paths resolve against ``base``."""
    table = table_reader(data, _TABLES, base=Path(base), where=where)

    federation = read_federation(table("federation"), aggregation=table("aggregation"), privacy=table("privacy"))
    deploy_table = table("deploy")
    model = _with_deploy_labels(read_model(table("model")), deploy_table)
    devices = _devices(table("devices"))
    deploy = _deploy(deploy_table, device_tokens=devices)
    cfg = RunConfig(
        model=model,
        federation=federation,
        training=read_training(table("training")),
        validation=_validation(table("validation")) if "validation" in data else None,
        server=_server(table("server")),
        devices=devices,
        run=_run(table("run")),
        deploy=deploy,
        levers=read_levers(table("levers")),
        status=_status(table("status"), operator_token=deploy.operator_token),
    )
    if model.salience == "activation" and cfg.validation is None:
        raise ConfigError(f"{where}: [model] salience = 'activation' needs a [validation] data set to calibrate on")
    if federation.min_devices > len(cfg.devices):
        raise ConfigError(
            f"{where}: [federation] min_devices: {federation.min_devices} is more than the"
            f" {len(cfg.devices)} device(s) named in [devices]"
        )
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read and check a run configuration file (TOML)."""
    path = Path(path)
    data = read_toml(path)
    cfg = parse_config(data, base=path.resolve().parent, where=str(path))
    return dataclasses.replace(cfg, source=path)
