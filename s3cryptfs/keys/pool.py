"""Data keys wrapped ahead of time, so that sealing a closed file needs no key manager round trip.

A mount keeps a few fresh data keys, each already wrapped by the volume's active key manager
while it answered. Closing a file takes one: no KMS latency at close(), and when the KMS stops
answering, files go on being sealed into the journal (as ciphertext, with a valid envelope) until
the pool is empty. Each key is used once. The pool is emptied whenever the descriptor changes
(a rotation, a migration: new files must take the new key), and keys older than MAX_AGE are
dropped, so a key version retired on the key server alone is not used for long.
Pure and blocking; the refill runs in a worker thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable

from s3cryptfs.keys.base import KeyEnvelope

DEK_LEN = 32
DEFAULT_SIZE = 32
MAX_AGE = 600.0


class KeyPool:
    def __init__(self, size: int = DEFAULT_SIZE, max_age: float = MAX_AGE) -> None:
        self.size = size
        self.max_age = max_age
        self._lock = threading.Lock()
        self._keys: deque[tuple[float, int, bytes, KeyEnvelope]] = deque()
        self._epoch = 0  # raised by clear(): keys wrapped before it are not added

    def take(self) -> tuple[bytes, KeyEnvelope] | None:
        now = time.monotonic()
        with self._lock:
            while self._keys:
                made, _, dek, envelope = self._keys.popleft()
                if now - made <= self.max_age:
                    return dek, envelope
        return None

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
            self._epoch += 1

    def wanted(self) -> int:
        with self._lock:
            return max(0, self.size - len(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def versions(self) -> set[tuple[str, int]]:
        """(provider, key version) of the keys it holds that take() may still hand out: the
        aged ones go here too, or an idle mount would name a version its key server rotated
        away from for as long as it runs (and a retire of it would wait for that mount)."""
        now = time.monotonic()
        with self._lock:
            while self._keys and now - self._keys[0][0] > self.max_age:
                self._keys.popleft()
            return {(e.provider, e.key_version) for _, _, _, e in self._keys}

    def refill(self, wrap: Callable[[bytes], KeyEnvelope]) -> int:
        """Wrap fresh keys until the pool is full (blocking). A failure of the key manager
        propagates; the keys made before it stay. Returns how many were added."""
        with self._lock:
            epoch = self._epoch
        added = 0
        while self.wanted():
            dek = os.urandom(DEK_LEN)
            envelope = wrap(dek)
            with self._lock:
                if self._epoch != epoch:
                    return added  # cleared meanwhile: this key may be under the old version
                self._keys.append((time.monotonic(), epoch, dek, envelope))
            added += 1
        return added
