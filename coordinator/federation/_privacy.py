"""Differential privacy: DP-FedAvg on sub-networks (McMahan et al. 2018), and its accountant.

**Central** (``[privacy] mode = "central"``): the coordinator, trusted, adds the noise. Device k's
delta d_k, on the coordinates it covered (mask M_k), is clipped to the L2 bound C (``clip_norm``),
``d_k <- d_k x min(1, C / ||d_k||)`` with the norm over what it covered; devices weigh the same; per
coordinate c covered by ``n_c = sum_k M_k[c]`` devices::

    delta[c] = (sum_k M_k[c] d_k[c] + N(0, (z C)^2)) / n_c        (z = noise_multiplier)

and uncovered coordinates get neither delta nor noise. One device changes the sum by at most C in L2
(whatever coordinates it covers), so the sum is the Gaussian mechanism with noise multiplier z; the
division by n_c is post-processing. It treats n_c as public: which coordinates a device covers comes
from its plan (its memory budget, not its data) -- with one exception made data-independent here: a
device training embedding *rows* (``embeddings = "rows"``) covers the rows its data touched, so
under DP its contribution covers the whole table (zero on the other rows), or the noise would reveal
the union of the devices' vocabularies. Participation itself is not hidden from the coordinator.

**Local** (``mode = "local"``): each device clips its own delta to C and adds N(0, (z C)^2) to every
coordinate it sends (``TrainSettings.dp_clip_norm`` / ``dp_noise_multiplier``); the coordinator merges
the noisy deltas with its ``[aggregation]`` rule (post-processing).

**Accountant**: epsilon for the configured delta after each round, with dp-accounting's RDP
accountant. Central: each round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with
``q = devices in the round / devices in the federation``. The selection draws a fixed number of
devices without replacement; Poisson sampling with the same rate is the usual approximation (the
bound DP-FedAvg reports). Local: a device's release is the Gaussian mechanism on a vector that may
change by 2C (replace its data), so ``GaussianDpEvent(z / 2)``, with no amplification by sampling
(the coordinator sees who took part), composed over every round: an upper bound for any device.
The rounds composed so far are stored in each round's record (``history[i]["privacy"]``), so a
resumed run's accountant replays them and epsilon continues.

Noise is drawn from a torch generator seeded per round: from the run's seed (``reproducible``,
simulations' default: anyone who knows the seed can subtract the noise from two released models),
or from the OS's entropy (a served run's default). Floating-point noise has known weaknesses
(Mironov 2012); this is not a certified implementation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.federation._updates import Contribution
from edge_sdk._errors import ConfigError

__all__ = [
    "PRIVACY_MODES",
    "GaussianNoise",
    "PrivacyAccountant",
    "PrivacyConfig",
    "private_merge",
]

PRIVACY_MODES = ("off", "central", "local")


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``[privacy]`` table: ``mode`` "off" | "central" | "local", the clip bound C
    (``clip_norm``), the noise multiplier z, the accountant's delta, and whether the noise is
    seeded from the run's seed (``reproducible``) or from the OS's entropy."""

    mode: str = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    reproducible: bool = False

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ConfigError(f"privacy mode must be one of {PRIVACY_MODES}, got {self.mode!r}")
        if not (_positive(self.clip_norm)):
            raise ConfigError(f"privacy clip_norm must be > 0, got {self.clip_norm!r}")
        if not (_positive(self.noise_multiplier) or self.noise_multiplier == 0):
            raise ConfigError(f"privacy noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (_positive(self.delta) and self.delta < 1):
            raise ConfigError(f"privacy delta must be in (0, 1), got {self.delta!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def noise(self, seed: int, round_index: int) -> GaussianNoise:
        """The central noise of round ``round_index``: seeded from ``seed`` if reproducible."""
        if self.reproducible:
            noise_seed = zlib.crc32(f"{seed}/dp-noise/{round_index}".encode())
        else:
            noise_seed = secrets.randbits(63)
        return GaussianNoise(self.clip_norm, self.noise_multiplier, noise_seed)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class GaussianNoise:
    """Central DP for one round: clip each device's delta to ``clip_norm``, add N(0, (z C)^2)."""

    clip_norm: float
    noise_multiplier: float
    seed: int

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm


def private_merge(
    floats: Mapping[str, torch.Tensor],
    checked: Sequence[Sequence[Contribution]],
    norms: Sequence[float],
    weighers: Sequence[Callable[[str], float]],
    noise: GaussianNoise,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """DP-FedAvg's merge (module docstring): ``(delta, count of covering devices, clip scales)``.

    A device covers a tensor only if its weigher gives it a positive weight (shared protection);
    the noise is drawn tensor by tensor in the parent's order from one generator, so a seed replays.
    """
    scales = [min(1.0, noise.clip_norm / n) if n > 0 else 1.0 for n in norms]
    num = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    count = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in floats.items()}
    for contributions, scale, weight_of in zip(checked, scales, weighers, strict=True):
        for c in contributions:
            if c.name not in floats or weight_of(c.name) <= 0:
                continue
            if c.rows is not None:  # rows: covers the whole table (see the module docstring)
                num[c.name].index_add_(0, c.rows, scale * c.delta)
                count[c.name] += 1.0
            else:
                assert c.region is not None
                num[c.name][c.region] += scale * c.delta
                count[c.name][c.region] += 1.0
    generator = torch.Generator().manual_seed(noise.seed)
    delta = {}
    for name in floats:
        drawn = torch.randn(num[name].shape, generator=generator, dtype=torch.float32) * noise.std
        covered = count[name] > 0
        delta[name] = torch.where(covered, (num[name] + drawn) / count[name].clamp_min(1.0), 0.0)
    return delta, count, scales


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs a warning per fractional RDP order it cannot compute (it skips them:
    the bound stays valid); keep them out of the run's log."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


class PrivacyAccountant:
    """Epsilon of the rounds composed so far (RDP accountant of dp-accounting; module docstring).

    Rounds are kept as counts per (sampling rate, noise multiplier), so composing T identical rounds
    costs one RDP evaluation, and :meth:`from_history` rebuilds the state of a resumed run.
    """

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.rounds: dict[tuple[float, float], int] = {}

    def compose(self, q: float, noise_multiplier: float) -> None:
        """One more round of the subsampled Gaussian mechanism (q = 1: every device, no sampling)."""
        key = (float(q), float(noise_multiplier))
        self.rounds[key] = self.rounds.get(key, 0) + 1

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` over the composed rounds (0 before any; inf without noise)."""
        if not self.rounds:
            return 0.0
        if any(z == 0 for _, z in self.rounds):
            return math.inf
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        for (q, z), count in sorted(self.rounds.items()):
            event = dp_accounting.GaussianDpEvent(z)
            if q < 1:
                event = dp_accounting.PoissonSampledDpEvent(q, event)
            accountant.compose(event, count)
        with _quiet_absl():
            return float(accountant.get_epsilon(self.delta))

    @classmethod
    def from_history(cls, delta: float, history: Sequence[Mapping[str, Any]]) -> PrivacyAccountant:
        """The accountant after the rounds of ``history`` (each round's ``privacy`` record)."""
        accountant = cls(delta)
        for entry in history:
            record = entry.get("privacy")
            if isinstance(record, Mapping) and record.get("composed"):
                accountant.compose(float(record["q"]), float(record["noise_multiplier"]))
        return accountant


def round_event(mode: str, selected: int, population: int, noise_multiplier: float) -> tuple[float, float]:
    """The (sampling rate, noise multiplier) a round composes: central ``(selected / population, z)``,
    local ``(1, z / 2)`` (see the module docstring)."""
    if mode == "local":
        return 1.0, noise_multiplier / 2
    return min(1.0, selected / max(1, population)), noise_multiplier
