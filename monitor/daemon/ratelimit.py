"""A warning for a recurring problem, at most once per interval per key (no paho, no torch:
sources and sinks of every kind share it)."""

from __future__ import annotations

import time


class RateLimitedWarning:
    """Warn about a recurring problem at most once per `every_s` per key, with the count."""

    def __init__(self, log, every_s: float = 10.0):
        self._log = log
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, event: str, key: str, **fields) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        self._log.warning(event, suppressed=self._suppressed.pop(key, 0), **fields)
