"""Asking the kernel to drop names (--max-inodes) without spoiling the attributes it caches.

Recent Linux kernels give a new inode the attributes of a LOOKUP or READDIRPLUS reply only
if no inode was evicted while that request was in flight (an eviction racing the reply might
have made them stale); otherwise they ask for them again with a GETATTR at the next stat.
Each invalidated name evicts an inode. Sent one by one from pyfuse3's invalidation thread,
which needs the interpreter lock between names and gets it only at the main loop's switch
interval, a sweep's evictions trickle out over seconds and overlap every listing reply
meanwhile: a walk with `ls -lR` past the bound paid one GETATTR per file.

So a sweep's names go out together: once no request that makes inodes is in flight, from a
thread of our own while the main loop waits for it (bounded by STALL), which makes the
evictions one short burst that at most the next request overlaps.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import pyfuse3
import trio

log = logging.getLogger(__name__)

# How long a sweep waits for a pause in the requests that make inodes before it goes anyway
# (a busy mount must still keep its bound), and how long the main loop waits for the names
# to be sent. An invalidation waits for requests in flight on its directory, which this loop
# answers, so it must never wait for it unbounded; the thread goes on after it.
QUIET_WAIT = 0.2
QUIET = 0.002  # no such request for this long: the names go
STALL = 0.5

Names = list[tuple[int, bytes]]  # (parent inode, name as the kernel spells it)


class EntryDropper:
    """*take*: the names to drop now, asked for when they go out (a file looked up again
    since its sweep chose it is not among them any more)."""

    def __init__(self, take: Callable[[], Names]) -> None:
        self._take = take
        self._in_flight = 0
        self._begun = 0  # requests begun, to see one that came during a pause
        self._quiet = trio.Event()
        self._due = trio.Event()
        self._started = False
        self._jobs: queue.SimpleQueue[tuple[Names, threading.Event]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.sent = 0  # names handed to the thread
        self.stalls = 0  # batches the loop stopped waiting for (STALL)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around a request whose reply makes inodes (lookup, readdir, create, ...)."""
        self._in_flight += 1
        self._begun += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._quiet.set()

    def wake(self, nursery: trio.Nursery | None) -> None:
        """A sweep chose names: send them once the replies in flight are out."""
        if not self._started:
            if nursery is None:  # (not serving yet)
                return
            self._started = True
            nursery.start_soon(self._run)
        self._due.set()

    async def _run(self) -> None:
        while True:
            await self._due.wait()
            self._due = trio.Event()
            with trio.move_on_after(QUIET_WAIT):
                while True:
                    while self._in_flight:
                        self._quiet = trio.Event()
                        await self._quiet.wait()
                    # A request the kernel made already may not have been read yet: it
                    # would be read during this pause.
                    started = self._begun
                    await trio.sleep(QUIET)
                    if not self._in_flight and self._begun == started:
                        break
            names = self._take()
            if names:
                self._send(names)

    def _send(self, names: Names) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="s3cryptfs-drop", daemon=True)
            self._thread.start()
        done = threading.Event()
        self._jobs.put((names, done))
        self.sent += len(names)
        # Blocking on purpose: the loop lets go of the interpreter lock and takes no new
        # request, so the names go out in one burst instead of one per switch interval.
        if not done.wait(STALL):
            self.stalls += 1

    def _work(self) -> None:
        while True:
            names, done = self._jobs.get()
            for parent, name in names:
                try:
                    pyfuse3.invalidate_entry(parent, name)
                except FileNotFoundError:
                    pass  # the kernel had dropped it already
                except OSError as exc:
                    log.warning("could not ask the kernel to drop an entry: %s", exc)
            done.set()
