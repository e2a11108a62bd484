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

from edge_sdk._extract import extract, param_count
from edge_sdk._models import resolve_model_dir
from edge_sdk._parent import ParentModel, load_parent, parent_from_module
from edge_sdk._reorder import Reordering, apply_reordering, plan_reordering, reorder
from edge_sdk._salience import Salience, activation_aware, weight_l1
from edge_sdk._search import Plan, plan_inference, plan_training

from ._aggregate import ClientUpdate, FedAdam, FedAvg, ServerOptimizer, aggregate, merge_deltas
from ._config import RunConfig, load_config
from ._engine import FederationEngine
from ._run import build_engine, run_coordinator
from ._server import CoordinatorServer

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
