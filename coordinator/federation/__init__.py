"""Federation: the engine of a run, with no I/O.

The engine admits devices and plans each one's sub-network under a width policy (its registry and
planner), runs rounds (select, order, accept or refuse updates, aggregate coordinate by coordinate,
evaluate), and snapshots its state for checkpoints. The daemon (:mod:`coordinator.serve`) and the
simulator (:mod:`coordinator.simulation`) both drive it the same way: a :class:`DeviceSession` per
device connection (protocol events in, engine calls, a verdict out) and one :class:`RoundLoop`.
"""

from coordinator.federation._aggregate import (
    AggregationRule,
    ClientUpdate,
    FedAdam,
    FedAvg,
    GaussianNoise,
    Merge,
    ServerOptimizer,
    aggregate,
    aggregate_round,
    merge_deltas,
    merge_round,
)
from coordinator.federation._checkpoint import EngineState, latest_checkpoint, load_checkpoint, save_checkpoint
from coordinator.federation._config import (
    DeployConfig,
    RunConfig,
    ServerConfig,
    StatusConfig,
    load_config,
    parse_config,
)
from coordinator.federation._deploy_plan import DeployOrder, DeployOutcome, make_order, outcome
from coordinator.federation._engine import Evaluator, FederationEngine, RoundSummary, TrainOrder
from coordinator.federation._loop import (
    FinishRound,
    RoundLoop,
    RoundObserver,
    RoundResult,
    RunAbortedError,
    RunComplete,
    SendOrders,
    Step,
    WaitFor,
)
from coordinator.federation._planner import BUDGET, WIDTHS, Planner, WidthPolicy
from coordinator.federation._preflight import check_data_file, check_model_folder, read_data
from coordinator.federation._privacy import PrivacyAccountant, PrivacyConfig
from coordinator.federation._ratelimit import LogLimiter, clip
from coordinator.federation._records import collapse_note, metrics_text
from coordinator.federation._registry import DeviceRecord, DeviceRegistry
from coordinator.federation._session import (
    CHANGED,
    GO_ON,
    DeployInbox,
    DeviceSession,
    TaskProgress,
    Verdict,
    frame_bytes,
)
from coordinator.federation._tables import (
    FederationConfig,
    ModelConfig,
    Table,
    TrainingConfig,
    read_aggregation,
    read_data_format,
    read_federation,
    read_levers,
    read_model,
    read_privacy,
    read_toml,
    read_training,
    resolve_labels,
    table_reader,
)

__all__ = [
    "BUDGET",
    "CHANGED",
    "GO_ON",
    "WIDTHS",
    "AggregationRule",
    "ClientUpdate",
    "DeployConfig",
    "DeployInbox",
    "DeployOrder",
    "DeployOutcome",
    "DeviceRecord",
    "DeviceRegistry",
    "DeviceSession",
    "EngineState",
    "Evaluator",
    "FedAdam",
    "FedAvg",
    "FederationConfig",
    "FederationEngine",
    "FinishRound",
    "GaussianNoise",
    "LogLimiter",
    "Merge",
    "ModelConfig",
    "Planner",
    "PrivacyAccountant",
    "PrivacyConfig",
    "RoundLoop",
    "RoundObserver",
    "RoundResult",
    "RoundSummary",
    "RunAbortedError",
    "RunComplete",
    "RunConfig",
    "SendOrders",
    "ServerConfig",
    "ServerOptimizer",
    "StatusConfig",
    "Step",
    "Table",
    "TaskProgress",
    "TrainOrder",
    "TrainingConfig",
    "Verdict",
    "WaitFor",
    "WidthPolicy",
    "aggregate",
    "aggregate_round",
    "check_data_file",
    "check_model_folder",
    "clip",
    "collapse_note",
    "frame_bytes",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "make_order",
    "merge_deltas",
    "merge_round",
    "metrics_text",
    "outcome",
    "parse_config",
    "read_aggregation",
    "read_data",
    "read_data_format",
    "read_federation",
    "read_levers",
    "read_model",
    "read_privacy",
    "read_toml",
    "read_training",
    "resolve_labels",
    "save_checkpoint",
    "table_reader",
]
