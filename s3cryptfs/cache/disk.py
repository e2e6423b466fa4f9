"""Optional on-disk cache of ciphertext ranges (``--disk-cache SIZE``), kept across mounts.

It stores the byte ranges the reader fetches from S3, exactly as they came: ciphertext, never
plaintext, so it is no more sensitive than the bucket. Entries are keyed by object key and ETag,
so a changed object never hits an old entry, and the reader authenticates every chunk it
decrypts: a cache file that fails to authenticate is dropped and fetched again from S3 (the
reader calls ``CachedFetch.invalidate``), never served.
The reader asks for ranges aligned to its fetch groups, which makes entries reusable across
opens and restarts. Eviction is least-recently-used by file mtime, down to the byte budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], bytes]


class DiskCache:
    def __init__(self, directory: str, budget: int) -> None:
        self.dir = directory
        self.budget = budget
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self._lock = threading.Lock()
        self.size = 0
        self.hits = 0
        self.misses = 0
        for path, size, _ in self._entries():
            if path.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # a write cut short by a crash
            else:
                self.size += size
        self._evict()

    def _entries(self) -> list[tuple[str, int, float]]:
        found = []
        for sub in os.listdir(self.dir):
            d = os.path.join(self.dir, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                path = os.path.join(d, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(path)
                    found.append((path, st.st_size, st.st_mtime))
        return found

    def _path(self, key: str, etag: str, start: int, end: int) -> str:
        digest = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()[:32]
        return os.path.join(self.dir, digest[:2], f"{digest}-{start}-{end}")

    def get(self, key: str, etag: str, start: int, end: int) -> bytes | None:
        path = self._path(key, etag, start, end)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        if len(data) != end - start + 1:
            self.discard(key, etag, start, end)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # recently used
        with self._lock:
            self.hits += 1
        return data

    def put(self, key: str, etag: str, start: int, end: int, data: bytes) -> None:
        if len(data) > self.budget:
            return
        path = self._path(key, etag, start, end)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full or broken cache disk only costs the cache
            log.warning("disk cache: cannot store a range: %s", exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            return
        with self._lock:
            self.size += len(data)
            over = self.size > self.budget
        if over:
            self._evict()

    def discard(self, key: str, etag: str, start: int, end: int) -> None:
        path = self._path(key, etag, start, end)
        with contextlib.suppress(FileNotFoundError):
            size = os.stat(path).st_size
            os.unlink(path)
            with self._lock:
                self.size -= size

    def _evict(self) -> None:
        with self._lock:
            if self.size <= self.budget:
                return
            entries = sorted(self._entries(), key=lambda e: e[2])
            target = self.budget * 9 // 10  # some headroom, so eviction is not per put
            for path, size, _ in entries:
                if self.size <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    self.size -= size

    def wrap(self, key: str, etag: str, fetch: Fetch) -> CachedFetch:
        """*fetch* with this cache in front of it, for the object version (key, etag)."""
        return CachedFetch(self, key, etag, fetch)


class CachedFetch:
    """A fetch function that reads through the disk cache; the reader may invalidate a range."""

    def __init__(self, cache: DiskCache, key: str, etag: str, fetch: Fetch) -> None:
        self.cache, self.key, self.etag, self.fetch = cache, key, etag, fetch

    def __call__(self, start: int, end: int) -> bytes:
        data = self.cache.get(self.key, self.etag, start, end)
        if data is not None:
            return data
        data = self.fetch(start, end)
        self.cache.put(self.key, self.etag, start, end, data)
        return data

    def invalidate(self, start: int, end: int) -> bool:
        """Drop a cached range that failed to authenticate. True if there was one to drop."""
        if self.cache.get(self.key, self.etag, start, end) is None:
            return False
        log.warning("disk cache: a cached range of %s failed to authenticate; refetching", self.key)
        self.cache.discard(self.key, self.etag, start, end)
        return True
