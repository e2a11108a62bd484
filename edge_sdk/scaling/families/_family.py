"""What the project knows about one model family: explicit parameter-name maps and module surgery.

A family is data plus two small functions. The maps name the exact submodules of the installed
transformers version (tests check them against it); nothing matches class names at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_sdk._errors import SpecError
from edge_sdk._spec import ParentDims, SubnetSpec

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BUFFER_FILLS", "Family", "LayerMap", "Region", "head_attributes"]

# A region of a parent tensor: one slice per dimension, always a prefix or the whole axis.
Region = tuple[slice, ...]


def head_attributes(count: str, width: str) -> Callable[[nn.Module, int, int], None]:
    """``set_heads`` for attention modules that reshape with a head-count and a total-width attribute
    (what the module's own ``prune_heads`` updates)."""

    def set_heads(attention: nn.Module, heads: int, head_dim: int) -> None:
        setattr(attention, count, heads)  # plain attributes on the module, not parameters
        setattr(attention, width, heads * head_dim)

    return set_heads


# How a non-persistent buffer's values are made: "positions" is 0, 1, 2, ... along the last axis
# (``torch.arange(n).expand(shape)``); "zeros" is all zeros; "rotary" rebuilds the module that owns
# the buffer from the model's config (a rotary embedding's ``inv_freq`` = base^(-2i/d), scaled as
# the config's ``rope_scaling`` says: only the module's own code knows how).
BUFFER_FILLS = ("positions", "zeros", "rotary")


@dataclass(frozen=True)
class LayerMap:
    """Paths of the sliced Linear modules inside one transformer layer."""

    query: str
    key: str
    value: str
    output: str  # attention output projection: columns follow the kept value dims
    up: str  # FFN up-projection: rows are neurons
    down: str  # FFN down-projection: columns are neurons
    attention: str  # the module holding the head-count attributes
    gate: str = ""  # gated FFN (SwiGLU): gate-projection rows are neurons, moving with ``up``'s rows

    @property
    def linears(self) -> tuple[str, ...]:
        """Every sliced Linear of the layer: attention projections, then the FFN's."""
        ffn = (self.gate, self.up, self.down) if self.gate else (self.up, self.down)
        return (self.query, self.key, self.value, self.output, *ffn)


@dataclass(frozen=True)
class Family:
    """One model family (BERT, RoBERTa, DistilBERT, ViT, ...) and the task heads it supports."""

    name: str
    model_types: tuple[str, ...]
    task_classes: Mapping[str, str]  # task -> transformers class name
    layers_path: Mapping[str, str]  # task -> dotted path of the ModuleList of layers
    layer: LayerMap
    config_keys: Mapping[str, str]  # num_layers, num_heads, hidden, ffn -> the HF config key
    set_heads: Callable[[nn.Module, int, int], None]  # (attention module, heads, head_dim)
    modeling_module: str  # the transformers module that defines the family's classes (imported lazily)
    # Non-persistent buffers (absent from state dicts, made from the config in ``__init__``):
    # buffer name (last dotted part) -> how its values are made, one of BUFFER_FILLS.
    buffers: Mapping[str, str] = field(default_factory=dict)
    # LoRA targets: Linear modules inside a layer (paths as in ``layer``) that LoRA adapts; empty: the
    # family has no LoRA target map and the LoRA lever does not apply to it.
    lora_targets: tuple[str, ...] = ()
    # task -> parameter name of the token-embedding table (the "embeddings" lever's table); a task
    # without one (ViT's patch projection is not a lookup table) leaves that lever out.
    word_embeddings: Mapping[str, str] = field(default_factory=dict)
    # Rotary position embeddings rotate dimension pairs (i, i + d/2) of each query/key head by a
    # frequency of their own: no permutation may move dimensions inside a head.
    rotary: bool = False
    # task -> {alias: source}: parameters that are the same tensor as another when the config's
    # ``tie_word_embeddings`` is true (a causal LM's ``lm_head.weight`` is its token embedding). The
    # parent's state holds only the source: the alias is never extracted, sent, trained or counted twice.
    tied: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = {name: fill for name, fill in self.buffers.items() if fill not in BUFFER_FILLS}
        if unknown:
            raise SpecError(f"{self.name}: unknown buffer fills {unknown} (known: {BUFFER_FILLS})")
        linears = self.layer.linears
        untargetable = [t for t in self.lora_targets if t not in linears]
        if untargetable:
            raise SpecError(
                f"{self.name}: LoRA targets {untargetable} are not Linear modules of its layer map {linears}"
            )
        extra = sorted(set(self.word_embeddings) - set(self.layers_path))
        if extra:
            raise SpecError(f"{self.name}: word embeddings named for unknown task(s) {extra}")

    # -- dimensions -----------------------------------------------------------------------------

    def dims(self, config: Mapping[str, Any]) -> ParentDims:
        keys = self.config_keys
        try:
            hidden = int(config[keys["hidden"]])
            heads = int(config[keys["num_heads"]])
            layers = int(config[keys["num_layers"]])
            ffn = int(config[keys["ffn"]])
        except KeyError as exc:
            raise SpecError(f"{self.name} config is missing {exc.args[0]!r}") from None
        # optional keys (grouped-query attention, an explicit head size): absent or null -> the default
        kv_heads = int(config.get(keys.get("kv_heads", ""), None) or heads)
        head_dim = config.get(keys.get("head_dim", ""), None)
        if head_dim is None:
            if hidden % heads:
                raise SpecError(f"hidden size {hidden} is not a multiple of {heads} heads")
            head_dim = hidden // heads
        return ParentDims(self.name, layers, heads, int(head_dim), ffn, hidden, kv_heads)

    def layers_of(self, task: str) -> str:
        try:
            return self.layers_path[task]
        except KeyError:
            raise SpecError(
                f"the {self.name} family has no {task!r} head (it has: {sorted(self.layers_path)})"
            ) from None

    # -- levers -------------------------------------------------------------------------------------

    def word_embedding(self, task: str) -> str | None:
        """The parent name of ``task``'s token-embedding table, or None when it has none."""
        return self.word_embeddings.get(task)

    def lora_target(self, name: str, task: str) -> bool:
        """Whether parent parameter ``name`` is the weight of a LoRA target Linear of a layer."""
        prefix = self.layers_of(task) + "."
        if not name.startswith(prefix) or not name.endswith(".weight"):
            return False
        _, _, rest = name[len(prefix) :].partition(".")
        return rest[: -len(".weight")] in self.lora_targets

    def tied_aliases(self, config: Mapping[str, Any], task: str) -> dict[str, str]:
        """{alias: source} of the parameters tied in this config (empty unless ``tie_word_embeddings``)."""
        if not config.get("tie_word_embeddings", False):
            return {}
        return dict(self.tied.get(task, {}))

    def require_lora(self) -> None:
        """Raise :class:`SpecError` unless the family has a LoRA target map."""
        if not self.lora_targets:
            raise SpecError(
                f"LoRA does not apply to the {self.name} family: it has no LoRA target map "
                "(Family.lora_targets is empty); forbid the LoRA lever or register the family's targets"
            )

    # -- parameter regions ---------------------------------------------------------------------------

    def param_regions(
        self, spec: SubnetSpec, names: Mapping[str, tuple[int, ...]], task: str
    ) -> dict[str, tuple[str, Region]]:
        """Map each parent parameter to (name in the sub-network, the region of it that is kept).

        ``names`` maps parent parameter names to shapes. Parameters of dropped layers are absent.
        Extraction copies ``parent[region]``; aggregation scatters back into the same region.
        """
        prefix = self.layers_of(task) + "."
        kept = {layer.index: (position, layer) for position, layer in enumerate(spec.layers)}
        d, parent = spec.parent.head_dim, spec.parent
        out: dict[str, tuple[str, Region]] = {}
        for name, shape in names.items():
            full: Region = tuple(slice(None) for _ in shape)
            if not name.startswith(prefix):
                out[name] = (name, full)
                continue
            index_text, _, rest = name[len(prefix) :].partition(".")
            index = int(index_text)
            if index not in kept:
                continue
            position, layer = kept[index]
            child = f"{prefix}{position}.{rest}"
            module, _, kind = rest.rpartition(".")
            kv = parent.kv_kept(layer.heads) * d
            out[name] = (
                child,
                self._region(module, kind, shape, attn=layer.heads * d, kv=kv, ffn=layer.ffn, full=full),
            )
        return out

    def _region(
        self, module: str, kind: str, shape: tuple[int, ...], *, attn: int, kv: int, ffn: int, full: Region
    ) -> Region:
        """Q rows: the kept query heads; K/V rows: their KV heads; gate/up rows and down columns: neurons."""
        lm = self.layer
        rows = kind == "bias" or len(shape) == 1
        if module in (lm.query, lm.key, lm.value):
            n = attn if module == lm.query else kv
            return (slice(0, n),) if rows else (slice(0, n), slice(None))
        if module in (lm.up, lm.gate) and module:
            return (slice(0, ffn),) if rows else (slice(0, ffn), slice(None))
        if module == lm.output and not rows:
            return (slice(None), slice(0, attn))
        if module == lm.down and not rows:
            return (slice(None), slice(0, ffn))
        return full
