"""Accepting a device's update for its task: checked in full before it may wait for the merge.

A plain task's update must hold exactly the tensors its task sent (names, shapes, dtypes). A task
with levers may return the row-trained embedding rows (``NAME`` + ``NAME@rows``), LoRA factors
(``NAME@lora_A``, ``NAME@lora_B``) and leave frozen tensors out; those are checked against the
task's spec and levers (:func:`~coordinator.federation._updates.check_update`). Either way the
sample count must be a positive integer and the values finite with a global L2 norm within
``order.max_update_norm``, and the change the update makes, ``sqrt(sum_c (x'[c] - x[c])^2)`` over the
coordinates it covers (a LoRA update's change is ``B A``), at most ``order.max_delta_norm``.

What the device reports about itself is held to what it declared in its Hello
(:func:`check_reported`): its sample count at most the shard size it declared (``data.num_samples``),
its peak memory at most its declared total memory (``device.memory_total``). A count above the
declared shard would buy the device a larger share of the mean; a peak above the machine's memory
would shrink its next plan to nothing. The wire protocol (``CoordinatorConnection``) already checks values and
norm as the tensors arrive; a caller that went through it says so (``values_checked``) and the pass
over the values is not made twice. A ``"delta"`` update is added to what was sent.

Everything is checked here, when the update arrives, so that a bad update costs its device the
round and never fails the merge of the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.federation._records import TrainOrder
from coordinator.federation._registry import DeviceRecord
from coordinator.federation._updates import ClientUpdate, check_update, delta_norm, weights_from_delta
from edge_sdk._errors import AggregationError, EdgeFMError
from edge_sdk._units import format_bytes
from edge_sdk.protocol import check_tensor_values, numpy_to_torch
from edge_sdk.scaling import ParentModel

__all__ = ["accept_tensors", "check_reported"]


def check_reported(record: DeviceRecord, *, num_samples: int, peak_rss_bytes: int) -> None:
    """EdgeFMError when a device reports more samples or memory than it declared it has."""
    if record.declared_samples and num_samples > record.declared_samples:
        raise EdgeFMError(
            f"num_samples {num_samples} is above the {record.declared_samples} samples the device declared"
        )
    total = record.summary.get("memory_total")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0 and peak_rss_bytes > total:
        raise EdgeFMError(
            f"peak_rss_bytes {format_bytes(peak_rss_bytes)} is above the device's declared memory of"
            f" {format_bytes(total)}"
        )


def accept_tensors(
    parent: ParentModel,
    order: TrainOrder,
    tensors: Mapping[str, np.ndarray],
    *,
    num_samples: int,
    encoding: str = "weights",
    values_checked: bool = False,
) -> ClientUpdate:
    """The update as a :class:`ClientUpdate` ready to merge, or EdgeFMError naming what is wrong."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise EdgeFMError(f"num_samples must be a positive integer, got {num_samples!r}")
    if encoding not in ("weights", "delta"):
        raise EdgeFMError(f"unknown update encoding {encoding!r}")
    levers = order.settings.levers
    if levers.is_plain:
        _same_tensors_as_sent(order, tensors)
    if not values_checked:
        check_tensor_values(tensors, max_norm=order.max_update_norm, what=f"update for task {order.task_id!r}")
    weights = numpy_to_torch({n: np.asarray(a) for n, a in tensors.items()})
    if encoding == "delta":
        weights = weights_from_delta(numpy_to_torch(dict(order.tensors)), weights)
    update = ClientUpdate(order.spec, weights, num_samples, levers)
    try:
        contributions = check_update(parent, update, who=f"update for task {order.task_id!r}")
    except AggregationError as exc:
        raise EdgeFMError(str(exc)) from None
    bound = order.max_delta_norm
    if bound is not None:
        norm = delta_norm(contributions)
        if not norm <= bound:
            raise EdgeFMError(
                f"the update changes the weights by an L2 norm of {norm:.4g}, above the bound of {bound:.4g}"
                " (max_delta_norm_ratio x the norm of what was sent)"
            )
    return update


def _same_tensors_as_sent(order: TrainOrder, tensors: Mapping[str, np.ndarray]) -> None:
    expected = {name: array.shape for name, array in order.tensors.items()}
    problems = [f"missing {n}" for n in expected if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [
        f"{n}: shape {list(a.shape)} != {list(expected[n])}"
        for n, a in tensors.items()
        if n in expected and tuple(a.shape) != tuple(expected[n])
    ]
    problems += [
        f"{n}: dtype {a.dtype} != {order.tensors[n].dtype}"
        for n, a in tensors.items()
        if n in expected and a.dtype != order.tensors[n].dtype
    ]
    if problems:
        raise EdgeFMError("the update does not match its task: " + "; ".join(problems[:8]))
