"""edge-fm coordinator: salience ranking, reordering, budget-matched slicing and aggregation.

The model-scaling core, as plain functions over a :class:`ParentModel` (a pre-trained model's
family, config, task and state dict)::

    parent = load_parent(resolve_model_dir("all-MiniLM-L6-v2"))
    parent, salience, _ = reorder(parent, weight_l1(parent))          # function unchanged
    plan = plan_training(parent, salience, parse_size("1.5GB"), Workload(16, 128))
    weights = extract(parent, plan.spec)                              # what a device receives
    parent = aggregate(parent, [ClientUpdate(plan.spec, trained, n)], FedAvg())
"""

from __future__ import annotations

from coordinator.federation import (
    ClientUpdate,
    FedAdam,
    FedAvg,
    FederationEngine,
    RunConfig,
    ServerOptimizer,
    aggregate,
    load_config,
    merge_deltas,
)
from coordinator.serve import CoordinatorServer, build_engine, run_coordinator
from edge_sdk.scaling import (
    ParentModel,
    Plan,
    Reordering,
    Salience,
    activation_aware,
    apply_reordering,
    extract,
    load_parent,
    param_count,
    parent_from_module,
    plan_inference,
    plan_reordering,
    plan_training,
    reorder,
    resolve_model_dir,
    weight_l1,
)

__all__ = [
    "ClientUpdate",
    "CoordinatorServer",
    "FedAdam",
    "FedAvg",
    "FederationEngine",
    "ParentModel",
    "Plan",
    "Reordering",
    "RunConfig",
    "Salience",
    "ServerOptimizer",
    "activation_aware",
    "aggregate",
    "apply_reordering",
    "build_engine",
    "extract",
    "load_config",
    "load_parent",
    "merge_deltas",
    "param_count",
    "parent_from_module",
    "plan_inference",
    "plan_reordering",
    "plan_training",
    "reorder",
    "resolve_model_dir",
    "run_coordinator",
    "weight_l1",
]
