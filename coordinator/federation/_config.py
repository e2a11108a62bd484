"""The run configuration of ``edge-coordinator serve``: frozen dataclasses read from a TOML file.

Every bad value is a :class:`~edge_sdk.ConfigError` naming the file, the table and the key
(``run.toml: [federation] fraction: must be in (0, 1], got 1.5``); unknown keys are errors too, so a
typo is never silently ignored. Relative paths are resolved against the config file's folder.

Tables and keys (see ``examples/run.toml`` and ``docs/running.md``):

- ``[model]`` name (folder or packaged name), task, num_labels, seed, salience;
- ``[federation]`` rounds, fraction, min_devices, device_wait_s, round_deadline_s, strategy,
  server_lr, beta1, beta2, tau, max_update_norm_ratio, min_margin;
- ``[training]`` local_steps, lr, batch_size, seq_len, prox_mu;
- ``[validation]`` (optional) data, limit, batch_size, tokenizer, seq_len;
- ``[server]`` host, port, port_file, tls_cert, tls_key, max_connections, chunk_size,
  hello_timeout_s, send_concurrency;
- ``[devices]`` name = "bearer token", one line per device;
- ``[run]`` dir, keep_checkpoints;
- ``[deploy]`` (optional) enabled, batch_size, seq_len, quantize, timeout_s, labels, operator_token.

:class:`FederationConfig` and :class:`TrainingConfig` are all the federation engine needs; a
simulator builds them directly, without a file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk._errors import ConfigError
from edge_sdk._units import parse_size
from edge_sdk.protocol import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from edge_sdk.scaling import DEFAULT_MIN_MARGIN_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEVICE_NAME",
    "STRATEGIES",
    "TASKS",
    "DeployConfig",
    "FederationConfig",
    "ModelConfig",
    "RunConfig",
    "ServerConfig",
    "StorageConfig",
    "TrainingConfig",
    "ValidationConfig",
    "load_config",
    "parse_config",
]

STRATEGIES = ("fedavg", "fedadam")
TASKS = ("text-classification",)
SALIENCE = ("weight_l1", "activation")
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_TOKEN_CHARS = 8


@dataclass(frozen=True)
class ModelConfig:
    name: str  # a model folder, or a packaged model name (all-MiniLM-L6-v2)
    task: str = "text-classification"
    num_labels: int = 2
    seed: int = 0  # seeds the task head, device selection and each task's local training seed
    salience: str = "weight_l1"  # or "activation" (calibrated on the validation data)


@dataclass(frozen=True)
class FederationConfig:
    """How rounds run: how many, who takes part, how long to wait, how updates are merged."""

    rounds: int = 10
    fraction: float = 1.0  # of the expected devices taking part in each round
    min_devices: int = 1  # a round never starts with fewer
    device_wait_s: float = 300.0  # bound on waiting for devices before a round
    round_deadline_s: float = 600.0  # results arriving later are dropped
    strategy: str = "fedavg"
    server_lr: float = 1.0  # FedAvg step size; FedAdam's learning rate (default 1e-3 there)
    beta1: float = 0.9  # FedAdam only
    beta2: float = 0.99
    tau: float = 1e-3
    max_update_norm_ratio: float = 2.0  # an update's L2 norm may be at most this x what was sent
    # Planning keeps at least this much of each device's budget in reserve for what the memory model
    # does not count (a detected budget's own safety margin counts towards it; see FederationEngine).
    min_margin_bytes: int = DEFAULT_MIN_MARGIN_BYTES


@dataclass(frozen=True)
class TrainingConfig:
    """Local training on each device."""

    local_steps: int = 10
    lr: float = 5e-5
    batch_size: int = 8
    seq_len: int = 64
    prox_mu: float = 0.0


@dataclass(frozen=True)
class ValidationConfig:
    data: Path  # a TSV (label + sentence, or sentence1 + sentence2 + label)
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
    labels: tuple[str, ...] = ()  # class names for the served model (default LABEL_0, LABEL_1, ...)
    operator_token: str | None = field(default=None, repr=False)  # bearer token of on-demand deploys


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
    source: Path | None = field(default=None, compare=False)


# ---------------------------------------------------------------------------------------- reading


class _Table:
    """One TOML table being read: typed getters that name ``[table] key`` in every error."""

    def __init__(self, where: str, name: str, data: Any, base: Path) -> None:
        self.where, self.name, self.base = where, name, base
        if not isinstance(data, Mapping):
            raise self.error(None, f"must be a table, got {type(data).__name__}")
        self.data = dict(data)
        self.used: set[str] = set()

    def error(self, key: str | None, problem: str) -> ConfigError:
        place = f"[{self.name}]" + (f" {key}" if key else "")
        return ConfigError(f"{self.where}: {place}: {problem}")

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, default: str | None = None, *, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def integer(
        self, key: str, default: int | None, *, low: int | None = None, high: int | None = None
    ) -> int:
        value = self._get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        self._bounds(key, value, low, high)
        return value

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float | None = None,
        high: float | None = None,
        open_low: bool = False,
    ) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value!r}")
        if open_low and low is not None and value <= low:
            raise self.error(key, f"must be > {low}, got {value}")
        self._bounds(key, value, None if open_low else low, high)
        return float(value)

    def _bounds(self, key: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise self.error(key, f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise self.error(key, f"must be <= {high}, got {value}")

    def path(self, key: str, *, must_exist: bool = False, required: bool = False) -> Path | None:
        value = self._get(key, None)
        if value is None or value == "":
            if required:
                raise self.error(key, "is required")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a path string, got {value!r}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.base / path
        if must_exist and not path.exists():
            raise self.error(key, f"{path} does not exist")
        return path

    def size(self, key: str, default: int, *, allow_zero: bool = False) -> int:
        value = self._get(key, default)
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ConfigError as exc:
                raise self.error(key, str(exc)) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
            raise self.error(key, f"must be a size such as '1MiB' or a number of bytes, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(None, f"unknown key(s) {', '.join(unknown)}")


_TABLES = ("model", "federation", "training", "validation", "server", "devices", "run", "deploy")


def _model(t: _Table) -> ModelConfig:
    name = t.text("name")
    local = Path(name).expanduser()
    local = local if local.is_absolute() else t.base / local
    cfg = ModelConfig(
        name=str(local) if local.is_dir() else name,
        task=t.text("task", "text-classification", choices=TASKS),
        num_labels=t.integer("num_labels", 2, low=2),
        seed=t.integer("seed", 0, low=0, high=2**31 - 1),
        salience=t.text("salience", "weight_l1", choices=SALIENCE),
    )
    t.done()
    return cfg


def _federation(t: _Table) -> FederationConfig:
    strategy = t.text("strategy", "fedavg", choices=STRATEGIES)
    default_lr = 1.0 if strategy == "fedavg" else 1e-3
    cfg = FederationConfig(
        rounds=t.integer("rounds", 10, low=1),
        fraction=t.number("fraction", 1.0, low=0.0, high=1.0, open_low=True),
        min_devices=t.integer("min_devices", 1, low=1),
        device_wait_s=t.number("device_wait_s", 300.0, low=0.0, open_low=True),
        round_deadline_s=t.number("round_deadline_s", 600.0, low=0.0, open_low=True),
        strategy=strategy,
        server_lr=t.number("server_lr", default_lr, low=0.0, open_low=True),
        beta1=t.number("beta1", 0.9, low=0.0, high=0.999999),
        beta2=t.number("beta2", 0.99, low=0.0, high=0.999999),
        tau=t.number("tau", 1e-3, low=0.0, open_low=True),
        max_update_norm_ratio=t.number("max_update_norm_ratio", 2.0, low=1.0),
        min_margin_bytes=t.size("min_margin", DEFAULT_MIN_MARGIN_BYTES, allow_zero=True),
    )
    if strategy == "fedavg":
        for key in ("beta1", "beta2", "tau"):
            if t.has(key):
                raise t.error(key, "only applies to strategy = 'fedadam'")
    t.done()
    return cfg


def _training(t: _Table) -> TrainingConfig:
    cfg = TrainingConfig(
        local_steps=t.integer("local_steps", 10, low=1),
        lr=t.number("lr", 5e-5, low=0.0, open_low=True),
        batch_size=t.integer("batch_size", 8, low=1),
        seq_len=t.integer("seq_len", 64, low=1, high=8192),
        prox_mu=t.number("prox_mu", 0.0, low=0.0),
    )
    t.done()
    return cfg


def _validation(t: _Table) -> ValidationConfig:
    data = t.path("data", must_exist=True, required=True)
    assert data is not None
    limit = t.integer("limit", 512, low=0)
    cfg = ValidationConfig(
        data=data,
        limit=limit or None,
        batch_size=t.integer("batch_size", 32, low=1),
        tokenizer=t.path("tokenizer", must_exist=True),
        seq_len=t.integer("seq_len", None, low=2, high=8192) if t.has("seq_len") else None,
    )
    t.done()
    return cfg


def _server(t: _Table) -> ServerConfig:
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
    )
    t.done()
    return cfg


def _good_token(token: object) -> bool:
    return isinstance(token, str) and len(token) >= MIN_TOKEN_CHARS and token.isprintable() and " " not in token


_TOKEN_RULE = f"the token must be a string of at least {MIN_TOKEN_CHARS} printable characters without spaces"


def _devices(t: _Table) -> Mapping[str, str]:
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


def _run(t: _Table) -> StorageConfig:
    directory = t.path("dir", required=True)
    assert directory is not None
    cfg = StorageConfig(dir=directory, keep_checkpoints=t.integer("keep_checkpoints", 3, low=1))
    t.done()
    return cfg


def _deploy(t: _Table, *, num_labels: int, device_tokens: Mapping[str, str]) -> DeployConfig:
    labels = t._get("labels", [])
    if (
        not isinstance(labels, list)
        or not all(isinstance(x, str) and x.strip() for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise t.error("labels", f"must be a list of distinct, non-empty names, got {labels!r}")
    if labels and len(labels) != num_labels:
        raise t.error("labels", f"names {len(labels)} classes; [model] num_labels is {num_labels}")
    token = t._get("operator_token", None)
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
        labels=tuple(labels),
        operator_token=token,
    )
    t.done()
    return cfg


def _tables(
    data: Mapping[str, Any], known: tuple[str, ...], *, base: Path, where: str
) -> Callable[[str], _Table]:
    """Check a config's table names ([model], [devices] and [run] required); returns a table reader."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(unknown)} (known: {', '.join(known)})")
    for required in ("model", "devices", "run"):
        if required not in data:
            raise ConfigError(f"{where}: the [{required}] table is required")
    return lambda name: _Table(where, name, data.get(name, {}), base)


def parse_config(data: Mapping[str, Any], *, base: Path | str = ".", where: str = "config") -> RunConfig:
    """A :class:`RunConfig` from parsed TOML ``data``; relative paths resolve against ``base``."""
    table = _tables(data, _TABLES, base=Path(base), where=where)

    federation = _federation(table("federation"))
    model = _model(table("model"))
    devices = _devices(table("devices"))
    cfg = RunConfig(
        model=model,
        federation=federation,
        training=_training(table("training")),
        validation=_validation(table("validation")) if "validation" in data else None,
        server=_server(table("server")),
        devices=devices,
        run=_run(table("run")),
        deploy=_deploy(table("deploy"), num_labels=model.num_labels, device_tokens=devices),
    )
    if federation.min_devices > len(cfg.devices):
        raise ConfigError(
            f"{where}: [federation] min_devices: {federation.min_devices} is more than the"
            f" {len(cfg.devices)} device(s) named in [devices]"
        )
    return cfg


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; an unreadable file or bad TOML is a :class:`ConfigError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and check a run configuration file (TOML)."""
    path = Path(path)
    data = read_toml(path)
    cfg = parse_config(data, base=path.resolve().parent, where=str(path))
    return dataclasses.replace(cfg, source=path)
