"""Model scaling: everything about a model that does not depend on the device running it.

Rank heads and FFN neurons by salience, reorder the weights so every sub-network is a prefix (the
model's function does not change), extract and build sub-networks, predict their training and
serving memory, and search for the largest sub-network a budget affords. The coordinator plans
with this face; a device uses the same code to check a plan (``edge-sdk profile --model``).
Model families register in :mod:`edge_sdk.scaling.families`.

Names load lazily: importing this face imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "DEFAULT_MIN_MARGIN_BYTES": "edge_sdk.scaling._budget",
    "DevicePlans": "edge_sdk.scaling._planning",
    "INFERENCE_RUNTIME_BYTES": "edge_sdk.scaling._memory",
    "MemoryBudget": "edge_sdk.scaling._budget",
    "MemoryEstimate": "edge_sdk.scaling._memory",
    "ParentModel": "edge_sdk.scaling._parent",
    "SALIENCE_KINDS": "edge_sdk.scaling._ranked",
    "Plan": "edge_sdk.scaling._search",
    "Reordering": "edge_sdk.scaling._reorder",
    "Salience": "edge_sdk.scaling._salience",
    "ServingPlan": "edge_sdk.scaling._planning",
    "TRAINING_RUNTIME_BYTES": "edge_sdk.scaling._memory",
    "Workload": "edge_sdk.scaling._memory",
    "activation_aware": "edge_sdk.scaling._salience",
    "activation_bytes": "edge_sdk.scaling._memory",
    "apply_reordering": "edge_sdk.scaling._reorder",
    "budget_for_device_class": "edge_sdk.scaling._budget",
    "build_model": "edge_sdk.scaling._build",
    "default_margin": "edge_sdk.scaling._budget",
    "export_estimate": "edge_sdk.scaling._memory",
    "extract": "edge_sdk.scaling._extract",
    "family_for": "edge_sdk.scaling.families",
    "inference_bytes": "edge_sdk.scaling._budget",
    "inference_estimate": "edge_sdk.scaling._memory",
    "load_parent": "edge_sdk.scaling._parent",
    "model_class": "edge_sdk.scaling._build",
    "param_count": "edge_sdk.scaling._extract",
    "parent_from_module": "edge_sdk.scaling._parent",
    "plan_device": "edge_sdk.scaling._planning",
    "plan_dict": "edge_sdk.scaling._planning",
    "plan_inference": "edge_sdk.scaling._search",
    "plan_reordering": "edge_sdk.scaling._reorder",
    "plan_serving": "edge_sdk.scaling._planning",
    "plan_table": "edge_sdk.scaling._planning",
    "plan_training": "edge_sdk.scaling._search",
    "ranked_parent": "edge_sdk.scaling._ranked",
    "regions": "edge_sdk.scaling._extract",
    "reorder": "edge_sdk.scaling._reorder",
    "resolve_model_dir": "edge_sdk.scaling._models",
    "serving_estimate": "edge_sdk.scaling._memory",
    "training_bytes": "edge_sdk.scaling._budget",
    "training_estimate": "edge_sdk.scaling._memory",
    "weight_l1": "edge_sdk.scaling._salience",
}

__all__ = [
    "DEFAULT_MIN_MARGIN_BYTES",
    "INFERENCE_RUNTIME_BYTES",
    "SALIENCE_KINDS",
    "TRAINING_RUNTIME_BYTES",
    "DevicePlans",
    "MemoryBudget",
    "MemoryEstimate",
    "ParentModel",
    "Plan",
    "Reordering",
    "Salience",
    "ServingPlan",
    "Workload",
    "activation_aware",
    "activation_bytes",
    "apply_reordering",
    "budget_for_device_class",
    "build_model",
    "default_margin",
    "export_estimate",
    "extract",
    "family_for",
    "inference_bytes",
    "inference_estimate",
    "load_parent",
    "model_class",
    "param_count",
    "parent_from_module",
    "plan_device",
    "plan_dict",
    "plan_inference",
    "plan_reordering",
    "plan_serving",
    "plan_table",
    "plan_training",
    "ranked_parent",
    "regions",
    "reorder",
    "resolve_model_dir",
    "serving_estimate",
    "training_bytes",
    "training_estimate",
    "weight_l1",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.scaling._budget import (
        DEFAULT_MIN_MARGIN_BYTES,
        MemoryBudget,
        budget_for_device_class,
        default_margin,
        inference_bytes,
        training_bytes,
    )
    from edge_sdk.scaling._build import build_model, model_class
    from edge_sdk.scaling._extract import extract, param_count, regions
    from edge_sdk.scaling._memory import (
        INFERENCE_RUNTIME_BYTES,
        TRAINING_RUNTIME_BYTES,
        MemoryEstimate,
        Workload,
        activation_bytes,
        export_estimate,
        inference_estimate,
        serving_estimate,
        training_estimate,
    )
    from edge_sdk.scaling._models import resolve_model_dir
    from edge_sdk.scaling._parent import ParentModel, load_parent, parent_from_module
    from edge_sdk.scaling._planning import DevicePlans, ServingPlan, plan_device, plan_dict, plan_serving, plan_table
    from edge_sdk.scaling._ranked import SALIENCE_KINDS, ranked_parent
    from edge_sdk.scaling._reorder import Reordering, apply_reordering, plan_reordering, reorder
    from edge_sdk.scaling._salience import Salience, activation_aware, weight_l1
    from edge_sdk.scaling._search import Plan, plan_inference, plan_training
    from edge_sdk.scaling.families import family_for
