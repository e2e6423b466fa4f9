"""Group commit: the journal's slot writes are flushed together, not one by one at each close.

A small version is committed by writing its slot (slots.py) and nothing more: once that write
returned, the version is in the operating system's page cache, which a crash of the mount
process (kill -9, an out-of-memory kill) does not touch, and the next mount's recovery finds
it. What a write alone does not survive is a power loss or a kernel crash: for those, this
module flushes the pool file once for every write made since the last flush, at most
COMMIT_INTERVAL seconds after the first of them, as a local file system commits its journal
every few seconds. A write torn by a power loss fails its slot's digest and is ignored: it
never comes back half written.

What needs more than that waits for a flush itself (sync()): fsync() and --sync-close (which
then wait for S3 as well), the unmount, and an earlier state that may only go once its
replacement is durable (after_durable: the old slot of a rewritten record, the record of a
version a newer one replaced). Those actions run in the order they were asked for, so a slot
freed after an upload never disappears from the disk before an older one that waited.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# Seconds from a close until its version is flushed to the disk (at the latest, plus the
# flush itself). Half a second keeps what a power loss can take small, and still gathers
# hundreds of closes of small files into one flush.
COMMIT_INTERVAL = 0.5


class GroupCommit:
    """Counts the journal writes made and the ones flushed; flushes them in groups.

    wrote() and after_durable() are called from worker threads and the trio thread alike;
    flush() blocks (a worker thread, or outside the event loop); sync() and run() are trio's.
    """

    def __init__(self, flush: Callable[[], None], interval: float = COMMIT_INTERVAL) -> None:
        self._flush = flush
        self.interval = interval
        self._lock = threading.Lock()  # the counters and the deferred actions
        self._flush_lock = threading.Lock()  # one flush at a time
        self.written = 0  # writes made so far (each gets the next number)
        self.durable = 0  # every write up to this number is flushed
        self._deferred: list[tuple[int, Callable[[], None]]] = []
        self.flushes = 0
        self._flushing: trio.Event | None = None

    @property
    def pending(self) -> bool:
        """Whether a write or a deferred action waits for a flush."""
        with self._lock:
            return self.durable < self.written or bool(self._deferred)

    def wrote(self) -> int:
        """A write was made, not flushed: returns its number."""
        with self._lock:
            self.written += 1
            return self.written

    def after_durable(self, action: Callable[[], None]) -> None:
        """Run *action* once every write made so far is flushed, and after every action asked
        for before it: now, when nothing waits."""
        with self._lock:
            if self.durable < self.written or self._deferred:
                self._deferred.append((self.written, action))
                return
        action()

    def in_order(self, action: Callable[[], None]) -> None:
        """Run *action* now, or, when actions wait for a flush, after them (it needs no flush
        itself: an uploaded version's slot is freed after that of an older one it replaced)."""
        with self._lock:
            if self._deferred:
                self._deferred.append((self.written, action))
                return
        action()

    def flush(self) -> None:
        """Blocking: flush every write made so far, then run the actions that waited for it."""
        with self._flush_lock:
            with self._lock:
                target = self.written
                needed = self.durable < target
            if needed:
                self._flush()
                self.flushes += 1
            with self._lock:
                self.durable = max(self.durable, target)
                ready = [a for n, a in self._deferred if n <= self.durable]
                self._deferred = [(n, a) for n, a in self._deferred if n > self.durable]
            for action in ready:
                action()

    def _owed(self, target: int) -> bool:
        with self._lock:
            return self.durable < target or any(n <= target for n, _ in self._deferred)

    async def sync(self) -> None:
        """Until every write made before this call is flushed (and the actions that waited
        for them ran). Callers at the same time share a flush: one that comes while a flush
        runs waits for it, then flushes only if its own write came too late for that one."""
        target = self.written
        while self._owed(target):
            flushing = self._flushing
            if flushing is not None:
                await flushing.wait()
                continue
            self._flushing = done = trio.Event()
            try:
                await trio.to_thread.run_sync(self.flush)
            finally:
                self._flushing = None
                done.set()

    async def run(self) -> None:
        """Flush what was written, COMMIT_INTERVAL after it was (a loop that never ends)."""
        while True:
            await trio.sleep(self.interval)
            if self.pending:
                try:
                    await self.sync()
                except OSError as exc:
                    # The next round tries again; what was written stays in the page cache
                    # meanwhile (a crash of the mount process loses nothing).
                    log.error("journal: flushing to the disk failed (retrying): %s", exc)
