"""Simulated attackers: devices that lie to the coordinator through the real wire protocol.

A simulation config's ``[attack]`` table names the devices that attack and how::

    [attack]
    devices = ["raspberry-pi-5-8gb-03"]   # simulated device names (<class>-NN)
    mode = "scaled_negated"               # or "huge_samples", "label_flip"
    scale = 1.0                           # x the negated trained delta (scaled_negated, huge_samples)
    norm_fraction = 0.45                  # scaled_negated: the delta's L2 norm set to this x ||sent|| (0: use scale)
    num_samples = 1000000                 # huge_samples: the sample count reported and declared

An attacker is a simulated device like any other: it is admitted with a Hello, receives its tasks as
protocol frames, trains with the SDK's TaskRunner and answers with an Update built by the SDK's
``DeviceConnection``; only what it puts in that Update differs. With ``w`` the weights it was sent
and ``w'`` what honest training on its shard gave, ``d = w' - w``:

- ``scaled_negated``: it returns ``w - s d``. With ``norm_fraction = f > 0``, ``s = f ||w|| / ||d||``
  (global L2 norms over every tensor of the task), so the lie's delta has norm ``f ||w||``: the
  strongest update a norm bound of ``c ||w||`` still accepts when ``f`` is just under ``c``;
  otherwise ``s = scale``.
- ``huge_samples``: it returns ``w - scale d`` and reports ``num_samples`` (default 10^6) as its
  sample count, and declares the same count as its shard size in its Hello profile
  (``profile["data"]["num_samples"]``, where honest simulated devices declare their real shard size).
- ``label_flip``: it trains honestly on its shard with every label ``y`` replaced by
  ``num_labels - 1 - y`` (``1 - y`` for SST-2) and returns what that training gave.

The update forms work on plain tasks (every tensor sent, trained and returned whole); a task with
levers that change the update's form (LoRA factors, embedding rows) makes ``scaled_negated`` and
``huge_samples`` fail the task with a :class:`~edge_sdk.ConfigError` (reported to the coordinator as
the device's Error). ``label_flip`` works with any task.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np

from edge_sdk._errors import ConfigError

if TYPE_CHECKING:
    from coordinator.federation import Table


class BatchSource(Protocol):
    """A device's local data as the SDK's TaskRunner consumes it (its ``BatchSource``)."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[Mapping[str, np.ndarray]]: ...


class _Update(Protocol):
    """What the SDK's ``TaskRunner.train`` returns (a ``TrainOutput`` dataclass), as far as a lie needs."""

    @property
    def tensors(self) -> Mapping[str, np.ndarray]: ...

    @property
    def num_samples(self) -> int: ...


Output = TypeVar("Output", bound=_Update)

__all__ = [
    "ATTACK_MODES",
    "AttackConfig",
    "DeviceAttack",
    "FlippedLabels",
    "read_attack",
]

ATTACK_MODES = ("scaled_negated", "huge_samples", "label_flip")


@dataclass(frozen=True)
class DeviceAttack:
    """What one attacking device does (small and picklable: it travels to the worker with each task)."""

    mode: str
    scale: float = 1.0
    norm_fraction: float = 0.0
    num_samples: int = 10**6
    num_labels: int = 2

    def data(self, source: BatchSource) -> BatchSource:
        """The shard the attacker trains on (labels flipped under ``label_flip``)."""
        return FlippedLabels(source, self.num_labels) if self.mode == "label_flip" else source

    def declared_samples(self, shard_size: int) -> int:
        """The shard size the attacker declares in its Hello profile."""
        return self.num_samples if self.mode == "huge_samples" else shard_size

    def tamper(self, output: Output, sent: Mapping[str, np.ndarray]) -> Output:
        """The Update the attacker sends instead of ``output`` (unchanged under ``label_flip``)."""
        if self.mode == "label_flip":
            return output
        names = sorted(sent)
        if set(output.tensors) != set(names) or any(output.tensors[n].shape != sent[n].shape for n in names):
            raise ConfigError(f"attack {self.mode!r} needs a plain task (every tensor sent, trained, returned whole)")
        delta = {n: output.tensors[n].astype(np.float64) - sent[n].astype(np.float64) for n in names}
        scale = self.scale
        if self.mode == "scaled_negated" and self.norm_fraction > 0:
            scale = self.norm_fraction * _norm(sent.values()) / max(_norm(delta.values()), 1e-30)
        lie = {n: (sent[n].astype(np.float64) - scale * delta[n]).astype(sent[n].dtype) for n in names}
        samples = self.num_samples if self.mode == "huge_samples" else output.num_samples
        return cast(Output, dataclasses.replace(cast(Any, output), tensors=lie, num_samples=samples))


def _norm(arrays: Any) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


class FlippedLabels:
    """A BatchSource whose labels are ``num_labels - 1 - y``; everything else is the wrapped source's."""

    def __init__(self, source: BatchSource, num_labels: int) -> None:
        self.source = source
        self.num_labels = num_labels

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:  # vocab_size, eval_batches, ...
        return getattr(self.source, name)

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[Mapping[str, np.ndarray]]:
        for batch in self.source.batches(batch_size, seq_len, seed):
            yield {**batch, "labels": (self.num_labels - 1) - np.asarray(batch["labels"])}


@dataclass(frozen=True)
class AttackConfig:
    """The ``[attack]`` table: which devices attack, and how (no devices: no attack)."""

    devices: tuple[str, ...] = ()
    mode: str = "scaled_negated"
    scale: float = 1.0
    norm_fraction: float = 0.0
    num_samples: int = 10**6

    def for_device(self, name: str, num_labels: int) -> DeviceAttack | None:
        if name not in self.devices:
            return None
        return DeviceAttack(self.mode, self.scale, self.norm_fraction, self.num_samples, num_labels)

    def check_devices(self, names: Sequence[str]) -> None:
        unknown = sorted(set(self.devices) - set(names))
        if unknown:
            raise ConfigError(
                f"[attack] devices: no simulated device named {', '.join(unknown)}"
                f" (devices are named <class>-NN, e.g. {names[0] if names else 'raspberry-pi-4-2gb-01'})"
            )


def read_attack(t: Table) -> AttackConfig:
    """The ``[attack]`` table (absent: no attacker)."""
    devices = t.value("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
        raise t.error("devices", f"must be a list of device names, got {devices!r}")
    cfg = AttackConfig(
        devices=tuple(devices),
        mode=t.text("mode", "scaled_negated", choices=ATTACK_MODES),
        scale=t.number("scale", 1.0, low=0.0),
        norm_fraction=t.number("norm_fraction", 0.0, low=0.0),
        num_samples=t.integer("num_samples", 10**6, low=1),
    )
    t.done()
    return cfg
