"""One label map for a run: class names in order (index 0..n-1) and the labels data files use for them.

The coordinator owns the map: it comes from the config (``labels = ["neg", "pos"]``, raw values
``labels = [1, 2, 3, 4]``, or names for raw values ``labels = {1 = "World", 2 = "Sports"}``) or,
without one, from the coordinator's own data (:meth:`LabelMap.infer`: the distinct labels sorted,
integers numerically). It travels to devices inside the model config every task carries
(:meth:`LabelMap.model_config`: Hugging Face ``id2label`` / ``label2id``, plus ``label_values``
when the data's labels differ from the names), so the checkpoint and the deployed model's
``config.json`` keep it and ``edge-sdk infer`` prints names.

A label in a file maps to an index (:meth:`LabelMap.index`) when it equals a value or a name, or is
an integer equal to an integer value (``01`` is ``1``); when every value is a name (no integers),
an integer ``k`` in ``0..n-1`` is index ``k`` (the GLUE convention). Anything else is refused,
naming the file, line and label (:meth:`LabelMap.examples`), before any training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_sdk._errors import ConfigError
from edge_sdk.training._data import TextExample
from edge_sdk.training._formats import DataFile

__all__ = ["MAX_LABELS", "MAX_LABEL_CHARS", "LabelMap", "bind_labels"]

MAX_LABELS = 4096  # classes a run (and a model config a device receives) may name
MAX_LABEL_CHARS = 200


def _as_int(text: str) -> int | None:
    try:
        return int(text.strip()) if text.strip().lstrip("+-").isdigit() else None
    except ValueError:
        return None


def _canonical(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"a label is a name or an integer, got {value!r}")
    text = str(value).strip()
    number = _as_int(text)
    return str(number) if number is not None else text


@dataclass(frozen=True)
class LabelMap:
    """Class names in index order, and the labels (``values``) data files write for them."""

    names: tuple[str, ...]
    values: tuple[str, ...] = ()  # as written in data files, in index order; () : the names
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)
    _numbers: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        values = tuple(_canonical(v) for v in self.values) if self.values else names
        if not 2 <= len(names) <= MAX_LABELS:
            raise ConfigError(f"a label map has 2 to {MAX_LABELS} labels, got {len(names)}")
        if len(values) != len(names):
            raise ConfigError(f"{len(values)} label values for {len(names)} names")
        for text in (*names, *values):
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_LABEL_CHARS or not text.isprintable():
                raise ConfigError(f"a label is 1-{MAX_LABEL_CHARS} printable characters, got {text!r}")
        for kind, seq in (("names", names), ("values", values)):
            if len(set(seq)) != len(seq):
                raise ConfigError(f"label {kind} must be distinct, got {list(seq)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "values", values)
        lookup = {n: i for i, n in enumerate(names)}
        lookup.update({v: i for i, v in enumerate(values)})  # a value wins over a name
        numbers = {n: i for i, v in enumerate(values) if (n := _as_int(v)) is not None}
        object.__setattr__(self, "_lookup", lookup)
        object.__setattr__(self, "_numbers", numbers)

    def __len__(self) -> int:
        return len(self.names)

    # ------------------------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, raw: object) -> LabelMap:
        """From a config value: a list of names or raw values, or a table of raw value -> name."""
        if isinstance(raw, Mapping):
            return cls(tuple(str(n) for n in raw.values()), tuple(_canonical(k) for k in raw))
        if isinstance(raw, (list, tuple)):
            return cls(tuple(_canonical(v) for v in raw))
        raise ConfigError(f"labels must be a list (names or values) or a table (value = name), got {raw!r}")

    @classmethod
    def infer(cls, labels: Iterable[str]) -> LabelMap:
        """The distinct ``labels`` sorted: numerically when all are integers, else as strings."""
        found = {_canonical(v) for v in labels}
        numbers = {_as_int(v) for v in found}
        if None not in numbers:
            ordered = [str(n) for n in sorted(n for n in numbers if n is not None)]
        else:
            ordered = sorted(found)
        if len(ordered) < 2:
            raise ConfigError(
                f"the data holds {len(ordered)} distinct label(s) ({ordered}): a classifier needs at least 2;"
                " name them with labels = [...]"
            )
        return cls(tuple(ordered))

    @classmethod
    def default(cls, count: int) -> LabelMap:
        """``LABEL_0`` ... for ``count`` classes, written ``0`` ... in data."""
        return cls(tuple(f"LABEL_{i}" for i in range(count)), tuple(str(i) for i in range(count)))

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any]) -> LabelMap:
        """The map a model config carries (``id2label``, ``label_values``), checked: a device receives it."""
        id2label = config.get("id2label")
        if id2label is None:
            count = config.get("num_labels", 2)
            if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= MAX_LABELS:
                raise ConfigError(f"the model config's num_labels is not a count of labels: {count!r}")
            return cls.default(count)
        if not isinstance(id2label, Mapping) or not 2 <= len(id2label) <= MAX_LABELS:
            raise ConfigError(f"the model config's id2label must map 2-{MAX_LABELS} indices to names")
        try:
            pairs = sorted((int(k), v) for k, v in id2label.items())
        except (TypeError, ValueError):
            raise ConfigError("the model config's id2label keys must be indices") from None
        if [i for i, _ in pairs] != list(range(len(pairs))) or not all(isinstance(v, str) for _, v in pairs):
            raise ConfigError("the model config's id2label must map 0..n-1 to names")
        values = config.get("label_values") or ()
        if not isinstance(values, (list, tuple)):
            raise ConfigError("the model config's label_values must be a list")
        return cls(tuple(v for _, v in pairs), tuple(values))

    def model_config(self) -> dict[str, Any]:
        """The keys a Hugging Face model config carries this map in."""
        out: dict[str, Any] = {
            "id2label": {str(i): n for i, n in enumerate(self.names)},
            "label2id": {n: i for i, n in enumerate(self.names)},
        }
        out["label_values"] = list(self.values) if self.values != self.names else None
        return out

    def apply_to(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` (a model's) carrying this map; its head must have as many outputs as labels."""
        have = config.get("id2label")
        count = len(have) if isinstance(have, Mapping) else config.get("num_labels")
        if isinstance(count, int) and count != len(self):
            raise ConfigError(f"the model's classifier has {count} outputs; the run has {len(self)} labels")
        merged = {**config, **self.model_config()}
        if merged["label_values"] is None:
            del merged["label_values"]
        return merged

    # ------------------------------------------------------------------------------------ mapping

    def index(self, label: str) -> int | None:
        """The class index of a label as written in a file; None when it is outside the map."""
        text = label.strip()
        found = self._lookup.get(text)
        if found is not None:
            return found
        number = _as_int(text)
        if number is None:
            return None
        if number in self._numbers:
            return self._numbers[number]
        return number if not self._numbers and 0 <= number < len(self) else None

    def examples(self, data: DataFile) -> list[TextExample]:
        """``data``'s rows with their labels as class indices; a label outside the map is a ConfigError
        naming the file, the line and the label."""
        out = []
        for row in data.rows:
            index = self.index(row.label)
            if index is None:
                raise ConfigError(f"{data.path}: {data.where} {row.line}: label {row.label!r} {self._outside()}")
            out.append(TextExample(row.text, index, row.text_pair))
        return out

    def check(self, labels: Iterable[int]) -> None:
        """Class indices (already mapped) must be in ``0..n-1``."""
        for label in labels:
            if not 0 <= int(label) < len(self):
                raise ConfigError(f"label {label} {self._outside()}")

    def _outside(self) -> str:
        shown = ", ".join(repr(v) for v in self.values[:12]) + (", ..." if len(self) > 12 else "")
        return (
            f"is not one of the run's {len(self)} labels ({shown}); the coordinator's [model] labels name a run's"
            " labels"
        )

    def describe(self) -> str:
        pairs = [n if n == v else f"{v}={n}" for n, v in zip(self.names, self.values, strict=True)]
        return f"{len(self)} labels: " + ", ".join(pairs[:12]) + (", ..." if len(self) > 12 else "")


def bind_labels(data: object, config: Mapping[str, Any]) -> None:
    """Give ``data`` the run's label map from a task's model ``config`` when it takes one (``use_labels``)."""
    use = getattr(data, "use_labels", None)
    if callable(use):
        use(LabelMap.from_model_config(config))
