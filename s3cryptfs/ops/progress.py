"""Progress of the commands that walk a whole volume (rewrap, migrate, fsck).

`--progress` chooses how it is shown: `bar` (tqdm: count, rate, ETA), `plain` (a line every
PLAIN_EVERY seconds, for logs and journald), `none`; `auto`, the default, is a bar on a
terminal and nothing otherwise, so that scripts and cron mail only get the report. The total,
which the ETA needs, is counted by a LIST pass of its own in the background (one request per
thousand objects) while the work goes on: the walk itself streams keys and never holds them
all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "plain", "none")
PLAIN_EVERY = 10.0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(
        self,
        what: str,
        mode: str = "auto",
        stream: TextIO | None = None,
        describe: Callable[[], str] | None = None,
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if stream.isatty() else "none"
        self.mode = mode
        self.what = what
        self.stream = stream
        self.describe = describe
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self._said_at = self.started
        self._lock = threading.Lock()
        self._bar: tqdm[Any] | None = None
        if mode == "bar":
            self._bar = tqdm(
                desc=what, unit=" objects", file=stream, dynamic_ncols=True, leave=False
            )

    @property
    def shown(self) -> bool:
        return self.mode != "none"

    def count_in_background(self, count: Callable[[], int]) -> None:
        """Learn the total from *count* (blocking: a LIST pass) on a thread of its own; a
        failure only leaves the total unknown (the work reports its own errors)."""
        if not self.shown:
            return

        def run() -> None:
            try:
                total = count()
            except Exception:  # noqa: BLE001 - no total, no ETA: the walk goes on regardless
                return
            with self._lock:
                self.total = max(total, self.done)
                if self._bar is not None:
                    self._bar.total = self.total
                    self._bar.refresh()

        threading.Thread(target=run, name="progress-count", daemon=True).start()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                if self.describe is not None:
                    self._bar.set_postfix_str(self.describe(), refresh=False)
                self._bar.update(n)
            elif self.mode == "plain":
                now = time.monotonic()
                if now - self._said_at >= PLAIN_EVERY:
                    self._said_at = now
                    self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        total = self.total
        of = f" of {total}" if total is not None else ""
        eta = ""
        if total is not None and rate > 0:
            eta = f", about {_duration(max(total - self.done, 0) / rate)} left"
        more = f"; {self.describe()}" if self.describe is not None else ""
        self.stream.write(
            f"{self.what}: {self.done}{of} objects, {rate:.1f}/s, {_duration(elapsed)} so far"
            f"{eta}{more}\n"
        )
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif self.mode == "plain" and self.done:
                self._line(time.monotonic())
