"""Unwrapped data keys kept in memory for a while, so reading a file twice calls no KMS twice.

Keyed by (provider, key id, key version, SHA-256 of the wrapped bytes): an envelope that changes
in any way is a miss. Bounded in entries and in age; never written anywhere.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

from s3cryptfs.keys.base import KeyEnvelope

CacheKey = tuple[str, str, int, bytes]


def cache_key(envelope: KeyEnvelope) -> CacheKey:
    digest = hashlib.sha256(envelope.ciphertext).digest()
    return (envelope.provider, envelope.key_id, envelope.key_version, digest)


class DekCache:
    def __init__(self, max_entries: int = 4096, ttl: float = 300.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, tuple[float, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> bytes | None:
        if self.max_entries <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] < now:
                if found is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[1]

    def holds(self, key: CacheKey) -> bool:
        """Whether get() would find *key* now (counted neither as a hit nor as a miss)."""
        with self._lock:
            found = self._entries.get(key)
        return found is not None and found[0] >= time.monotonic()

    def put(self, key: CacheKey, dek: bytes) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._entries[key] = (time.monotonic() + self.ttl, dek)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget_provider(self, provider: str, version: int | None = None) -> None:
        """Drop what a provider (or one of its versions) unwrapped, e.g. after a retire."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == provider and version in (None, k[2])]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
