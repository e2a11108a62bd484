"""Federation: the engine of a run, with no I/O.

The engine admits devices and plans each one's sub-network, runs rounds (select, order, accept or
refuse updates, aggregate coordinate by coordinate, evaluate), and snapshots its state for
checkpoints. The daemon (:mod:`coordinator.serve`) and the simulator (:mod:`coordinator.simulation`)
both drive it.
"""

from coordinator.federation._aggregate import ClientUpdate, FedAdam, FedAvg, ServerOptimizer, aggregate, merge_deltas
from coordinator.federation._checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from coordinator.federation._config import (
    DeployConfig,
    RunConfig,
    ServerConfig,
    load_config,
    parse_config,
)
from coordinator.federation._deploy_plan import DeployOrder, DeployOutcome, make_order, outcome
from coordinator.federation._engine import Evaluator, FederationEngine, RoundSummary, TrainOrder
from coordinator.federation._tables import (
    FederationConfig,
    ModelConfig,
    Table,
    TrainingConfig,
    read_federation,
    read_model,
    read_toml,
    read_training,
    table_reader,
)

__all__ = [
    "ClientUpdate",
    "DeployConfig",
    "DeployOrder",
    "DeployOutcome",
    "Evaluator",
    "FedAdam",
    "FedAvg",
    "FederationConfig",
    "FederationEngine",
    "ModelConfig",
    "RoundSummary",
    "RunConfig",
    "ServerConfig",
    "ServerOptimizer",
    "Table",
    "TrainOrder",
    "TrainingConfig",
    "aggregate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "make_order",
    "merge_deltas",
    "outcome",
    "parse_config",
    "read_federation",
    "read_model",
    "read_toml",
    "read_training",
    "save_checkpoint",
    "table_reader",
]
