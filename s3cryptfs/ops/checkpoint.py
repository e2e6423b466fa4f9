"""Where an interrupted rewrap may resume: the last key before which everything is done.

Keys are listed in order and finished out of order (parallel workers); the checkpoint only moves
past a key once it and every key before it finished successfully, so a key that was skipped or
failed is visited again by the next run. The file holds the target (provider, version) too: a
checkpoint made for another active key is ignored. It holds object keys, nothing secret.

It is written every SAVE_EVERY keys or SAVE_INTERVAL seconds, whichever comes first, and when
the walk ends for any reason; ``interruptible`` turns SIGTERM and SIGINT into an exception so
that "any reason" includes ``systemctl stop``, ``kill`` and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

SAVE_EVERY = 100
SAVE_INTERVAL = 2.0  # seconds: a slow walk loses at most this much work to a crash


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: unwinds the walk, so that its checkpoint is saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Interrupted in the main thread. SIGTERM's
    default action ends the process at once, without the ``finally`` that saves the checkpoint.
    The previous handlers are back before the block's exception reaches the caller, so a second
    signal during the final save acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Checkpoint:
    def __init__(self, path: str, target: tuple[str, int]) -> None:
        self.path = path
        self.target = [target[0], target[1]]
        self._lock = threading.Lock()
        self._order: OrderedDict[str, bool | None] = OrderedDict()  # key -> ok, None: running
        self._frozen = False  # a key failed: the frontier stays before it
        self.after: str | None = None
        self._moves = 0
        self._saved_at = time.monotonic()

    def load(self) -> str | None:
        """The key to resume after, when the file is for the same target."""
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        if doc.get("target") != self.target or not isinstance(doc.get("after"), str):
            return None
        self.after = doc["after"]
        return self.after

    def submitted(self, key: str) -> None:
        with self._lock:
            self._order[key] = None

    def finished(self, key: str, ok: bool) -> None:
        with self._lock:
            self._order[key] = ok
            while self._order and not self._frozen:
                first, state = next(iter(self._order.items()))
                if state is None:
                    break
                if state is False:
                    self._frozen = True
                    break
                self._order.popitem(last=False)
                self.after = first
                self._moves += 1
            due = time.monotonic() - self._saved_at >= SAVE_INTERVAL
            if self._moves >= SAVE_EVERY or (self._moves and due):
                self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        self._moves = 0
        self._saved_at = time.monotonic()
        if self.after is None:
            return
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"target": self.target, "after": self.after}, f)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
