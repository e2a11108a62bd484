"""Training levers: how a device trains its sub-network, beyond which heads and neurons it keeps.

A device's training plan is a :class:`~edge_sdk.SubnetSpec` (the widths) and a :class:`Levers`
value (the recipe). The levers trade memory for time or for a little accuracy; the planner tries
them before it cuts width, in this order of cost:

* no accuracy cost: ``micro_batches`` (gradient accumulation over k micro-batches: the gradient of
  the whole batch, activation memory divided by about k), ``checkpointing`` (each layer keeps only
  its input and recomputes its activations in backward), ``embeddings="rows"`` (only the embedding
  rows the round's batches touch are trained, with optimizer state for those rows only; only those
  rows travel back), ``attention="sdpa"`` (fused attention, fewer saved tensors when dropout is 0);
* small accuracy cost: ``embeddings="frozen"`` (the table is not trained), ``lora_rank > 0`` (LoRA
  adapters of that rank on the frozen linear weights; LayerNorms and the task head still train).

Sequence length is not a lever: batches are always padded only to their longest row, and the
memory model plans for the longest row a device's data can hold (its workload's ``seq``).

Torch-free: the coordinator plans with these values and they travel in a task's settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from edge_sdk._errors import SpecError

__all__ = ["ATTENTION_KINDS", "EMBEDDING_MODES", "MAX_LORA_RANK", "MAX_MICRO_BATCHES", "Levers"]

EMBEDDING_MODES = ("train", "rows", "frozen")
ATTENTION_KINDS = ("eager", "sdpa")
MAX_MICRO_BATCHES = 1024
MAX_LORA_RANK = 4096


@dataclass(frozen=True)
class Levers:
    """A device's training recipe. The default is plain training: what full FedAvg does."""

    micro_batches: int = 1  # k: the batch is split into k micro-batches, gradients accumulated
    checkpointing: bool = False  # activation checkpointing of every encoder layer
    embeddings: str = "train"  # "train" | "rows" | "frozen" (the word-embedding table)
    lora_rank: int = 0  # 0: dense training; r > 0: LoRA of rank r on the frozen linear weights
    attention: str = "eager"  # "eager" | "sdpa"

    def __post_init__(self) -> None:
        _int_in(self.micro_batches, "micro_batches", 1, MAX_MICRO_BATCHES)
        _int_in(self.lora_rank, "lora_rank", 0, MAX_LORA_RANK)
        if not isinstance(self.checkpointing, bool):
            raise SpecError(f"levers: checkpointing must be true or false, got {self.checkpointing!r}")
        if self.embeddings not in EMBEDDING_MODES:
            raise SpecError(f"levers: embeddings must be one of {EMBEDDING_MODES}, got {self.embeddings!r}")
        if self.attention not in ATTENTION_KINDS:
            raise SpecError(f"levers: attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")

    @property
    def is_plain(self) -> bool:
        """True for plain training (no lever applied)."""
        return self == Levers(attention=self.attention)

    @property
    def costs_accuracy(self) -> bool:
        """True when a lever trains fewer values than the sub-network has (frozen table, LoRA)."""
        return self.embeddings == "frozen" or self.lora_rank > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Levers:
        """Parse a dict as :meth:`to_dict` writes it; unknown keys are an error, missing ones default."""
        if not isinstance(data, Mapping):
            raise SpecError(f"levers must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise SpecError(f"levers: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def describe(self) -> str:
        """A short human description, e.g. ``"4 micro-batches, checkpointing, embedding rows"``."""
        parts = []
        if self.micro_batches > 1:
            parts.append(f"{self.micro_batches} micro-batches")
        if self.checkpointing:
            parts.append("checkpointing")
        if self.embeddings != "train":
            parts.append("embedding rows" if self.embeddings == "rows" else "frozen embeddings")
        if self.lora_rank:
            parts.append(f"LoRA r{self.lora_rank}")
        if self.attention != "eager":
            parts.append(self.attention)
        return ", ".join(parts) or "plain"

    @classmethod
    def parse(cls, text: str) -> Levers:
        """The levers :meth:`describe` wrote ``text`` for (records keep that description)."""
        values: dict[str, Any] = {}
        for part in [] if text == "plain" else text.split(", "):
            if part.endswith(" micro-batches") and part.split()[0].isdigit():
                values["micro_batches"] = int(part.split()[0])
            elif part == "checkpointing":
                values["checkpointing"] = True
            elif part in ("embedding rows", "frozen embeddings"):
                values["embeddings"] = "rows" if part == "embedding rows" else "frozen"
            elif part.startswith("LoRA r") and part[len("LoRA r") :].isdigit():
                values["lora_rank"] = int(part[len("LoRA r") :])
            elif part in ATTENTION_KINDS and part != "eager":
                values["attention"] = part
            else:
                raise SpecError(f"levers: cannot read {part!r} in {text!r}")
        return cls(**values)


def _int_in(value: Any, name: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SpecError(f"levers: {name} must be an integer in {low}..{high}, got {value!r}")
