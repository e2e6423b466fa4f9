"""Where an interrupted rewrap may resume: the last key before which everything is done.

Keys are listed in order and finished out of order (parallel workers); the checkpoint only moves
past a key once it and every key before it finished successfully, so a key that was skipped or
failed is visited again by the next run. The file holds the target (provider, version) too: a
checkpoint made for another active key is ignored. It holds object keys, nothing secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict

SAVE_EVERY = 100


class Checkpoint:
    def __init__(self, path: str, target: tuple[str, int]) -> None:
        self.path = path
        self.target = [target[0], target[1]]
        self._lock = threading.Lock()
        self._order: OrderedDict[str, bool | None] = OrderedDict()  # key -> ok, None: running
        self._frozen = False  # a key failed: the frontier stays before it
        self.after: str | None = None
        self._moves = 0

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
            if self._moves >= SAVE_EVERY:
                self._moves = 0
                self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
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
