"""A device's update, checked against its spec and levers, and turned into per-coordinate deltas.

A device trained sub-network ``spec`` with ``levers`` and returned tensors named in the sub-network:

* ``NAME``: a densely trained parameter at the sub-network's shape (its new value);
* ``NAME`` and ``NAME@rows`` for the row-trained token-embedding table (``embeddings="rows"``): the
  new values ``[n, hidden]`` of the rows it changed, and their indices (int64 ``[n]``, sorted,
  unique, within the table);
* ``NAME@lora_A`` ``[r, in]`` and ``NAME@lora_B`` ``[out, r]`` for each LoRA target weight
  (``lora_rank > 0``; ``1 <= r <= lora_rank``, the LoRA scaling folded into B): the device's delta
  of that weight is ``B @ A``, in the sub-network's coordinates;
* nothing for a frozen parameter: the table with ``embeddings="frozen"``; with LoRA, any tensor
  other than the targets' factors may be left out (the trainer freezes what LoRA does not train).

:func:`check_update` validates all of it (names, shapes, dtypes, indices, ranks, finite values and an
optional bound on the deltas) and returns one :class:`Contribution` per trained parent tensor: the
delta against the parent and where it lands (a prefix region, or a set of rows). Nothing is merged
until every update of a round has passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from edge_sdk import SubnetSpec
from edge_sdk._errors import AggregationError
from edge_sdk.protocol import LORA_A_SUFFIX, LORA_B_SUFFIX, ROWS_SUFFIX, split_update_name
from edge_sdk.scaling import Levers, ParentModel, regions

__all__ = ["ClientUpdate", "Contribution", "check_update", "delta_norm", "weights_from_delta"]

Region = tuple[slice, ...]


@dataclass(frozen=True)
class ClientUpdate:
    """What one device returned: the tensors of its sub-network after local training (see above)."""

    spec: SubnetSpec
    weights: Mapping[str, torch.Tensor]
    num_samples: int
    levers: Levers = field(default_factory=Levers)


@dataclass(frozen=True)
class Contribution:
    """One device's delta of one parent tensor: on a prefix ``region``, or on the rows ``rows``."""

    name: str
    delta: torch.Tensor  # float32: the region's shape, or [len(rows), ...] for rows
    region: Region | None = None
    rows: torch.Tensor | None = None  # int64, sorted unique row indices of the parent tensor


class _Checker:
    """Checks one device's update; collects every problem before any is reported."""

    def __init__(self, parent: ParentModel, update: ClientUpdate) -> None:
        self.parent, self.update, self.levers = parent, update, update.levers
        kept = regions(parent, update.spec)
        family, task = parent.family, parent.task
        table = family.word_embedding(task)
        self.child_of = {name: child for name, (child, _) in kept.items()}
        self.parent_of = {child: name for name, (child, _) in kept.items()}
        self.region_of = {name: region for name, (_, region) in kept.items()}
        self.table = kept[table][0] if table in kept else None  # sub-network name of the token table
        self.lora: set[str] = set()  # sub-network names of the LoRA target weights
        if self.levers.lora_rank:
            family.require_lora()
            self.lora = {child for name, (child, _) in kept.items() if family.lora_target(name, task)}
        self.problems: list[str] = []

    def contributions(self) -> list[Contribution]:
        out: list[Contribution] = []
        for child, tensor in self.update.weights.items():
            base, suffix = split_update_name(child)
            name = self.parent_of.get(base)
            if name is None:
                self.problems.append(f"unexpected {child}")
            elif suffix == ROWS_SUFFIX:
                out += self.rows(name, base)
            elif suffix == LORA_A_SUFFIX:
                out += self.lora_delta(name, base)
            elif suffix != LORA_B_SUFFIX:
                out += self.dense(name, child, tensor)
        self.missing()
        return out

    def missing(self) -> None:
        have, levers = self.update.weights, self.levers
        for child in self.parent_of:
            if child in self.lora:
                if child + LORA_A_SUFFIX not in have or child + LORA_B_SUFFIX not in have:
                    self.problems.append(
                        f"missing {child}{LORA_A_SUFFIX} and {child}{LORA_B_SUFFIX} (LoRA rank {levers.lora_rank})"
                    )
            elif child == self.table and levers.embeddings == "rows":
                if child not in have or child + ROWS_SUFFIX not in have:
                    self.problems.append(f"missing {child} and {child}{ROWS_SUFFIX} (embedding rows)")
            elif child == self.table and levers.embeddings == "frozen":
                continue
            elif child not in have and not levers.lora_rank:  # with LoRA, what is absent is frozen
                self.problems.append(f"missing {child}")

    def dense(self, name: str, child: str, tensor: torch.Tensor) -> list[Contribution]:
        levers = self.levers
        if child == self.table and levers.embeddings == "frozen":
            self.problems.append(f"{child}: the embedding table is frozen (embeddings='frozen') but came back")
            return []
        if child == self.table and levers.embeddings == "rows" and child + ROWS_SUFFIX in self.update.weights:
            return []  # the row values: taken with their indices
        if child in self.lora:
            self.problems.append(f"{child}: a LoRA target came back dense (LoRA rank {levers.lora_rank})")
            return []
        region = self.region_of[name]
        base = self.parent.state[name][region]
        if tuple(tensor.shape) != tuple(base.shape):
            self.problems.append(f"{child}: shape {list(tensor.shape)} != {list(base.shape)}")
            return []
        if not base.is_floating_point():
            return []  # buffers (position ids) travel along; nothing to merge
        if not tensor.is_floating_point():
            self.problems.append(f"{child}: dtype {tensor.dtype}, expected a floating-point tensor")
            return []
        return [Contribution(name, tensor.float() - base.float(), region=region)]

    def rows(self, name: str, child: str) -> list[Contribution]:
        if child != self.table or self.levers.embeddings != "rows":
            self.problems.append(
                f"{child}{ROWS_SUFFIX}: row updates are for the embedding table with embeddings='rows'"
            )
            return []
        index, values = self.update.weights[child + ROWS_SUFFIX], self.update.weights.get(child)
        table = self.parent.state[name]
        rows, cols = table.shape
        problem = None
        if index.dtype != torch.int64 or index.dim() != 1:
            problem = f"{child}{ROWS_SUFFIX}: {index.dtype} {list(index.shape)}, expected int64 [n]"
        elif values is None or tuple(values.shape) != (index.numel(), cols) or not values.is_floating_point():
            shape = None if values is None else list(values.shape)
            problem = f"{child}: row values {shape}, expected [{index.numel()}, {cols}] floats"
        elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
            problem = f"{child}{ROWS_SUFFIX}: row indices outside 0..{rows - 1}"
        elif index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            problem = f"{child}{ROWS_SUFFIX}: row indices must be sorted and unique"
        if problem is not None or values is None:
            self.problems.append(problem or "")
            return []
        return [Contribution(name, values.float() - table[index].float(), rows=index)]

    def lora_delta(self, name: str, child: str) -> list[Contribution]:
        rank = self.levers.lora_rank
        if child not in self.lora:
            why = "the task trains without LoRA" if not rank else "it is not a LoRA target"
            self.problems.append(f"{child}{LORA_A_SUFFIX}: LoRA factors, but {why}")
            return []
        a, b = self.update.weights[child + LORA_A_SUFFIX], self.update.weights.get(child + LORA_B_SUFFIX)
        if b is None:
            return []  # reported as missing
        if child in self.update.weights:
            self.problems.append(f"{child}: came back both dense and as LoRA factors")
            return []
        region = self.region_of[name]
        out, inp = self.parent.state[name][region].shape
        r = a.shape[0] if a.dim() == 2 else -1
        if not 1 <= r <= rank:
            self.problems.append(f"{child}{LORA_A_SUFFIX}: rank {r} is outside 1..{rank} (the planned rank)")
        elif tuple(a.shape) != (r, inp) or tuple(b.shape) != (out, r):
            self.problems.append(
                f"{child}: LoRA factors A {list(a.shape)} and B {list(b.shape)}, expected [{r}, {inp}] and [{out}, {r}]"
            )
        elif not (a.is_floating_point() and b.is_floating_point()):
            self.problems.append(f"{child}: LoRA factors must be floating-point, got {a.dtype} and {b.dtype}")
        else:
            return [Contribution(name, b.float() @ a.float(), region=region)]
        return []


def check_update(
    parent: ParentModel, update: ClientUpdate, *, who: str = "update", max_abs: float | None = None
) -> list[Contribution]:
    """Validate ``update`` against ``parent``, its spec and its levers; its deltas, one per trained tensor.

    ``max_abs`` bounds every delta value (None: finite is enough). AggregationError lists the problems.
    """
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise AggregationError(f"{who}: num_samples must be positive (an integer), got {n!r}")
    if update.levers.embeddings != "train" and parent.family.word_embedding(parent.task) is None:
        raise AggregationError(
            f"{who}: embeddings={update.levers.embeddings!r}, but the model has no token-embedding table"
        )
    checker = _Checker(parent, update)
    out = checker.contributions()
    for c in out:
        largest = float(c.delta.abs().max()) if c.delta.numel() else 0.0
        if not bool(torch.isfinite(c.delta).all()):
            checker.problems.append(f"{checker.child_of[c.name]}: non-finite values")
        elif max_abs is not None and largest > max_abs:
            checker.problems.append(f"{checker.child_of[c.name]}: a delta of {largest:.4g} exceeds {max_abs:g}")
    if checker.problems:
        raise AggregationError(f"{who}: " + "; ".join(list(dict.fromkeys(checker.problems))[:8]))
    return out


def delta_norm(contributions: Sequence[Contribution]) -> float:
    """The L2 norm of one device's change over every coordinate it covered: ``sqrt(sum_c d[c]^2)``."""
    return math.sqrt(sum(float(c.delta.double().square().sum()) for c in contributions))


def weights_from_delta(
    sent: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """An update sent as deltas (``Update.encoding == "delta"``) as new values, against what was ``sent``.

    Dense tensors: ``sent + delta``; row values: ``sent[rows] + delta``; LoRA factors are deltas by
    nature and stay as they are; integer tensors (buffers, row indices) are kept as received.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in received.items():
        _, suffix = split_update_name(name)
        if suffix or not tensor.is_floating_point() or name not in sent:
            out[name] = tensor
        elif name + ROWS_SUFFIX in received:
            out[name] = sent[name][received[name + ROWS_SUFFIX]] + tensor
        else:
            out[name] = sent[name] + tensor
    return out
