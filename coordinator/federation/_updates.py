"""Checking a device's update against its task before it may be merged.

An update must hold exactly the tensors its task sent (names, shapes, dtypes), a positive sample
count, and finite values whose global L2 norm is within ``order.max_update_norm``. The wire protocol
(``CoordinatorConnection``) already checks values and norm as the tensors arrive; a caller that went
through it says so (``values_checked``) and the pass over the values is not made twice. A ``"delta"``
update is added to what was sent (integer tensors stay as sent).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from coordinator.federation._records import TrainOrder
from edge_sdk._errors import EdgeFMError
from edge_sdk.protocol import check_tensor_values, numpy_to_torch
from edge_sdk.scaling import ParentModel, regions

__all__ = ["check_update"]


def check_update(
    parent: ParentModel,
    order: TrainOrder,
    tensors: Mapping[str, np.ndarray],
    *,
    num_samples: int,
    encoding: str = "weights",
    values_checked: bool = False,
) -> dict[str, torch.Tensor]:
    """The update's full sub-network weights, or EdgeFMError naming what is wrong with it."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise EdgeFMError(f"num_samples must be a positive integer, got {num_samples!r}")
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
    if not values_checked:
        check_tensor_values(tensors, max_norm=order.max_update_norm, what=f"update for task {order.task_id!r}")
    weights = numpy_to_torch({n: np.asarray(a) for n, a in tensors.items()})
    if encoding == "delta":
        weights = {
            n: (sent + weights[n]) if sent.is_floating_point() else sent
            for n, sent in numpy_to_torch(dict(order.tensors)).items()
        }
    elif encoding != "weights":
        raise EdgeFMError(f"unknown update encoding {encoding!r}")
    regions(parent, order.spec)  # the spec still fits the model
    return weights
