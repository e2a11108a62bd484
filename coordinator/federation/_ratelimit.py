"""Rate-limited logging: what a device (or any peer) sends can cause only so many log lines and bytes.

A :class:`LogLimiter` keeps a token bucket per key (a device's name, a peer's address): a key may log
``burst`` lines at once, then ``rate`` lines a second. Lines beyond that are counted, not written;
the next line the key may write is preceded by one warning ``"<key>: K log lines suppressed (more
than R a second)"``, and :meth:`settle` writes that warning when the key's peer is gone (a flood
that ends over the rate is still reported). A flood of N messages thus writes at most
``burst + 2 * rate * seconds + 1`` lines.
Text that comes from a peer goes through :func:`clip` (at most ``TEXT_LIMIT`` characters, control
characters and unencodable surrogates escaped), so each line is bounded too. At most ``max_keys``
keys are tracked (the longest idle forgotten first), so the limiter's own memory is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["TEXT_LIMIT", "LogLimiter", "clip"]

TEXT_LIMIT = 200
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


def clip(text: object, limit: int = TEXT_LIMIT) -> str:
    """``text`` for a log line: its first ``limit`` characters (and how many more there were), one line,
    control characters and lone surrogates escaped (``\\x0a``, ``\\udcff``)."""
    value = text if isinstance(text, str) else str(text)
    extra = len(value) - limit
    if extra > 0:
        value = value[:limit]
    value = value.encode("utf-8", "backslashreplace").decode("utf-8").translate(_ESCAPES)
    return f"{value}... ({extra} more characters)" if extra > 0 else value


class _Bucket:
    __slots__ = ("seen", "suppressed", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.seen = now
        self.suppressed = 0


class LogLimiter:
    """Log through ``logger``, at most ``burst`` lines at once and ``rate`` a second per key (thread-safe)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        rate: float = 2.0,
        burst: int = 20,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"LogLimiter: need rate > 0, burst >= 1, max_keys >= 1; got {rate}, {burst}, {max_keys}")
        self.logger = logger
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its rate; True when it was written."""
        return self._log(key, level, msg, args, exc_info=exc_info)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self._log(key, logging.INFO, msg, args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self._log(key, logging.WARNING, msg, args)

    def settle(self, key: str) -> int:
        """Write the count of ``key``'s suppressed lines now (one warning, whatever its rate; call it when
        the key's peer is gone, so a flood that ends while over the rate is still reported); how many."""
        with self._lock:
            bucket = self._buckets.get(key)
            suppressed = bucket.suppressed if bucket is not None else 0
            if bucket is not None:
                bucket.suppressed = 0
        if suppressed:
            self.logger.warning(
                "%s: %d log lines suppressed (more than %g a second)", clip(key), suppressed, self.rate, stacklevel=2
            )
        return suppressed

    def _log(self, key: str, level: int, msg: str, args: tuple[object, ...], *, exc_info: bool = False) -> bool:
        stacklevel = 3  # the caller of log / info / warning
        if not self.logger.isEnabledFor(level):
            return False
        suppressed = self._take(key)
        if suppressed < 0:
            return False
        if suppressed:
            self.logger.warning(
                "%s: %d log lines suppressed (more than %g a second)",
                clip(key),
                suppressed,
                self.rate,
                stacklevel=stacklevel,
            )
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=stacklevel)  # the caller's line
        return True

    def _take(self, key: str) -> int:
        """-1 when ``key`` is over its rate (the line is counted), else the lines suppressed before it."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(key, None)  # re-inserted last: the dict stays in order of use
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    del self._buckets[next(iter(self._buckets))]
                bucket = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.seen) * self.rate)
            bucket.seen = now
            self._buckets[key] = bucket
            if bucket.tokens < 1.0:
                bucket.suppressed += 1
                return -1
            bucket.tokens -= 1.0
            suppressed, bucket.suppressed = bucket.suppressed, 0
            return suppressed
