"""Which tensors an Update may carry for a TrainTask, given the task's training levers.

Plain training (the word-embedding table trained densely, no LoRA) returns exactly the tensors the
task sent: same names, shapes and dtypes. The memory levers change what travels back:

* row-trained embedding table ``NAME`` (``embeddings="rows"``): ``NAME`` holds the values of the rows
  the device changed, ``[n, cols]`` in the task's dtype, and ``NAME@rows`` their row indices, int64
  ``[n]`` (``n`` at most the table's rows; sortedness and range are checked on decode, not here);
* LoRA-trained weight ``NAME`` of shape ``[out, in]`` (``lora_rank > 0``): ``NAME@lora_A`` ``[r, in]``
  and ``NAME@lora_B`` ``[out, r]`` in the task's dtype, ``1 <= r <= lora_rank``, and no ``NAME``;
* frozen parameters (``embeddings="frozen"``, or anything a LoRA device does not train): absent.

This module checks only what names, shapes and dtypes allow, before a byte is received; which
tensors are the embedding table or LoRA targets is the coordinator's check against the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from edge_sdk._levers import Levers
from edge_sdk.protocol._tensors import TensorEntry, entry_mismatches

__all__ = [
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "LORA_SUFFIXES",
    "ROWS_SUFFIX",
    "split_update_name",
    "update_entry_check",
    "update_entry_mismatches",
]

ROWS_SUFFIX = "@rows"
LORA_A_SUFFIX = "@lora_A"
LORA_B_SUFFIX = "@lora_B"
LORA_SUFFIXES = (LORA_A_SUFFIX, LORA_B_SUFFIX)
_SUFFIXES = (ROWS_SUFFIX, *LORA_SUFFIXES)
_INDEX_DTYPE = "I64"
_PLAIN = Levers()


def split_update_name(name: str) -> tuple[str, str]:
    """``"w@lora_A"`` -> ``("w", "@lora_A")``; a name without a known suffix -> ``(name, "")``."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _plain_shaped(levers: Levers) -> bool:
    return levers.embeddings == "train" and levers.lora_rank == 0


def update_entry_mismatches(
    actual: Iterable[TensorEntry], sent: Iterable[TensorEntry], levers: Levers = _PLAIN
) -> list[str]:
    """Every way ``actual`` (an Update's tensors) breaks the rules above for a task that sent ``sent``."""
    actual, sent = tuple(actual), tuple(sent)
    if _plain_shaped(levers):
        return entry_mismatches(actual, sent)
    have = {entry.name: entry for entry in actual}
    want = {entry.name: entry for entry in sent}
    problems: list[str] = []
    covered: set[str] = set()
    for name, entry in have.items():
        base, suffix = split_update_name(name)
        origin = want.get(base)
        if origin is None:
            problems.append(f"unexpected tensor {name!r}")
        elif suffix == ROWS_SUFFIX:
            problems += _rows_problems(name, entry, origin, have.get(base), levers)
        elif suffix:
            problems += _lora_problems(base, have, origin, levers)
        elif base + ROWS_SUFFIX not in have:
            problems += entry_mismatches([entry], [origin])
            if base + LORA_A_SUFFIX in have or base + LORA_B_SUFFIX in have:
                problems.append(f"tensor {name!r} travels both dense and as LoRA factors")
        covered.add(base)
    if not levers.costs_accuracy:  # nothing is frozen: every tensor sent must come back
        problems += [f"missing tensor {name!r}" for name in sorted(want.keys() - covered)]
    return sorted(dict.fromkeys(problems))


def _rows_problems(
    name: str, index: TensorEntry, origin: TensorEntry, values: TensorEntry | None, levers: Levers
) -> list[str]:
    base = origin.name
    if levers.embeddings != "rows":
        return [f"tensor {name!r}: row updates need the embeddings lever 'rows', the task has {levers.embeddings!r}"]
    if len(origin.shape) != 2:
        return [f"tensor {name!r}: {base!r} has shape {list(origin.shape)}, row updates need a 2-D table"]
    problems = []
    if index.dtype != _INDEX_DTYPE or len(index.shape) != 1:
        problems.append(f"tensor {name!r}: {index.dtype} {list(index.shape)}, expected {_INDEX_DTYPE} [n]")
    n = index.shape[0] if index.shape else 0
    if n > origin.shape[0]:
        problems.append(f"tensor {name!r}: {n} rows, the table has {origin.shape[0]}")
    if values is None:
        problems.append(f"tensor {name!r} without the row values {base!r}")
    elif values.shape != (n, origin.shape[1]) or values.dtype != origin.dtype:
        problems.append(
            f"tensor {base!r}: {values.dtype} {list(values.shape)}, expected {origin.dtype} [{n}, {origin.shape[1]}]"
        )
    return problems


def _lora_problems(base: str, have: dict[str, TensorEntry], origin: TensorEntry, levers: Levers) -> list[str]:
    a, b = have.get(base + LORA_A_SUFFIX), have.get(base + LORA_B_SUFFIX)
    if levers.lora_rank == 0:
        return [f"tensor {base!r}: LoRA factors, but the task trains without LoRA"]
    if a is None or b is None:
        return [f"tensor {base!r}: LoRA needs both {base + LORA_A_SUFFIX!r} and {base + LORA_B_SUFFIX!r}"]
    if len(origin.shape) != 2:
        return [f"tensor {base!r}: LoRA factors for a tensor of shape {list(origin.shape)} (not 2-D)"]
    out, inp = origin.shape
    rank = a.shape[0] if len(a.shape) == 2 else -1
    problems = []
    if not 1 <= rank <= levers.lora_rank:
        problems.append(f"tensor {base!r}: LoRA rank {rank} is outside 1..{levers.lora_rank}")
    if a.shape != (rank, inp) or a.dtype != origin.dtype:
        problems.append(f"tensor {a.name!r}: {a.dtype} {list(a.shape)}, expected {origin.dtype} [r, {inp}]")
    if b.shape != (out, rank) or b.dtype != origin.dtype:
        problems.append(f"tensor {b.name!r}: {b.dtype} {list(b.shape)}, expected {origin.dtype} [{out}, {rank}]")
    return problems


def update_entry_check(sent: Iterable[TensorEntry], levers: Levers) -> Callable[[Iterable[TensorEntry]], list[str]]:
    """A checker of an Update's entries against a task's (what a tensor assembler takes as ``expected``)."""
    sent = tuple(sent)
    return lambda actual: update_entry_mismatches(actual, sent, levers)
