"""Reading TOML configuration tables: a typed table reader, and the tables every config shares.

:class:`Table` reads one table with typed getters whose errors name the file, the table and the key
(``run.toml: [federation] fraction: must be in (0, 1], got 1.5``); :meth:`Table.done` makes unknown
keys errors, so a typo is never silently ignored. :func:`table_reader` checks a file's table names.
The ``[model]``, ``[federation]`` (with ``[aggregation]`` and ``[privacy]``) and ``[training]``
tables mean the same in a served run (``_config``) and a simulation (``coordinator.simulation``):
:func:`read_model`, :func:`read_federation` and :func:`read_training` read them for both.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.federation._privacy import PRIVACY_MODES, PrivacyConfig
from coordinator.federation._robust import CLIPS, RULES, AggregationRule
from edge_sdk import DataFormat, LabelMap
from edge_sdk._errors import ConfigError
from edge_sdk._units import parse_size
from edge_sdk.protocol import ENCODINGS
from edge_sdk.scaling import DEFAULT_MIN_MARGIN_BYTES, SALIENCE_KINDS, LeverPolicy, ParentModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DATA_FORMAT_KEYS",
    "DEFAULT_UPDATE_ENCODING",
    "LABELLED_TASKS",
    "STRATEGIES",
    "TASKS",
    "UPDATE_ENCODINGS",
    "FederationConfig",
    "ModelConfig",
    "Table",
    "TrainingConfig",
    "read_aggregation",
    "read_data_format",
    "read_federation",
    "read_labels",
    "read_levers",
    "read_model",
    "read_privacy",
    "read_toml",
    "read_training",
    "resolve_labels",
    "table_reader",
    "task_config",
]

STRATEGIES = ("fedavg", "fedadam")
UPDATE_ENCODINGS = ("weights", *ENCODINGS)
DEFAULT_UPDATE_ENCODING = "int8+zstd"  # measured by bench/updates.py (docs/wire-encodings.md)
TASKS = ("text-classification", "image-classification", "causal-lm")
LABELLED_TASKS = ("text-classification", "image-classification")  # the tasks with a label map


@dataclass(frozen=True)
class ModelConfig:
    name: str  # a model folder, or a packaged model name (all-MiniLM-L6-v2)
    task: str = "text-classification"
    num_labels: int | None = None  # None: as many as the labels (named, or found in the data), else 2
    labels: LabelMap | None = None  # [model] labels; None: inferred from the coordinator's data
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
    # An update's change (its L2 distance from what was sent) may be at most this x the norm of what was
    # sent: honest local training moves weights by a few per cent at most; x(-1.9) moves them by 290 %.
    max_delta_norm_ratio: float = 0.5
    # Planning keeps at least this much of each device's budget in reserve for what the memory model
    # does not count (a detected budget's own safety margin counts towards it; see FederationEngine).
    min_margin_bytes: int = DEFAULT_MIN_MARGIN_BYTES
    # How updates are merged ([aggregation]: robust rules) and whether with differential privacy
    # ([privacy]); the tables are read with [federation] (see read_federation).
    aggregation: AggregationRule = field(default_factory=AggregationRule)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # How devices that can (SDK with the encodings capability) send their updates: deltas against what
    # they received, packed as one of edge_sdk.protocol.ENCODINGS; "weights": plain float32 weights.
    update_encoding: str = DEFAULT_UPDATE_ENCODING


@dataclass(frozen=True)
class TrainingConfig:
    """Local training on each device."""

    local_steps: int = 10
    lr: float = 5e-5
    batch_size: int = 8
    seq_len: int = 64  # the longest row: rows are truncated to it, batches padded to their longest row
    prox_mu: float = 0.0
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    dropout: float | None = None  # None: the model's own dropout probabilities
    seed: int | None = None  # seeds batch order and local training; None: the [model] seed


class Table:
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

    def value(self, key: str, default: Any = None) -> Any:
        """The raw value of ``key`` (``default`` when absent), marked as read; check it yourself."""
        self.used.add(key)
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, default: str | None = None, *, choices: tuple[str, ...] = ()) -> str:
        value = self.value(key, default)
        if value is None:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def integer(self, key: str, default: int | None, *, low: int | None = None, high: int | None = None) -> int:
        value = self.value(key, default)
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
        value = self.value(key, default)
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
        value = self.value(key, None)
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
        value = self.value(key, default)
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ConfigError as exc:
                raise self.error(key, str(exc)) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
            raise self.error(key, f"must be a size such as '1MiB' or a number of bytes, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.value(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(None, f"unknown key(s) {', '.join(unknown)}")


def read_model(t: Table) -> ModelConfig:
    name = t.text("name")
    local = Path(name).expanduser()
    local = local if local.is_absolute() else t.base / local
    cfg = ModelConfig(
        name=str(local) if local.is_dir() else name,
        task=t.text("task", "text-classification", choices=TASKS),
        num_labels=t.integer("num_labels", None, low=2) if t.has("num_labels") else None,
        labels=read_labels(t, "labels"),
        seed=t.integer("seed", 0, low=0, high=2**31 - 1),
        salience=t.text("salience", "weight_l1", choices=SALIENCE_KINDS),
    )
    if cfg.task not in LABELLED_TASKS:
        for key in ("labels", "num_labels"):
            if t.has(key):
                raise t.error(key, f"does not apply to task {cfg.task!r}: its labels are the responses' tokens")
    if cfg.labels is not None and cfg.num_labels is not None and cfg.num_labels != len(cfg.labels):
        raise t.error("num_labels", f"is {cfg.num_labels} but labels names {len(cfg.labels)}: drop num_labels")
    t.done()
    return cfg


def read_labels(t: Table, key: str) -> LabelMap | None:
    """A label map from ``key`` (absent: None): names or raw values ``["neg", "pos"]`` / ``[1, 2, 3, 4]``,
    or names for raw values ``{1 = "World", 2 = "Sports"}``."""
    if not t.has(key):
        return None
    try:
        return LabelMap.from_config(t.value(key))
    except ConfigError as exc:
        raise t.error(key, str(exc)) from None


def resolve_labels(model: ModelConfig, observed: Iterable[str] | None = None) -> LabelMap:
    """The run's label map: ``[model] labels``; else the labels ``observed`` in the coordinator's data
    (sorted; integers numerically); else ``LABEL_0`` ... for ``num_labels`` (2) classes."""
    if model.labels is not None:
        labels = model.labels
    elif observed is not None:
        labels = LabelMap.infer(observed)
    else:
        labels = LabelMap.default(model.num_labels or 2)
    if model.num_labels is not None and model.num_labels != len(labels):
        raise ConfigError(
            f"[model] num_labels is {model.num_labels} but the data holds {len(labels)} labels ({labels.describe()}):"
            " name them with [model] labels = [...] (and drop num_labels)"
        )
    return labels


def task_config(parent: ParentModel, labels: LabelMap | None) -> dict[str, Any]:
    """The model config a run sends with every task: the parent's, with ``architectures`` naming the
    class of the run's task (a device builds that head: Llama has a causal-LM and a classification
    head) and, for a labelled task, the run's label map (``id2label``, ...; none without labels). A decoder classifying
    text finds each row's last token by ``pad_token_id``: a config without one gets its end token's."""
    config = dict(parent.config)
    config["architectures"] = [parent.family.task_classes[parent.task]]
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if parent.task == "text-classification" and config.get("pad_token_id") is None and isinstance(eos, int):
        config["pad_token_id"] = eos
    if labels is None:  # a task without labels (causal-lm) carries no stand-in class names either
        return {k: v for k, v in config.items() if k not in ("id2label", "label2id", "label_values")}
    return labels.apply_to(config)


DATA_FORMAT_KEYS = (
    "format",
    "delimiter",
    "text_column",
    "text_pair_column",
    "label_column",
    "text_separator",
    "prompt_column",
    "response_column",
)


def read_data_format(t: Table, *, format_default: str | None = None) -> DataFormat:
    """How a data table's files are read: format, delimiter, text_column (a name or a list of names,
    joined with text_separator), text_pair_column, label_column; for causal-LM records prompt_column
    and response_column (``edge_sdk.DataFormat``)."""
    texts = t.value("text_column", [])
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(c, str) and c.strip() for c in texts):
        raise t.error("text_column", f"must be a column name or a list of names, got {texts!r}")
    delimiter = t.value("delimiter", None)
    if delimiter is not None and not isinstance(delimiter, str):
        raise t.error("delimiter", f"must be one character (or 'tab'), got {delimiter!r}")
    if isinstance(delimiter, str) and delimiter.lower() in ("tab", "\\t"):
        delimiter = "\t"
    separator = t.value("text_separator", " ")
    if not isinstance(separator, str):
        raise t.error("text_separator", f"must be a string, got {separator!r}")
    try:
        return DataFormat(
            format=t.text("format") if t.has("format") else format_default,
            delimiter=delimiter,
            text_column=tuple(texts),
            text_pair_column=t.text("text_pair_column") if t.has("text_pair_column") else None,
            label_column=t.text("label_column") if t.has("label_column") else None,
            text_separator=separator,
            prompt_column=t.text("prompt_column") if t.has("prompt_column") else None,
            response_column=t.text("response_column") if t.has("response_column") else None,
        )
    except ConfigError as exc:
        raise t.error(None, str(exc)) from None


def read_federation(
    t: Table, *, aggregation: Table | None = None, privacy: Table | None = None, reproducible_noise: bool = False
) -> FederationConfig:
    """The ``[federation]`` table, with the ``[aggregation]`` and ``[privacy]`` tables if given
    (``reproducible_noise``: the default of ``[privacy] reproducible``)."""
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
        max_delta_norm_ratio=t.number("max_delta_norm_ratio", 0.5, low=0.0, open_low=True),
        min_margin_bytes=t.size("min_margin", DEFAULT_MIN_MARGIN_BYTES, allow_zero=True),
        update_encoding=t.text("update_encoding", DEFAULT_UPDATE_ENCODING, choices=UPDATE_ENCODINGS),
    )
    if strategy == "fedavg":
        for key in ("beta1", "beta2", "tau"):
            if t.has(key):
                raise t.error(key, "only applies to strategy = 'fedadam'")
    t.done()
    rule = read_aggregation(aggregation) if aggregation is not None else AggregationRule()
    dp = read_privacy(privacy, reproducible=reproducible_noise) if privacy is not None else PrivacyConfig()
    if dp.mode == "central" and aggregation is not None and aggregation.data:
        raise aggregation.error(
            None,
            "does not apply with [privacy] mode = 'central' (DP-FedAvg clips to clip_norm and weighs devices"
            " the same): remove the table",
        )
    return dataclasses.replace(cfg, aggregation=rule, privacy=dp)


def read_aggregation(t: Table) -> AggregationRule:
    """The ``[aggregation]`` table: rule, trim, clip, clip_factor, weight_cap (see ``_robust``)."""
    weight_cap = t.number("weight_cap", 2.0, low=0.0)
    if 0 < weight_cap < 1:
        raise t.error("weight_cap", f"must be 0 (no cap) or >= 1, got {weight_cap}")
    cfg = AggregationRule(
        rule=t.text("rule", "trimmed_mean", choices=RULES),
        trim=t.number("trim", 0.2, low=0.0, high=0.49),
        clip=t.text("clip", "median", choices=CLIPS),
        clip_factor=t.number("clip_factor", 2.0, low=1.0),
        weight_cap=weight_cap,
    )
    if t.has("trim") and cfg.rule != "trimmed_mean":
        raise t.error("trim", "only applies to rule = 'trimmed_mean'")
    t.done()
    return cfg


def read_privacy(t: Table, *, reproducible: bool = False) -> PrivacyConfig:
    """The ``[privacy]`` table: mode, clip_norm, noise_multiplier, delta, reproducible (``_privacy``)."""
    cfg = PrivacyConfig(
        mode=t.text("mode", "off", choices=PRIVACY_MODES),
        clip_norm=t.number("clip_norm", 1.0, low=0.0, open_low=True),
        noise_multiplier=t.number("noise_multiplier", 1.0, low=0.0),
        delta=t.number("delta", 1e-5, low=0.0, high=0.1, open_low=True),
        reproducible=t.flag("reproducible", reproducible),
    )
    if cfg.mode == "off":
        extra = sorted(k for k in t.data if k != "mode")
        if extra:
            raise t.error(extra[0], "only applies with mode = 'central' or 'local'")
    t.done()
    return cfg


def read_training(t: Table) -> TrainingConfig:
    cfg = TrainingConfig(
        local_steps=t.integer("local_steps", 10, low=1),
        lr=t.number("lr", 5e-5, low=0.0, open_low=True),
        batch_size=t.integer("batch_size", 8, low=1),
        seq_len=t.integer("seq_len", 64, low=1, high=8192),
        prox_mu=t.number("prox_mu", 0.0, low=0.0),
        max_grad_norm=t.number("max_grad_norm", 1.0, low=0.0, high=1e6) or None,
        dropout=t.number("dropout", 0.0, low=0.0, high=0.99) if t.has("dropout") else None,
        seed=t.integer("seed", 0, low=0, high=2**63 - 1) if t.has("seed") else None,
    )
    t.done()
    return cfg


def read_levers(t: Table) -> LeverPolicy:
    """The ``[levers]`` table: which training levers the planner may use (all, by default).

    ``enabled = false`` forbids every lever (plain training: width cuts only); ``forbid`` lists lever
    names, ``pin`` fixes Levers fields (``pin = { checkpointing = true }``), ``lora_ranks`` and
    ``max_micro_batches`` bound the search.
    """
    enabled = t.flag("enabled", True)
    raw = {key: t.value(key) for key in ("forbid", "pin", "lora_ranks", "max_micro_batches") if t.has(key)}
    t.done()
    try:
        policy = LeverPolicy.from_dict(raw)
    except ConfigError as exc:
        raise t.error(None, str(exc)) from None
    if not enabled:
        if raw:
            raise t.error("enabled", "is false: forbid, pin and the rest would have no effect")
        return LeverPolicy.plain()
    return policy


def table_reader(data: Mapping[str, Any], known: tuple[str, ...], *, base: Path, where: str) -> Callable[[str], Table]:
    """Check a config's table names ([model], [devices] and [run] required); returns a table reader."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(unknown)} (known: {', '.join(known)})")
    for required in ("model", "devices", "run"):
        if required not in data:
            raise ConfigError(f"{where}: the [{required}] table is required")
    return lambda name: Table(where, name, data.get(name, {}), base)


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
