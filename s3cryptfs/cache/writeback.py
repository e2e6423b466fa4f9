"""Write-back: a crash-safe local journal of encrypted file versions, and the uploader.

A version enters the journal when a file is closed (or fsync'ed): its encrypted body is written
and fsync'ed first, then a small JSON record is written and renamed into place. Only a renamed
record counts; after a crash, the next mount uploads every record it finds, in order, before it
serves anything. Bodies are ciphertext, so the journal never holds plaintext.

Uploads replace objects with conditional writes (If-Match on the ETag the version was based on,
If-None-Match for new files), so a concurrent change by another client is detected. The losing
version is stored next to the original as ``<name>.conflict-<time>``, never dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from s3cryptfs.asyncutil import run_abandonable
from s3cryptfs.cache.slots import SlotPool, SlotRecord
from s3cryptfs.errors import ObjectNotFound, PreconditionFailed, StoreError, UploadConflict
from s3cryptfs.store.helper import HelperUnavailable, UploadHelper
from s3cryptfs.store.s3 import S3Store

log = logging.getLogger(__name__)

# base of a version: the ETag it replaces, "absent" (a new file), or "chain" (the previous
# journal entry of the same key, whose ETag is only known once it is uploaded)
Base = tuple[str, str]
ABSENT: Base = ("absent", "")
CHAIN: Base = ("chain", "")


@dataclass(eq=False)
class Entry:
    seq: int
    key: str
    body_path: str
    metadata: dict[str, str]
    base: Base
    plain_size: int
    body_size: int
    state: str = "queued"  # queued | uploading | done | conflict
    etag: str | None = None
    error: BaseException | None = None
    superseded_by: Entry | None = None
    attempts: int = 0
    not_before: float = 0.0
    changed: trio.Event = field(default_factory=trio.Event)
    # A multipart upload of this body begun while the file was written (cache/stream.py);
    # in memory only. After a crash only its id is known (stale_upload), and it is aborted.
    stream: Any = None
    stale_upload: str | None = None
    # Small versions live in a slot of the pool file (cache/slots.py); the body starts at
    # body_offset of body_path. moves counts relocations (a reader that raced one reads
    # again); released: the journal no longer holds the body (it is in S3).
    slot: int | None = None
    generation: int = 0
    body_offset: int = 0
    moves: int = 0
    released: bool = False
    # The write-back file this version was sealed from, when it had been kept as closed
    # (vfs/closed.py): after a crash, its marker is stale once this record exists.
    staging_name: str | None = None

    def record(self) -> dict[str, Any]:
        rec = {
            "seq": self.seq,
            "key": self.key,
            "metadata": self.metadata,
            "base": list(self.base),
            "plain_size": self.plain_size,
            "body_size": self.body_size,
        }
        upload_id = self.stream.upload_id if self.stream is not None else self.stale_upload
        if upload_id:
            rec["upload_id"] = upload_id
        if self.staging_name:
            rec["staging"] = self.staging_name
        return rec

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def replace_location(entry: Entry, path: str, offset: int) -> None:
    entry.body_path = path
    entry.body_offset = offset


class Journal:
    """The on-disk part. Directory mode 0700, files 0600."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self._seq = 0
        for name in os.listdir(directory):
            stem = name.split(".", 1)[0]
            if stem.isdigit():
                self._seq = max(self._seq, int(stem))
        # Bodies of uploaded versions are moved here and deleted later: deleting a large
        # file is slow on some file systems (0.7 s per GiB on ext4 mounted with `discard`),
        # and nobody should wait for it (an fsync, the unmount).
        self.trash = directory.rstrip("/") + ".trash"
        os.makedirs(self.trash, mode=0o700, exist_ok=True)
        self.slots = SlotPool(directory.rstrip("/") + ".slots")
        self._slot_records = self.slots.scan()
        for rec in self._slot_records:
            self._seq = max(self._seq, rec.seq)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def body_path(self, seq: int) -> str:
        return os.path.join(self.dir, f"{seq:012d}.body")

    def record_path(self, seq: int) -> str:
        return os.path.join(self.dir, f"{seq:012d}.json")

    def open_body(self, seq: int) -> Any:
        fd = os.open(self.body_path(seq), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        return os.fdopen(fd, "w+b")

    def write_record(self, entry: Entry) -> None:
        """Make *entry* durable (blocking). The body must already be complete."""
        with open(entry.body_path, "rb+") as f:
            os.fsync(f.fileno())
        final = self.record_path(entry.seq)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entry.record(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # --- small versions: slots --------------------------------------------------------------

    def write_slot(self, entry: Entry, body: bytes) -> bool:
        """Commit *entry* (its slot taken, body_offset set) with one flush. False (slot given
        back) if it does not fit: commit it as files instead."""
        assert entry.slot is not None
        record = json.dumps(entry.record()).encode()
        if len(body) + len(record) > self.slots.capacity:
            self.slots.give_back(entry.slot)
            entry.slot = None
            return False
        self.slots.write(entry.slot, entry.seq, entry.generation, body, record)
        return True

    def rewrite(self, entry: Entry) -> None:
        """Make a changed record durable (blocking). A version in a slot moves to another slot
        (or to files): its old place is freed only once the new one is durable."""
        if entry.slot is None:
            self.write_record(entry)
            return
        old = entry.slot
        body = os.pread(self.slots.fd, entry.body_size, self.slots.offset(old))
        entry.generation += 1
        record = json.dumps(entry.record()).encode()
        new = self.slots.take()
        if new is not None and len(body) + len(record) <= self.slots.capacity:
            self.slots.write(new, entry.seq, entry.generation, body, record)
            entry.slot = new
            replace_location(entry, self.slots.path, self.slots.offset(new))
            self._moved(entry, old)
            return
        if new is not None:
            self.slots.give_back(new)
        path = self.body_path(entry.seq)  # no room in the slots: a pair of files
        with open(path, "wb") as f:
            f.write(body)
        entry.slot = None
        replace_location(entry, path, 0)
        self.write_record(entry)
        self._moved(entry, old)

    def _moved(self, entry: Entry, old_slot: int) -> None:
        entry.moves += 1
        self.slots.clear(old_slot)

    def remove(self, entry: Entry) -> None:
        """Drop *entry* from the journal: the record goes now, the body to the trash."""
        entry.released = True
        if entry.slot is not None:
            self.slots.clear(entry.slot)  # a slot entry has no files (rewrite moves it whole)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path(entry.seq))
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry.body_path, os.path.join(self.trash, os.path.basename(entry.body_path)))

    def trash_paths(self) -> list[str]:
        return [os.path.join(self.trash, name) for name in os.listdir(self.trash)]

    def empty_trash(self) -> None:
        for path in self.trash_paths():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def load(self) -> list[Entry]:
        """Committed entries, oldest first. Leftovers without a record are deleted."""
        entries: list[Entry] = []
        recorded: set[int] = set()
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".json"):
                with open(path) as f:
                    rec = json.load(f)
                seq = int(rec["seq"])
                recorded.add(seq)
                entries.append(
                    Entry(
                        seq=seq,
                        key=rec["key"],
                        body_path=self.body_path(seq),
                        metadata=dict(rec["metadata"]),
                        base=(rec["base"][0], rec["base"][1]),
                        plain_size=int(rec["plain_size"]),
                        body_size=int(rec["body_size"]),
                        stale_upload=rec.get("upload_id"),
                        staging_name=rec.get("staging"),
                    )
                )
        for name in os.listdir(self.dir):
            stem = name.split(".", 1)[0]
            if stem.isdigit() and int(stem) not in recorded:
                log.info("journal: removing uncommitted leftover %s", name)
                os.unlink(os.path.join(self.dir, name))
        newest: dict[int, SlotRecord] = {}
        for rec in self._slot_records:
            other = newest.get(rec.seq)
            if other is not None and other.generation > rec.generation:
                self.slots.clear(rec.slot)  # moved by a rewrite that completed
                continue
            if other is not None:
                self.slots.clear(other.slot)
            newest[rec.seq] = rec
        self._slot_records = []
        for rec in newest.values():
            if rec.seq in recorded:  # rewritten into files after it was in a slot
                self.slots.clear(rec.slot)
                continue
            r = rec.record
            entries.append(
                Entry(
                    seq=rec.seq,
                    key=r["key"],
                    body_path=self.slots.path,
                    metadata=dict(r["metadata"]),
                    base=(r["base"][0], r["base"][1]),
                    plain_size=int(r["plain_size"]),
                    body_size=int(r["body_size"]),
                    slot=rec.slot,
                    generation=rec.generation,
                    body_offset=self.slots.offset(rec.slot),
                    staging_name=r.get("staging"),
                )
            )
        entries.sort(key=lambda e: e.seq)
        return entries

    def pending_bytes(self) -> int:
        total = self.slots.used_bytes()
        for name in os.listdir(self.dir):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(self.dir, name)).st_size
        return total


Uploaded = Callable[[Entry], Awaitable[None]]


class Uploader:
    """Uploads journal entries in the background: in parallel, in order per key, with retries."""

    def __init__(
        self,
        store: S3Store,
        journal: Journal,
        limiter: trio.CapacityLimiter,
        concurrency: int = 16,
        large_concurrency: int = 3,
        large_size: int = 32 * 1024 * 1024,
        on_uploaded: Uploaded | None = None,
        on_conflict: Uploaded | None = None,
    ) -> None:
        self.store = store
        self.journal = journal
        self.limiter = limiter
        # Small files are bound by round trips: many in flight. Large ones send their parts in
        # parallel themselves: a few at a time, so memory and connections stay bounded.
        self.concurrency = concurrency
        self.large_concurrency = large_concurrency
        self.large_size = large_size
        self.on_uploaded = on_uploaded
        self.on_conflict = on_conflict
        self.helper: UploadHelper | None = None  # set by the mount: uploads off the FUSE loop
        self.queue: list[Entry] = []
        self.in_flight: dict[str, Entry] = {}
        self.last_etag: dict[str, str] = {}
        self._wakeup = trio.Event()
        self.uploaded_count = 0
        self.failed_attempts = 0
        self.queued_bytes = 0
        self._space = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.trashed = trio.Event()  # a body went to the journal's trash
        self.progress = trio.Event()  # set whenever a version reaches S3 (or its conflict copy)

    # --- submitting ---------------------------------------------------------------------

    def submit(self, entry: Entry) -> None:
        for older in self.queue:
            if older.key == entry.key and older.state == "queued":
                # Coalesce: the older version never needs to reach S3.
                self.queue.remove(older)
                self.queued_bytes -= older.body_size
                if entry.base == CHAIN:
                    entry.base = older.base
                    self._rewrite(entry)
                older.superseded_by = entry
                self._discard_stream(older)
                self.journal.remove(older)
                older._notify()
                break
        self.queue.append(entry)
        self.queued_bytes += entry.body_size
        self._kick()

    def _rewrite(self, entry: Entry) -> None:
        self.journal.rewrite(entry)

    def _discard_stream(self, entry: Entry) -> None:
        """The streamed multipart upload of *entry* will never be completed: abort it."""
        stream, entry.stream = entry.stream, None
        if stream is not None and self._nursery is not None:
            self._nursery.start_soon(stream.abort)

    def update_metadata(self, key: str, metadata: dict[str, str]) -> bool:
        """Change the metadata of a queued version of *key*; False if none is queued."""
        for entry in reversed(self.queue):
            if entry.key == key and entry.state == "queued":
                entry.metadata = dict(metadata)
                self._rewrite(entry)
                return True
        return False

    def _kick(self) -> None:
        self._wakeup.set()

    def pending_for(self, key: str) -> list[Entry]:
        found = [e for e in self.queue if e.key == key]
        if key in self.in_flight:
            found.insert(0, self.in_flight[key])
        return found

    def pending_under(self, prefix: str) -> list[Entry]:
        found = [e for e in self.queue if e.key.startswith(prefix)]
        found += [e for k, e in self.in_flight.items() if k.startswith(prefix)]
        return found

    def cancel(self, key: str) -> None:
        """Drop queued versions of *key* (it is being deleted). In-flight ones must be awaited."""
        for entry in [e for e in self.queue if e.key == key]:
            self.queue.remove(entry)
            self.queued_bytes -= entry.body_size
            self._discard_stream(entry)
            self.journal.remove(entry)
            entry.state = "done"
            entry._notify()

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.in_flight)

    # --- waiting ------------------------------------------------------------------------

    async def wait(self, entry: Entry, raise_errors: bool = True) -> None:
        """Until *entry* (or a newer version that replaced it) is in S3.

        Raises the error of a failed attempt (the entry stays queued and is retried)."""
        while True:
            while entry.superseded_by is not None:
                entry = entry.superseded_by
            if entry.state == "done":
                return
            if entry.state == "conflict":
                if raise_errors:
                    raise UploadConflict(str(entry.error))
                return
            seen_attempts = entry.attempts
            await entry.changed.wait()
            failed = entry.error is not None and entry.attempts > seen_attempts
            if raise_errors and failed and entry.state != "done":
                err = entry.error
                if isinstance(err, UploadConflict):
                    raise err
                raise StoreError(f"upload of {entry.key} failed (will retry): {err}")

    async def wait_all(self, entries: list[Entry]) -> None:
        for entry in entries:
            await self.wait(entry, raise_errors=False)

    async def drain(self) -> None:
        """Until nothing is queued or in flight (retrying forever)."""
        while self.pending:
            entries = list(self.in_flight.values()) + list(self.queue)
            await self.wait_all(entries)

    def waiting(self) -> list[Entry]:
        """Every version not in S3 yet, in flight first."""
        return list(self.in_flight.values()) + list(self.queue)

    async def wait_for_space(self, limit: int) -> None:
        """Backpressure: wait while the journal holds more than *limit* bytes."""
        while self.queued_bytes > limit and self.pending:
            event = self._space
            await event.wait()

    # --- the workers ----------------------------------------------------------------------

    def _next(self) -> Entry | None:
        now = time.monotonic()
        large = sum(1 for e in self.in_flight.values() if e.body_size >= self.large_size)
        for entry in self.queue:
            if entry.key in self.in_flight or entry.not_before > now:
                continue
            if entry.body_size >= self.large_size and large >= self.large_concurrency:
                continue
            if entry.base == CHAIN and entry.key not in self.last_etag:
                # the previous version of this key must land first; if none exists any more
                # (crash recovery), it was coalesced and this one is based on nothing known
                if not any(e.key == entry.key and e.seq < entry.seq for e in self.queue):
                    entry.base = ("unknown", "")
                else:
                    continue
            return entry
        return None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                entry = self._next() if len(self.in_flight) < self.concurrency else None
                if entry is None:
                    self._wakeup = trio.Event()
                    with trio.move_on_after(0.5):
                        await self._wakeup.wait()
                    continue
                self.queue.remove(entry)
                self.in_flight[entry.key] = entry
                entry.state = "uploading"
                nursery.start_soon(self._upload, entry)

    def _conditions(self, entry: Entry) -> tuple[str | None, bool]:
        kind, value = entry.base
        if kind == "etag":
            return value, False
        if kind == "absent":
            return None, True
        if kind == "chain":
            return self.last_etag[entry.key], False
        return None, False  # unknown base (recovery): plain overwrite

    async def _upload(self, entry: Entry) -> None:
        entry.attempts += 1
        try:
            if_match, if_none_match = self._conditions(entry)
            etag = await self._send(entry, if_match, if_none_match)
        except (PreconditionFailed, ObjectNotFound):
            landed = await self._landed(entry)
            if landed is None:
                await self._divert(entry)
                return
            etag = landed
        except Exception as exc:  # noqa: BLE001 - any failure: keep the data, retry later
            self.failed_attempts += 1
            entry.error = exc
            entry.state = "queued"
            delay = min(60.0, 2.0 ** min(entry.attempts, 6))
            entry.not_before = time.monotonic() + delay
            log.error(
                "upload of %s failed (attempt %d, retrying in %.0fs; the data is kept): %s",
                entry.key,
                entry.attempts,
                delay,
                exc,
            )
            del self.in_flight[entry.key]
            self.queue.insert(0, entry)
            entry._notify()
            self._kick()
            return
        entry.etag = etag
        self.last_etag[entry.key] = etag
        if self.on_uploaded is not None:
            await self.on_uploaded(entry)
        await self._finish(entry, "done")

    async def _send(self, entry: Entry, if_match: str | None, if_none_match: bool) -> str:
        if entry.stale_upload:
            # begun by a mount that crashed before completing it
            await run_abandonable(self.store.abort_multipart, entry.key, entry.stale_upload)
            entry.stale_upload = None
        stream, entry.stream = entry.stream, None  # one try; a retry uploads the body whole
        if stream is not None:
            if stream.usable_for(entry.metadata):
                etag: str = await stream.complete(
                    entry.body_path, entry.body_size, if_match, if_none_match
                )
                return etag
            await stream.abort()  # the metadata changed after close: the upload has the old
        return await self._upload_body(entry, entry.key, if_match, if_none_match)

    async def _upload_body(
        self, entry: Entry, key: str, if_match: str | None, if_none_match: bool
    ) -> str:
        # Only queued entries are rewritten (moved), never one being uploaded: the body stays
        # where it is while the helper or a thread reads it.
        args = (key, entry.body_path, entry.metadata, if_match, if_none_match)
        sizes = {"offset": entry.body_offset, "size": entry.body_size}
        if self.helper is not None:
            try:
                etag: str = await self.helper.call("upload_file", *args, **sizes)
                return etag
            except HelperUnavailable:
                pass

        def upload() -> str:
            return self.store.upload_file(*args, **sizes)

        # A stop does not wait for a PUT that hangs: the journal keeps the entry either way,
        # and a retry recognises its own earlier write (_landed).
        return await run_abandonable(upload, limiter=self.limiter)

    async def _landed(self, entry: Entry) -> str | None:
        """After a refused conditional write: is the object there our own version anyway?

        A PUT whose reply was lost (timeout) may have been applied; its retry then fails the
        precondition against our own write. The wrapped data key is unique per version."""
        try:
            head = await run_abandonable(self.store.head, entry.key, limiter=self.limiter)
        except StoreError:
            return None
        mine = entry.metadata.get("encryption-wrapped-key")
        if mine and head.metadata and head.metadata.get("encryption-wrapped-key") == mine:
            log.info("%s: an earlier attempt of this upload had already succeeded", entry.key)
            return head.etag
        return None

    async def _divert(self, entry: Entry) -> None:
        """Someone else changed the object: store our version beside it, never over it."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        conflict_key = f"{entry.key}.conflict-{stamp}-{entry.seq}"
        try:
            await self._upload_body(entry, conflict_key, None, True)
        except Exception as exc:  # noqa: BLE001 - keep it queued, try again later
            entry.error = exc
            entry.state = "queued"
            entry.not_before = time.monotonic() + 10
            log.error("conflict copy of %s could not be stored yet: %s", entry.key, exc)
            del self.in_flight[entry.key]
            self.queue.insert(0, entry)
            entry._notify()
            return
        log.error(
            "upload conflict: %s was changed by another writer; this mount's version was saved "
            "as %s",
            entry.key,
            conflict_key,
        )
        entry.error = UploadConflict(
            f"{entry.key} was changed by another writer; your version was saved as {conflict_key}"
        )
        self.last_etag.pop(entry.key, None)
        await self._finish(entry, "conflict")
        if self.on_conflict is not None:
            await self.on_conflict(entry)

    async def _finish(self, entry: Entry, state: str) -> None:
        if entry.slot is not None:
            self.journal.remove(entry)  # an 8-byte write: cheaper than a trip to a thread
        else:
            await trio.to_thread.run_sync(self.journal.remove, entry)
            self.trashed.set()
        entry.state = state
        self.in_flight.pop(entry.key, None)
        self.queued_bytes -= entry.body_size
        self.uploaded_count += 1
        if not any(e.key == entry.key for e in self.queue):
            # nothing chains on this key any more
            self.last_etag.pop(entry.key, None)
        entry._notify()
        self._space.set()
        self._space = trio.Event()
        self.progress.set()
        self.progress = trio.Event()
        self._kick()
