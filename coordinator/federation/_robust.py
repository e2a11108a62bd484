"""Robust aggregation: a rule that bounds what one device can do to a round, coordinate by coordinate.

A rule (:class:`AggregationRule`, the ``[aggregation]`` table) is a value passed to ``aggregate``; it
acts in three steps on the round's K updates, each device's delta d_k living on the coordinates it
covered (its mask M_k: a prefix region, embedding rows, the product B·A of its LoRA factors):

1. **Clip** (``clip = "median"``): each device's L2 norm over what it covered,
   ``||d_k|| = sqrt(sum_c M_k[c] d_k[c]^2)``; the bound is ``B = clip_factor x median_k ||d_k||`` and a
   device above it is scaled down to it, ``d_k <- d_k x min(1, B / ||d_k||)``. A device cannot move the
   model further than ``clip_factor`` times the round's typical device, however it scales its delta.
   (Narrow devices cover fewer coordinates and have smaller norms; with one device of several widths
   per round, an honest full-width device may be scaled a little. ``clip = "off"`` disables it.)
2. **Cap the sample weight**: ``w_k = min(n_k, weight_cap x median_k n_k)`` (``weight_cap = 0``: no
   cap), so a device claiming a huge ``num_samples`` weighs at most ``weight_cap`` median devices.
3. **Combine**, per coordinate c over the devices covering it (``m_c`` of them):

   * ``"mean"``: ``sum_k w_k M_k[c] d_k[c] / sum_k w_k M_k[c]`` (FedAvg's weighted mean);
   * ``"trimmed_mean"``: sort the m_c covering values, drop ``t_c = floor(trim x m_c)`` from each end
     -- at least 1 when ``trim > 0`` and ``m_c >= 3`` (so 3 covering devices give their median, 5
     drop the largest and the smallest) -- and take the **weighted** mean (weights w_k) of the rest.
     Weighted, so that ``trim = 0`` is exactly ``"mean"`` and unbalanced honest data keep FedAvg's
     weighting; the extremes are removed by rank whatever their weight, and the cap bounds the rest.
     A coordinate covered by 1 or 2 devices is their weighted mean (clipping still bounds it);
   * ``"median"``: the median of the covering values, unweighted (an even count: the mean of the
     two middle values).

A device excluded from a shared tensor (``SharedProtection`` min_width, weight 0) does not cover it.
Memory: trimmed mean and median stack the K devices' values of one tensor at a time (``[K, *shape]``
float32, uncovered coordinates NaN) and sort it in chunks of a few million values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edge_sdk._errors import ConfigError

__all__ = [
    "CLIPS",
    "RULES",
    "AggregationRule",
    "capped_weights",
    "clip_scales",
    "combine_sorted",
    "trim_counts",
]

RULES = ("mean", "trimmed_mean", "median")
CLIPS = ("median", "off")
_CHUNK = 1 << 22  # values sorted at a time (K x chunk floats)


@dataclass(frozen=True)
class AggregationRule:
    """The ``[aggregation]`` table: how one round's updates are combined (see the module docstring).

    The defaults are meant to hold one attacker among five devices (scaled or negated deltas, a huge
    sample count, label-flipped training): each delta clipped to twice the median norm, weights
    capped at twice the median sample count, and a 20 % trimmed mean (one value dropped from each
    end of five). Measured on MiniLM / SST-2 (one round from a trained model, six seeds): within
    0.6 points of the run without the attacker on average, where plain FedAvg lost 13 to 29.
    :meth:`plain` is FedAvg's weighted mean with no defence.
    """

    rule: str = "trimmed_mean"
    trim: float = 0.2
    clip: str = "median"
    clip_factor: float = 2.0
    weight_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"aggregation rule must be one of {RULES}, got {self.rule!r}")
        if self.clip not in CLIPS:
            raise ConfigError(f"aggregation clip must be one of {CLIPS}, got {self.clip!r}")
        if not (_number(self.trim) and 0.0 <= self.trim < 0.5):
            raise ConfigError(f"aggregation trim must be in [0, 0.5), got {self.trim!r}")
        if not (_number(self.clip_factor) and self.clip_factor >= 1.0):
            raise ConfigError(f"aggregation clip_factor must be >= 1, got {self.clip_factor!r}")
        if not (_number(self.weight_cap) and (self.weight_cap == 0.0 or self.weight_cap >= 1.0)):
            raise ConfigError(f"aggregation weight_cap must be 0 (no cap) or >= 1, got {self.weight_cap!r}")

    @classmethod
    def plain(cls) -> AggregationRule:
        """FedAvg's weighted mean: no clipping, no cap."""
        return cls(rule="mean", trim=0.0, clip="off", weight_cap=0.0)

    def describe(self) -> str:
        """A short description for logs, e.g. ``trimmed_mean 0.2, clip 2x median, cap 2x``."""
        parts = [self.rule + (f" {self.trim:g}" if self.rule == "trimmed_mean" else "")]
        parts.append(f"clip {self.clip_factor:g}x median" if self.clip == "median" else "no clip")
        parts.append(f"cap {self.weight_cap:g}x" if self.weight_cap else "no cap")
        return ", ".join(parts)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clip_scales(norms: Sequence[float], rule: AggregationRule) -> list[float]:
    """Per device, the factor its delta is scaled by: ``min(1, clip_factor x median(norms) / norm)``."""
    if rule.clip == "off" or not norms:
        return [1.0] * len(norms)
    bound = rule.clip_factor * statistics.median(norms)
    return [bound / n if n > bound else 1.0 for n in norms]


def capped_weights(samples: Sequence[int], rule: AggregationRule) -> list[float]:
    """Per device, ``min(n_k, weight_cap x median(n))`` (``n_k`` when ``weight_cap`` is 0)."""
    if not rule.weight_cap or not samples:
        return [float(n) for n in samples]
    cap = rule.weight_cap * statistics.median(samples)
    return [float(min(n, cap)) for n in samples]


def trim_counts(covering: torch.Tensor, trim: float) -> torch.Tensor:
    """How many values to drop from each end, per coordinate covered by ``covering`` devices:
    ``floor(trim x m)``, at least 1 when ``trim > 0`` and ``m >= 3``."""
    t = torch.floor(covering.double() * trim).long()
    if trim > 0:
        t = torch.where(covering >= 3, t.clamp_min(1), t)
    return t


def combine_sorted(values: torch.Tensor, weights: torch.Tensor, rule: str, trim: float) -> torch.Tensor:
    """Per column of ``values`` ``[K, N]`` (NaN: that device does not cover the coordinate), the
    trimmed weighted mean or the median over the covering devices; 0 where none covers.

    ``weights`` ``[K]`` are the devices' weights (positive). Processed in chunks of columns.
    """
    out = torch.zeros(values.shape[1], dtype=torch.float32)
    step = max(1, _CHUNK // max(1, values.shape[0]))
    for start in range(0, values.shape[1], step):
        chunk = values[:, start : start + step]
        ordered, index = torch.sort(chunk, dim=0)  # NaN (not covering) sort last
        covered = ~torch.isnan(ordered)
        m = covered.sum(0)
        ordered = torch.nan_to_num(ordered, nan=0.0)
        if rule == "median":
            lo = ((m - 1).clamp_min(0) // 2).unsqueeze(0)
            hi = (m // 2).unsqueeze(0)
            mid = (ordered.gather(0, lo) + ordered.gather(0, hi)).squeeze(0) / 2
            out[start : start + chunk.shape[1]] = torch.where(m > 0, mid, 0.0)
        else:
            t = trim_counts(m, trim)
            rank = torch.arange(values.shape[0]).unsqueeze(1)
            keep = covered & (rank >= t) & (rank < m - t)
            w = weights[index] * keep
            total = w.sum(0)
            mean = (w * ordered).sum(0) / total.clamp_min(1e-30)
            out[start : start + chunk.shape[1]] = torch.where(total > 0, mean, 0.0)
    return out
