"""Reconnection delays: exponential backoff with jitter, capped, and a bound on the whole wait."""

from __future__ import annotations

import random
from dataclasses import dataclass

from edge_sdk._errors import ConfigError

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delay before reconnection attempt ``n`` (0-based): ``min(max_s, initial_s * factor**n)``, of which
    a random fraction up to ``jitter`` is taken off (so devices that lost the same coordinator do not
    all come back at the same instant). ``give_up_s``: stop after this long without a working session.
    """

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    jitter: float = 0.5
    give_up_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ConfigError(f"backoff: need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        if self.factor < 1:
            raise ConfigError(f"backoff: factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"backoff: jitter must be in [0, 1), got {self.jitter}")
        if not self.give_up_s > 0:
            raise ConfigError(f"backoff: give_up_s must be positive, got {self.give_up_s}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt``; always in ``[(1 - jitter) * d, d]``, d <= max_s."""
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        draw = (rng or random).random()
        return base * (1.0 - self.jitter * draw)
