"""Local differential privacy on the device: the update clipped and noised before it is sent.

With ``TrainSettings.dp_clip_norm = C`` (``[privacy] mode = "local"`` on the coordinator), the
device's delta -- what it trained minus what it was sent, over every floating-point tensor it
returns -- is clipped to L2 norm C and each coordinate gets Gaussian noise of std z C
(``dp_noise_multiplier = z``)::

    d <- d x min(1, C / ||d||) + N(0, (z C)^2 I)

The noise comes from the OS's entropy, never from the task's seed: the coordinator chose that seed
and could otherwise subtract the noise. The update must be dense: LoRA factors (the delta is their
product B A, which cannot carry per-coordinate noise as factors) and embedding rows (the rows sent
reveal the tokens seen) are refused; the coordinator forbids those levers under local DP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from edge_sdk._errors import ConfigError
from edge_sdk.protocol import TrainSettings

__all__ = ["local_dp", "privatize"]


def privatize(
    trained: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """``trained`` with its delta against ``sent`` clipped to ``clip_norm`` and noised (see above).

    Integer tensors (buffers) are returned as they are; ``rng`` only for tests (default: seeded
    from the OS's entropy).
    """
    factored = sorted(name for name in trained if "@" in name)
    if factored:
        raise ConfigError(
            f"local differential privacy needs dense updates, got {factored[0]} (no LoRA, no embedding rows)"
        )
    floats = [n for n, a in trained.items() if np.issubdtype(a.dtype, np.floating)]
    missing = [n for n in floats if n not in sent]
    if missing:
        raise ConfigError(f"local differential privacy: {missing[0]} was not sent, its delta is unknown")
    deltas = {n: trained[n].astype(np.float64) - sent[n].astype(np.float64) for n in floats}
    norm = math.sqrt(sum(float(np.square(d).sum()) for d in deltas.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    rng = rng if rng is not None else np.random.default_rng()
    std = noise_multiplier * clip_norm
    out = dict(trained)
    for name, delta in deltas.items():
        noisy = scale * delta + (rng.normal(0.0, std, delta.shape) if std > 0 else 0.0)
        out[name] = (sent[name].astype(np.float64) + noisy).astype(trained[name].dtype)
    return out


def local_dp(
    trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], settings: TrainSettings
) -> dict[str, np.ndarray]:
    """What the device sends: ``trained`` privatized if the task's settings ask for local DP."""
    if settings.dp_clip_norm is None:
        return dict(trained)
    return privatize(trained, sent, settings.dp_clip_norm, settings.dp_noise_multiplier)
