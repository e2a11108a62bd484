"""The sub-network spec: which heads, FFN neurons and layers of the parent a sub-network keeps.

The coordinator reorders the parent so that its most salient heads and neurons come first; every
sub-network is then a *prefix*: layer ``index`` of the parent keeps its first ``heads`` heads and its
first ``ffn`` FFN neurons. Dropping layers (depth) is expressed by leaving them out of ``layers``.

Grouped-query attention (Llama): the parent has ``kv_heads`` key/value heads, each shared by
``group = num_heads / kv_heads`` consecutive query heads (query head i uses KV head i // group). A
sub-network keeps a prefix of whole KV groups, so ``heads`` (query heads) is a multiple of ``group``
and its K/V projections keep the first ``heads / group`` KV heads.

The Hugging Face config has one ``num_attention_heads`` and one ``intermediate_size`` for all layers,
so a spec cannot round-trip through ``save_pretrained``: devices build the module from the spec.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_sdk._errors import SpecError

__all__ = ["SPEC_VERSION", "LayerSpec", "ParentDims", "SubnetSpec"]

SPEC_VERSION = 1


@dataclass(frozen=True)
class ParentDims:
    """The shape of the parent model a spec slices: what a spec is checked against."""

    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    ffn: int
    hidden: int
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0: as many as query heads

    def __post_init__(self) -> None:
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.num_heads)
        for name in ("num_layers", "num_heads", "head_dim", "ffn", "hidden", "kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"parent {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.kv_heads:
            raise SpecError(f"{self.num_heads} query heads are not a multiple of {self.kv_heads} key/value heads")

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention): the step of ``heads``."""
        return self.num_heads // self.kv_heads

    def kv_kept(self, heads: int) -> int:
        """Key/value heads a layer keeping its first ``heads`` query heads keeps (whole groups)."""
        return heads // self.group


@dataclass(frozen=True)
class LayerSpec:
    """Layer ``index`` of the parent, keeping its first ``heads`` heads and ``ffn`` FFN neurons."""

    index: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class SubnetSpec:
    """A nested sub-network of a parent: per kept layer, its kept heads and FFN width."""

    parent: ParentDims
    layers: tuple[LayerSpec, ...]
    version: int = field(default=SPEC_VERSION)

    def __post_init__(self) -> None:
        if self.version != SPEC_VERSION:
            raise SpecError(f"spec version {self.version} is not supported (this SDK reads {SPEC_VERSION})")
        if not self.layers:
            raise SpecError("a sub-network must keep at least one layer")
        previous = -1
        for layer in self.layers:
            if not 0 <= layer.index < self.parent.num_layers:
                raise SpecError(f"layer index {layer.index} is outside the parent's {self.parent.num_layers} layers")
            if layer.index <= previous:
                raise SpecError("layer indices must be strictly increasing (each parent layer at most once)")
            previous = layer.index
            if not 1 <= layer.heads <= self.parent.num_heads:
                raise SpecError(f"layer {layer.index}: heads={layer.heads} is outside 1..{self.parent.num_heads}")
            if layer.heads % self.parent.group:
                raise SpecError(
                    f"layer {layer.index}: heads={layer.heads} is not a whole number of key/value groups"
                    f" ({self.parent.group} query heads each)"
                )
            if not 1 <= layer.ffn <= self.parent.ffn:
                raise SpecError(f"layer {layer.index}: ffn={layer.ffn} is outside 1..{self.parent.ffn}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def full(cls, parent: ParentDims) -> SubnetSpec:
        """The spec that keeps everything: extraction with it reproduces the parent."""
        return cls.uniform(parent, heads=parent.num_heads, ffn=parent.ffn)

    @classmethod
    def uniform(cls, parent: ParentDims, *, heads: int, ffn: int, layers: Sequence[int] | None = None) -> SubnetSpec:
        """The same widths in every kept layer (all layers unless ``layers`` names some)."""
        indices = range(parent.num_layers) if layers is None else layers
        return cls(parent, tuple(LayerSpec(i, heads, ffn) for i in indices))

    @classmethod
    def from_ratio(cls, parent: ParentDims, ratio: float) -> SubnetSpec:
        """Every layer keeps ``ratio`` of its heads and neurons (at least one of each)."""
        if not 0.0 < ratio <= 1.0:
            raise SpecError(f"a width ratio must be in (0, 1], got {ratio}")
        group = parent.group
        heads = group * max(1, round(parent.kv_heads * ratio))
        ffn = max(1, round(parent.ffn * ratio))
        return cls.uniform(parent, heads=heads, ffn=ffn)

    # -- facts ----------------------------------------------------------------------------------

    @property
    def is_full(self) -> bool:
        return len(self.layers) == self.parent.num_layers and all(
            layer.heads == self.parent.num_heads and layer.ffn == self.parent.ffn for layer in self.layers
        )

    def covers(self, other: SubnetSpec) -> bool:
        """True when every coordinate ``other`` keeps is kept here too (nested prefixes)."""
        mine = {layer.index: layer for layer in self.layers}
        return self.parent == other.parent and all(
            layer.index in mine and mine[layer.index].heads >= layer.heads and mine[layer.index].ffn >= layer.ffn
            for layer in other.layers
        )

    def check_parent(self, parent: ParentDims) -> None:
        """Raise :class:`SpecError` unless this spec was made for a parent of exactly that shape."""
        if self.parent != parent:
            diffs = [
                f"{name}: spec {getattr(self.parent, name)!r} != model {getattr(parent, name)!r}"
                for name in ("family", "num_layers", "num_heads", "head_dim", "ffn", "hidden", "kv_heads")
                if getattr(self.parent, name) != getattr(parent, name)
            ]
            raise SpecError("the spec does not match the model (" + "; ".join(diffs) + ")")

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        parent: dict[str, Any] = {
            "family": self.parent.family,
            "num_layers": self.parent.num_layers,
            "num_heads": self.parent.num_heads,
            "head_dim": self.parent.head_dim,
            "ffn": self.parent.ffn,
            "hidden": self.parent.hidden,
        }
        if self.parent.kv_heads != self.parent.num_heads:  # grouped-query attention only
            parent["kv_heads"] = self.parent.kv_heads
        return {
            "version": self.version,
            "parent": parent,
            "layers": [[layer.index, layer.heads, layer.ffn] for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SubnetSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"version", "parent", "layers"}
        if unknown:
            raise SpecError(f"unknown spec fields: {sorted(unknown)}")
        try:
            version = data["version"]
            parent_data = data["parent"]
            raw_layers = data["layers"]
        except KeyError as exc:
            raise SpecError(f"spec is missing the field {exc.args[0]!r}") from None
        if version != SPEC_VERSION:
            raise SpecError(f"spec version {version!r} is not supported (this SDK reads {SPEC_VERSION})")
        if not isinstance(parent_data, Mapping):
            raise SpecError("spec field 'parent' must be an object")
        try:
            parent = ParentDims(**parent_data)
        except TypeError as exc:
            raise SpecError(f"spec field 'parent' is malformed: {exc}") from None
        if not isinstance(raw_layers, list):
            raise SpecError("spec field 'layers' must be a list of [index, heads, ffn]")
        layers = []
        for item in raw_layers:
            if (
                not isinstance(item, list | tuple)
                or len(item) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            ):
                raise SpecError(f"each spec layer must be [index, heads, ffn] integers, got {item!r}")
            layers.append(LayerSpec(*item))
        return cls(parent, tuple(layers), version)

    @classmethod
    def from_json(cls, text: str | bytes) -> SubnetSpec:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """One short line: layers kept, heads and FFN width per layer."""
        parts = [f"L{layer.index}:{layer.heads}h/{layer.ffn}f" for layer in self.layers]
        return f"{len(self.layers)}/{self.parent.num_layers} layers " + " ".join(parts)
