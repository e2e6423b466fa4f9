"""What the key managers were asked and how long they took, for status and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class CallStats:
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0


class KmsCalls:
    """Per (provider, operation): calls, failed calls, total seconds. Thread-safe: wraps and
    unwraps run on worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], CallStats] = {}

    def timed(self, provider: str, operation: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        ok = False
        try:
            result = fn()
            ok = True
            return result
        finally:
            took = time.monotonic() - start
            with self._lock:
                stats = self._stats.setdefault((provider, operation), CallStats())
                stats.calls += 1
                stats.seconds += took
                if not ok:
                    stats.errors += 1

    def snapshot(self) -> dict[tuple[str, str], CallStats]:
        with self._lock:
            return {k: CallStats(v.calls, v.errors, v.seconds) for k, v in self._stats.items()}
