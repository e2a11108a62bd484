"""The configuration of ``edge-coordinator simulate``: frozen dataclasses read from a TOML file.

Tables (``examples/sim.toml`` is a complete, commented example):

- ``[model]``, ``[federation]``, ``[aggregation]``, ``[privacy]``, ``[training]``: as in a served run
  (the shared table readers of ``coordinator.federation``; ``[privacy] reproducible`` defaults to
  true here: the noise is seeded from the run's seed);
- ``[data]`` kind ("file", or a format's name "tsv", "csv", "jsonl", "parquet"; or "synthetic" or
  "images"), train, dev, tokenizer, train_limit, dev_limit, partition ("iid", "dirichlet" or
  "sorted"), alpha, skew, skewed_devices, min_shard; how the files are read: format, delimiter,
  text_column, text_pair_column, label_column, text_separator (docs/data.md); for synthetic data size,
  dev_size, vocab_size, seq_len; for images, train and dev are image folders (one sub-folder per
  class), preprocessed as the model folder's ``preprocessor_config.json`` says;
- ``[devices]`` device class = how many (classes from ``profiles/``), e.g. ``raspberry-pi-4-2gb = 5``;
- ``[method]`` name, width ("budget": the largest sub-network whose training fits each device's budget;
  "full": every device the whole model, memory ignored; "exclusive": the whole model, plain, on the
  devices that can train it and no others; "static": fixed width ratios whatever the
  device), reorder (salience reordering before slicing), ratios (for "static");
- ``[simulation]`` engine ("local" or "ray"), ray_address, max_workers, threads, fresh_process,
  budget_scale (multiplies every device class's usable budget), runtime_footprint;
- ``[attack]`` devices, mode, scale, norm_fraction, num_samples: simulated attackers
  (:mod:`coordinator.simulation._attack`; absent: none);
- ``[run]`` dir.

Every bad value is a :class:`~edge_sdk.ConfigError` naming the file, the table and the key; unknown
keys are errors. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.federation import (
    WIDTHS,
    FederationConfig,
    ModelConfig,
    Table,
    TrainingConfig,
    read_data_format,
    read_federation,
    read_levers,
    read_model,
    read_toml,
    read_training,
    table_reader,
)
from coordinator.simulation._attack import AttackConfig, read_attack
from coordinator.simulation._partition import PARTITIONS
from edge_sdk import DataFormat
from edge_sdk._errors import ConfigError
from edge_sdk.scaling import TRAINING_RUNTIME_BYTES, LeverPolicy

__all__ = [
    "DataConfig",
    "MethodConfig",
    "SimulationConfig",
    "SimulationSettings",
    "load_simulation_config",
    "parse_simulation_config",
]

ENGINES = ("local", "ray")
_TABLES = (
    "model",
    "data",
    "devices",
    "method",
    "federation",
    "aggregation",
    "privacy",
    "training",
    "levers",
    "simulation",
    "attack",
    "run",
)


@dataclass(frozen=True)
class DataConfig:
    kind: str = "file"  # "file" (any format: "tsv", "csv", "jsonl", "parquet" name one) | "synthetic" | "images"
    train: Path | None = None
    dev: Path | None = None
    tokenizer: Path | None = None  # folder with tokenizer.json (default: the model folder)
    train_limit: int | None = None
    dev_limit: int | None = None
    partition: str = "iid"
    alpha: float = 0.5  # Dirichlet concentration (partition = "dirichlet")
    skew: float = 0.8  # share of examples placed by label (partition = "sorted"; 0: IID)
    skewed_devices: int = 0  # partition = "sorted": only the first k devices' shards sorted (0: all)
    min_shard: int = 8  # every device holds at least this many examples
    size: int = 2000  # synthetic: training examples
    dev_size: int = 256  # synthetic: validation examples
    vocab_size: int = 64  # synthetic
    seq_len: int = 16  # synthetic: stored sequence length (>= [training] seq_len)
    format: DataFormat = field(default_factory=DataFormat)  # how train and dev are read (docs/data.md)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "raffm"
    width: str = "budget"  # "budget" | "full" | "static" | "exclusive"
    reorder: bool = True
    ratios: tuple[float, ...] = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class SimulationSettings:
    engine: str = "local"  # "local" | "ray"
    ray_address: str | None = None
    max_workers: int = 2
    threads: int = 1  # torch threads per worker
    fresh_process: bool = False  # a new worker process for every task
    budget_scale: float = 1.0  # multiplies each device class's usable training budget
    runtime_footprint: int = TRAINING_RUNTIME_BYTES  # assumed for every device class


@dataclass(frozen=True)
class SimulationConfig:
    model: ModelConfig
    data: DataConfig
    devices: Mapping[str, int]  # device class -> count (read-only, in file order)
    method: MethodConfig
    federation: FederationConfig
    training: TrainingConfig
    simulation: SimulationSettings
    run_dir: Path
    levers: LeverPolicy = field(default_factory=LeverPolicy)  # [levers]: what the planner may use
    attack: AttackConfig = field(default_factory=AttackConfig)  # [attack]: simulated attackers (none)
    source: Path | None = field(default=None, compare=False)

    @property
    def num_devices(self) -> int:
        return sum(self.devices.values())


def _optional_int(t: Table, key: str, *, low: int) -> int | None:
    if not t.has(key):
        return None
    value = t.integer(key, None, low=low)
    return value or None


DATA_KINDS = ("file", "tsv", "csv", "jsonl", "parquet", "synthetic", "images")


def _data(t: Table) -> DataConfig:
    kind = t.text("kind", "file", choices=DATA_KINDS)
    hint = kind if kind not in ("file", "synthetic", "images") else None  # kind = "csv": the format, unless format says
    if hint is not None and t.has("format") and t.value("format") != hint:
        raise t.error("format", f"is {t.value('format')!r} but kind is {kind!r}: set kind = 'file'")
    fmt = read_data_format(t, format_default=hint)
    if kind in ("synthetic", "images") and fmt != DataFormat():
        raise t.error(None, f"format and column keys apply to data files, not kind = {kind!r}")
    cfg = DataConfig(
        kind=kind if kind in ("synthetic", "images") else "file",
        format=fmt,
        train=t.path("train", must_exist=True, required=kind != "synthetic"),
        dev=t.path("dev", must_exist=True),
        tokenizer=t.path("tokenizer", must_exist=True),
        train_limit=_optional_int(t, "train_limit", low=0),
        dev_limit=_optional_int(t, "dev_limit", low=0),
        partition=t.text("partition", "iid", choices=PARTITIONS),
        alpha=t.number("alpha", 0.5, low=0.0, open_low=True),
        skew=t.number("skew", 0.8, low=0.0, high=1.0),
        skewed_devices=t.integer("skewed_devices", 0, low=0),
        min_shard=t.integer("min_shard", 8, low=1),
        size=t.integer("size", 2000, low=1),
        dev_size=t.integer("dev_size", 256, low=1),
        vocab_size=t.integer("vocab_size", 64, low=8),
        seq_len=t.integer("seq_len", 16, low=2),
    )
    t.done()
    return cfg


def _devices(t: Table) -> Mapping[str, int]:
    from edge_sdk import load_device_class

    counts: dict[str, int] = {}
    for name in list(t.data):
        count = t.integer(name, None, low=0)
        try:
            load_device_class(name)
        except ConfigError as exc:
            raise t.error(name, str(exc)) from None
        if count:
            counts[name] = count
    if not counts:
        raise t.error(None, "name at least one device class and how many: raspberry-pi-4-2gb = 5")
    return types.MappingProxyType(counts)


def _method(t: Table) -> MethodConfig:
    ratios = t.value("ratios", [1.0, 0.5, 0.25])
    if (
        not isinstance(ratios, list)
        or not ratios
        or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios)
    ):
        raise t.error("ratios", f"must be a non-empty list of numbers in (0, 1], got {ratios!r}")
    cfg = MethodConfig(
        name=t.text("name", "raffm"),
        width=t.text("width", "budget", choices=WIDTHS),
        reorder=t.flag("reorder", True),
        ratios=tuple(float(r) for r in ratios),
    )
    t.done()
    return cfg


def _simulation(t: Table) -> SimulationSettings:
    address = t.value("ray_address", None)
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise t.error("ray_address", f"must be a non-empty string, got {address!r}")
    cfg = SimulationSettings(
        engine=t.text("engine", "local", choices=ENGINES),
        ray_address=address,
        max_workers=t.integer("max_workers", 2, low=1),
        threads=t.integer("threads", 1, low=1),
        fresh_process=t.flag("fresh_process", False),
        budget_scale=t.number("budget_scale", 1.0, low=0.0, open_low=True),
        runtime_footprint=t.size("runtime_footprint", TRAINING_RUNTIME_BYTES, allow_zero=True),
    )
    t.done()
    return cfg


def parse_simulation_config(
    data: Mapping[str, Any], *, base: Path | str = ".", where: str = "config"
) -> SimulationConfig:
    """A :class:`SimulationConfig` from parsed TOML ``data``; relative paths resolve against ``base``."""
    table = table_reader(data, _TABLES, base=Path(base), where=where)

    run = table("run")
    run_dir = run.path("dir", required=True)
    assert run_dir is not None
    run.done()
    cfg = SimulationConfig(
        model=read_model(table("model")),
        data=_data(table("data")),
        devices=_devices(table("devices")),
        method=_method(table("method")),
        federation=read_federation(
            table("federation"), aggregation=table("aggregation"), privacy=table("privacy"), reproducible_noise=True
        ),
        training=read_training(table("training")),
        simulation=_simulation(table("simulation")),
        run_dir=run_dir,
        levers=read_levers(table("levers")),
        attack=read_attack(table("attack")),
    )
    if cfg.federation.min_devices > cfg.num_devices:
        raise ConfigError(
            f"{where}: [federation] min_devices: {cfg.federation.min_devices} is more than the"
            f" {cfg.num_devices} simulated device(s)"
        )
    if cfg.model.salience == "activation" and (cfg.data.kind == "synthetic" or cfg.data.dev is None):
        raise ConfigError(f"{where}: [model] salience = 'activation' needs [data] dev to calibrate on")
    if cfg.data.kind == "synthetic" and cfg.training.seq_len > cfg.data.seq_len:
        raise ConfigError(
            f"{where}: [training] seq_len {cfg.training.seq_len} is longer than the synthetic data's"
            f" [data] seq_len {cfg.data.seq_len}"
        )
    return cfg


def load_simulation_config(path: str | Path) -> SimulationConfig:
    """Read and check a simulation configuration file (TOML)."""
    path = Path(path)
    data = read_toml(path)
    cfg = parse_simulation_config(data, base=path.resolve().parent, where=str(path))
    return SimulationConfig(**{**cfg.__dict__, "source": path})
