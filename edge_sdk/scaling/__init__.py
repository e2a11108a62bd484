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
    "LEVER_NAMES": "edge_sdk.scaling._policy",
    "LeverPolicy": "edge_sdk.scaling._policy",
    "Levers": "edge_sdk._levers",
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
    "add_lever_arguments": "edge_sdk.scaling._policy",
    "activation_bytes": "edge_sdk.scaling._memory",
    "apply_reordering": "edge_sdk.scaling._reorder",
    "budget_for_device_class": "edge_sdk.scaling._budget",
    "build_model": "edge_sdk.scaling._build",
    "default_margin": "edge_sdk.scaling._budget",
    "describe_policy": "edge_sdk.scaling._policy",
    "export_estimate": "edge_sdk.scaling._memory",
    "extract": "edge_sdk.scaling._extract",
    "family_for": "edge_sdk.scaling.families",
    "inference_bytes": "edge_sdk.scaling._budget",
    "inference_estimate": "edge_sdk.scaling._memory",
    "levers_line": "edge_sdk.scaling._planning",
    "lm_serving_estimate": "edge_sdk.scaling._memory_lm",
    "lm_serving_estimator": "edge_sdk.scaling._planning",
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
    "policy_from_arguments": "edge_sdk.scaling._policy",
    "ranked_parent": "edge_sdk.scaling._ranked",
    "regions": "edge_sdk.scaling._extract",
    "relative_step_time": "edge_sdk.scaling._step_time",
    "reorder": "edge_sdk.scaling._reorder",
    "resolve_model_dir": "edge_sdk.scaling._models",
    "serving_estimate": "edge_sdk.scaling._memory",
    "training_bytes": "edge_sdk.scaling._budget",
    "training_estimate": "edge_sdk.scaling._memory",
    "weight_l1": "edge_sdk.scaling._salience",
    "workload_for": "edge_sdk.scaling._memory",
}

__all__ = [
    "DEFAULT_MIN_MARGIN_BYTES",
    "INFERENCE_RUNTIME_BYTES",
    "LEVER_NAMES",
    "SALIENCE_KINDS",
    "TRAINING_RUNTIME_BYTES",
    "DevicePlans",
    "LeverPolicy",
    "Levers",
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
    "add_lever_arguments",
    "apply_reordering",
    "budget_for_device_class",
    "build_model",
    "default_margin",
    "describe_policy",
    "export_estimate",
    "extract",
    "family_for",
    "inference_bytes",
    "inference_estimate",
    "levers_line",
    "lm_serving_estimate",
    "lm_serving_estimator",
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
    "policy_from_arguments",
    "ranked_parent",
    "regions",
    "relative_step_time",
    "reorder",
    "resolve_model_dir",
    "serving_estimate",
    "training_bytes",
    "training_estimate",
    "weight_l1",
    "workload_for",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk._levers import Levers
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
        workload_for,
    )
    from edge_sdk.scaling._memory_lm import lm_serving_estimate
    from edge_sdk.scaling._models import resolve_model_dir
    from edge_sdk.scaling._parent import ParentModel, load_parent, parent_from_module
    from edge_sdk.scaling._planning import (
        DevicePlans,
        ServingPlan,
        levers_line,
        lm_serving_estimator,
        plan_device,
        plan_dict,
        plan_serving,
        plan_table,
    )
    from edge_sdk.scaling._policy import (
        LEVER_NAMES,
        LeverPolicy,
        add_lever_arguments,
        describe_policy,
        policy_from_arguments,
    )
    from edge_sdk.scaling._ranked import SALIENCE_KINDS, ranked_parent
    from edge_sdk.scaling._reorder import Reordering, apply_reordering, plan_reordering, reorder
    from edge_sdk.scaling._salience import Salience, activation_aware, weight_l1
    from edge_sdk.scaling._search import Plan, plan_inference, plan_training
    from edge_sdk.scaling._step_time import relative_step_time
    from edge_sdk.scaling.families import family_for
