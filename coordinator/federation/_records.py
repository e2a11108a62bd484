"""What one round of the federation engine hands out and reports: orders, outcomes, summaries.

Frozen records, JSON-ready (``to_json``): a :class:`TrainOrder` is what a transport sends to one device,
a :class:`DeviceOutcome` what became of it, a :class:`RoundSummary` the round's one log line and the
entry of the run's metrics history.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from edge_sdk import SubnetSpec
from edge_sdk._units import format_bytes
from edge_sdk.protocol import CoordinatorConnection, EncodedTensors, TrainSettings

__all__ = ["DeviceOutcome", "RoundSummary", "Status", "TrainOrder", "collapse_note", "metrics_text", "width_of"]

Status = Literal["ok", "rejected", "failed", "late", "missing"]


@dataclasses.dataclass(frozen=True)
class TrainOrder:
    """One device's task in a round: what the transport sends (TrainTask fields + tensors)."""

    task_id: str
    device_id: str
    round: int
    spec: SubnetSpec
    params: int
    params_fraction: float
    predicted_bytes: int  # the memory model's prediction (runtime excluded) for this workload
    settings: TrainSettings
    model_config: Mapping[str, Any]
    tensors: Mapping[str, np.ndarray]
    max_update_norm: float  # bound on the L2 norm of the returned tensors (checked as they arrive)
    max_delta_norm: float | None = None  # bound on the L2 norm of the change they make (None: none)

    def send(self, conn: CoordinatorConnection, encoded: EncodedTensors | None = None) -> None:
        """Queue this order's TrainTask (and its tensors, or ``encoded``: the same tensors already laid
        out for the wire) on ``conn``; ProtocolError if it cannot go."""
        conn.send_train_task(
            task_id=self.task_id,
            round=self.round,
            spec=self.spec.to_dict(),
            model_config=self.model_config,
            settings=self.settings,
            tensors=self.tensors if encoded is None else encoded,
            max_update_norm=self.max_update_norm,
        )


@dataclasses.dataclass(frozen=True)
class DeviceOutcome:
    """What became of one device's task in a round."""

    device_id: str
    task_id: str
    status: Status
    reason: str = ""
    num_samples: int = 0
    params: int = 0
    params_fraction: float = 0.0
    width: str = ""  # mean heads / FFN kept, e.g. "heads 9.0/12 ffn 1104/1536"
    levers: str = ""  # the training levers of the task, e.g. "checkpointing, embedding rows", or "plain"
    predicted_bytes: int = 0
    usable_bytes: int = 0
    runtime_bytes: int = 0
    peak_rss_bytes: int = 0
    step_time_s: float = 0.0
    train_loss: float = float("nan")
    bytes_out: int = 0
    bytes_in: int = 0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train_loss"] = None if math.isnan(self.train_loss) else self.train_loss
        return data


@dataclasses.dataclass(frozen=True)
class RoundSummary:
    """One finished round: who did what, the validation metrics, the traffic, the new weights."""

    round: int
    rounds: int
    outcomes: tuple[DeviceOutcome, ...]
    metrics: Mapping[str, float]
    weights_digest: str
    merge: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # rule; devices clipped / capped
    privacy: Mapping[str, Any] | None = None  # DP: mode, epsilon, delta, q, noise_multiplier, ...

    @property
    def epsilon(self) -> float | None:
        """The run's DP epsilon after this round (None without DP)."""
        eps = None if self.privacy is None else self.privacy["epsilon"]
        return None if eps is None else float(eps)

    @property
    def aggregated(self) -> int:
        return sum(1 for o in self.outcomes if o.status == "ok")

    @property
    def bytes_out(self) -> int:
        return sum(o.bytes_out for o in self.outcomes)

    @property
    def bytes_in(self) -> int:
        return sum(o.bytes_in for o in self.outcomes)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "aggregated": self.aggregated,
            "metrics": dict(self.metrics),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "weights_digest": self.weights_digest,
            "devices": [o.to_json() for o in self.outcomes],
            **({"merge": dict(self.merge)} if self.merge else {}),
            **({"privacy": dict(self.privacy), "epsilon": self.epsilon} if self.privacy is not None else {}),
        }

    def log_line(self) -> str:
        quality = metrics_text(self.metrics)
        parts = []
        for o in self.outcomes:
            if o.status == "ok":
                parts.append(
                    f"{o.device_id}: {o.params / 1e6:.2f}M params ({o.params_fraction:.0%}, {o.width}),"
                    f" peak {format_bytes(o.peak_rss_bytes)}, {o.step_time_s:.3f} s/step"
                )
            else:
                parts.append(f"{o.device_id}: {o.status.upper()} ({o.reason})")
        return (
            f"round {self.round}/{self.rounds}: {self.aggregated}/{len(self.outcomes)} updates merged"
            f"{self._merge_note()}, {quality},{self._privacy_note()}"
            f" sent {format_bytes(self.bytes_out)}, received {format_bytes(self.bytes_in)}; " + "; ".join(parts)
        )

    def _merge_note(self) -> str:
        clipped = ", ".join(f"{d} x{s:.2f}" for d, s in self.merge.get("clipped", {}).items())
        capped = ", ".join(f"{d} to {w:g}" for d, w in self.merge.get("capped", {}).items())
        notes = ([f"clipped {clipped}"] if clipped else []) + ([f"weight capped {capped}"] if capped else [])
        return f" ({'; '.join(notes)})" if notes else ""

    def _privacy_note(self) -> str:
        if self.privacy is None:
            return ""
        eps = "inf" if self.epsilon is None else f"{self.epsilon:.3g}"
        return f" DP {self.privacy['mode']} epsilon {eps} (delta {self.privacy['delta']:g}),"


def metrics_text(metrics: Mapping[str, float]) -> str:
    """The validation part of a round's log line.

    ``accuracy 0.6838 macro-F1 0.4061 (majority class 0.6838) loss 0.6217``, then the collapse note when
    the model predicts one class for almost every row; "no validation" without metrics. Older records
    (accuracy and loss only) give the short form. A causal LM's (``loss`` and ``perplexity``, no
    accuracy): ``loss 0.4123 perplexity 1.510``, the mean response-token loss held out.
    """
    acc, loss = metrics.get("accuracy"), metrics.get("loss")
    perplexity = metrics.get("perplexity")
    if acc is None and loss is not None and perplexity is not None:  # a causal LM: response-token loss
        return f"loss {loss:.4f} perplexity {perplexity:.3f}"
    if acc is None or loss is None or math.isnan(acc):
        return "no validation"
    f1, majority = metrics.get("macro_f1"), metrics.get("majority_share")
    text = f"accuracy {acc:.4f}"
    if f1 is not None:
        text += f" macro-F1 {f1:.4f}"
    if majority is not None:
        text += f" (majority class {majority:.4f})"
    text += f" loss {loss:.4f}"
    note = collapse_note(metrics)
    return f"{text}, {note}" if note else text


def collapse_note(metrics: Mapping[str, float]) -> str:
    """A warning text when ``metrics["collapsed"]`` is set (the rule: ``edge_sdk.training._metrics``), else ""."""
    if not metrics.get("collapsed"):
        return ""
    top = metrics.get("top_prediction_class", math.nan)
    share = metrics.get("top_prediction_share", math.nan)
    majority = metrics.get("majority_share", math.nan)
    cls = "?" if math.isnan(top) else f"{int(top)}"
    return (
        f"COLLAPSED: predicts class {cls} for {share:.1%} of the rows (majority class share {majority:.1%});"
        " accuracy says little"
    )


def width_of(spec: SubnetSpec) -> str:
    heads = sum(layer.heads for layer in spec.layers) / len(spec.layers)
    ffn = sum(layer.ffn for layer in spec.layers) / len(spec.layers)
    d = spec.parent
    depth = "" if len(spec.layers) == d.num_layers else f" layers {len(spec.layers)}/{d.num_layers}"
    return f"heads {heads:.1f}/{d.num_heads} ffn {ffn:.0f}/{d.ffn}{depth}"
