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

Before the loop stops serving (pyfuse3.terminate), `stop` ends this: an invalidation sent
after that could wait for a request on its directory that nobody reads any more, and neither
the process nor the program waiting on that request would ever finish.
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
STOP_WAIT = 5.0  # at stop, for a batch under way (the loop still answers meanwhile)

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
        self._jobs: queue.SimpleQueue[tuple[Names, threading.Event] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._batch: threading.Event | None = None  # set once the last batch handed over is out
        self._closed = False
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
        if self._closed:
            return
        if not self._started:
            if nursery is None:  # (not serving yet)
                return
            self._started = True
            nursery.start_soon(self._run)
        self._due.set()

    async def stop(self, wait: float = STOP_WAIT) -> None:
        """Before the loop stops serving: no name goes out after this, and a batch under way
        gets *wait* seconds to finish while the loop still answers what it waits for."""
        self.close()
        if self._batch is not None:
            await trio.to_thread.run_sync(self._batch.wait, wait)

    def close(self) -> None:
        """No name goes out after this; the thread ends after the name it is sending."""
        if self._closed:
            return
        self._closed = True
        self._due.set()
        if self._thread is not None:
            self._jobs.put(None)

    async def _run(self) -> None:
        while not self._closed:
            await self._due.wait()
            self._due = trio.Event()
            if self._closed:
                return
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
            if names and not self._closed:
                self._send(names)

    def _send(self, names: Names) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="s3cryptfs-drop", daemon=True)
            self._thread.start()
        done = self._batch = threading.Event()
        self._jobs.put((names, done))
        self.sent += len(names)
        # Blocking on purpose: the loop lets go of the interpreter lock and takes no new
        # request, so the names go out in one burst instead of one per switch interval.
        if not done.wait(STALL):
            self.stalls += 1

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            names, done = job
            try:
                for parent, name in names:
                    if self._closed:
                        break
                    try:
                        pyfuse3.invalidate_entry(parent, name)
                    except FileNotFoundError:
                        pass  # the kernel had dropped it already
                    except Exception as exc:  # noqa: BLE001 - the next names still go
                        log.warning("could not ask the kernel to drop an entry: %s", exc)
            finally:
                done.set()
