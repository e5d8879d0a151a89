"""Is Redis answering? A breaker that keeps requests off Redis while it is down.

The first failed call marks Redis down; from then on requests do not touch Redis at all (they
answer from the cache and default rows, so no request waits for a socket timeout), and only the
background watcher keeps trying. Its first successful call marks Redis up again.
"""

from __future__ import annotations

import threading
import time


class RedisHealth:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_error = ""
        self.errors = 0

    @property
    def up(self) -> bool:
        return self._down_since is None

    def failed(self, error: BaseException | str) -> None:
        with self._lock:
            self.errors += 1
            self._last_error = str(error)
            if self._down_since is None:
                self._down_since = time.time()

    def succeeded(self) -> None:
        with self._lock:
            self._down_since = None

    def describe(self) -> dict:
        with self._lock:
            if self._down_since is None:
                return {"redis": "up", "redis_errors": self.errors}
            return {
                "redis": "down",
                "down_for_s": round(time.time() - self._down_since, 3),
                "last_error": self._last_error,
                "redis_errors": self.errors,
            }
