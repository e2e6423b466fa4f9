"""Files being written: from the first write until the version is in S3.

Each file with local content has one FileWrite (state.py): its write-back file, streamed
upload, sealed local version, and the state of its write-back file. WritePath drives them: it
seals a closed file into the journal (or keeps it as closed when it cannot: closed.py),
submits it to the uploader, retries what could not be sealed, and drains everything before an
unmount. It knows nothing of names, listings or FUSE: the filesystem
core hands it files (anything shaped like ``Written``) and learns of finished uploads through
the callbacks it gives at construction.

Lock order (outermost first): a file's ``lock`` (a trio lock: commit, uncut, materialize),
then its stream's thread lock (stream.py, taken in worker threads). Never the other way: a
worker thread holding the stream lock never waits for trio.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from s3cryptfs.cache.reader import Reader, Version
from s3cryptfs.codec import ObjectCodec, SealedObject
from s3cryptfs.errors import IntegrityError, S3CryptFSError
from s3cryptfs.format import metadata as md
from s3cryptfs.store.base import ObjectStore
from s3cryptfs.store.helper import UploadHelper
from s3cryptfs.upload import closed as closed_files
from s3cryptfs.upload.journal import ABSENT, CHAIN, FOLLOW, Base, Entry, Journal
from s3cryptfs.upload.keep import KeptClosed
from s3cryptfs.upload.landing import Landing
from s3cryptfs.upload.state import (
    NameChanges,
    Staged,
    Staging,
    Written,
    posix_attrs,
)
from s3cryptfs.upload.stream import Stream, part_plain_size
from s3cryptfs.upload.uploader import Uploader

log = logging.getLogger(__name__)
T = TypeVar("T")

INLINE_WRITE = 256 * 1024
# (sequence number, sealed version, body path, offset of the body in it) -> its journal entry
NewEntry = Callable[[int, SealedObject, str, int], Entry]
SLOT_PLAIN = 64 * 1024  # versions up to this size are committed into a journal slot


Settled = Callable[[Any, Entry], Awaitable[None]]


@dataclass
class WriteSettings:
    prefix: str
    cache_dir: str  # the journal and the write-back files go under it
    journal_limit: int
    upload_concurrency: int = 16
    upload_delay: float = 0.0  # seconds a new version waits before its upload starts
    stream_uploads: bool = True
    upload_helper: bool = True  # upload journal bodies from a helper process (store/helper.py)
    read_only: bool = False

    @property
    def staging_dir(self) -> str:
        return os.path.join(self.cache_dir, "staging")


@dataclass
class WriteCallbacks:
    """How the write path tells the filesystem core about files (the core owns names)."""

    find: Callable[[str], Any]  # object key -> the file now at that name, or None
    uploaded: Settled  # a version reached S3 (before the write path lets go of it)
    conflicted: Settled  # a version lost to another writer (saved as a conflict copy)
    # the extended attributes a new version of the file carries (read from its current
    # version when not known yet: may HEAD, may call a KMS)
    xattrs: Callable[[Any], Awaitable[dict[bytes, bytes]]] | None = None
    # attributes changed while a seal had taken them already: store them (True: the
    # extended attributes too) in the version just queued, or the object
    attrs_moved: Callable[[Any, bool], Awaitable[None]] | None = None


class WritePath(KeptClosed, Landing):
    def __init__(
        self,
        store: ObjectStore,
        codec: ObjectCodec,
        reader: Reader,
        limiter: trio.CapacityLimiter,
        settings: WriteSettings,
        callbacks: WriteCallbacks,
    ) -> None:
        self.store = store
        self.codec = codec
        self.reader = reader
        self.limiter = limiter
        self.settings = settings
        self.callbacks = callbacks
        os.makedirs(settings.staging_dir, mode=0o700, exist_ok=True)
        os.chmod(settings.staging_dir, 0o700)
        self.journal = Journal(os.path.join(settings.cache_dir, "journal"))
        concurrency = settings.upload_concurrency
        self.helper = UploadHelper(store, concurrency + 4) if settings.upload_helper else None
        self.uploader = Uploader(
            store,
            self.journal,
            trio.CapacityLimiter(max(2, concurrency)),
            concurrency=concurrency,
            large_size=store.settings.multipart_threshold,
            on_uploaded=self._uploaded,
            on_conflict=self._conflicted,
            helper=self.helper,
        )
        self.streams: set[Stream] = set()
        self.stream_limiter = trio.CapacityLimiter(store.settings.part_concurrency)
        self.closed_pending: dict[Any, str] = {}  # file -> why it is kept as closed
        self.names = NameChanges()
        self.unrecorded: set[Any] = set()  # of those, the ones whose record is not written
        self._closed_kick = trio.Event()
        self._closed_at_start: list[tuple[str, closed_files.ClosedRecord]] = []
        self.nursery: trio.Nursery | None = None
        self.counters: Counter[str] = Counter()

    def key(self, f: Written) -> str:
        return self.settings.prefix + f.path

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        return result

    # --- lifecycle -------------------------------------------------------------------------

    def sort_leftovers(self) -> list[tuple[str, closed_files.ClosedRecord]]:
        """Sort what an earlier mount left in the write-back area: files it had closed (a
        marker says so) are returned, for the core to adopt; files that were still open were
        never acknowledged, and go."""
        closed, never_closed = closed_files.scan(self.settings.staging_dir)
        for path in never_closed:
            log.warning(
                "discarding the write-back file %s of %s, which was still open when the mount "
                "stopped (never closed, so never acknowledged): it stays as it was last closed "
                "or fsync'ed",
                os.path.basename(path),
                closed_files.tagged_path(path) or "a file it does not name",
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return closed

    def adopt(self, f: Written, path: str) -> None:
        """Give *f* the write-back file an earlier mount kept as closed (after a crash)."""
        fd = os.open(path, os.O_RDWR)
        f.w.attach(Staging(path, fd), dirty=True)
        f.w._to(Staged.CLOSED)
        f.w.why = "closed before the mount stopped"
        f.size = os.fstat(fd).st_size
        self.closed_pending[f] = f.w.why

    async def recover(self, adopted: list[Any], entries: list[Entry]) -> int:
        """Upload what the journal held and seal the adopted files (before the mount serves
        anything). Returns how many versions are in S3 now."""
        for entry in entries:
            self.uploader.submit(entry)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.uploader.run)
            for f in adopted:
                await self.seal_closed(f)
            await self.uploader.drain()
            nursery.cancel_scope.cancel()
        return len(entries) + len(adopted) - len(self.closed_pending)

    async def run(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        nursery.start_soon(self.uploader.run)
        nursery.start_soon(self._retry_closed)
        nursery.start_soon(self._refill_keys)
        nursery.start_soon(self._empty_trash)
        if self.helper is not None:
            nursery.start_soon(self.helper.run)

    async def _empty_trash(self) -> None:
        """Delete uploaded bodies a little after they were moved to the journal's trash (and
        what a previous mount left there); what is left at unmount goes in the background."""
        while True:
            self.uploader.trashed = trio.Event()
            await trio.to_thread.run_sync(self.journal.empty_trash)
            await self.uploader.trashed.wait()
            await trio.sleep(2.0)  # after a burst: the unmount may come first

    async def _refill_keys(self) -> None:
        """Keep the pool of wrapped data keys full (keys/pool.py), so closing a file needs no
        key manager round trip. Failures are the key manager's outages: the codec's breaker
        spaces the attempts out, and closes fall back to wrapping (or keeping) as before."""
        pool = self.codec.pool
        if pool is None or self.settings.read_only:
            return
        while True:
            if pool.wanted():
                try:
                    await trio.to_thread.run_sync(self.codec.refill_pool, limiter=self.limiter)
                except S3CryptFSError as exc:
                    log.debug("wrapped key pool not refilled: %s", exc)
            await trio.sleep(0.5)

    async def commit_all(self, files: list[Any]) -> None:
        """Seal every file with unsealed changes (before unmounting) and flush the journal. One
        that cannot be sealed now is kept as closed (listed by not_in_s3), never dropped."""
        for f in files:
            if f.w.unsealed and not f.unlinked:
                await self.seal_closed(f)
        await self.journal.commits.sync()

    async def drain(
        self, files: Callable[[], list[Any]], stall: float | None = None
    ) -> list[tuple[str, str, str]]:
        """Seal every file with unsealed changes and wait until every version is in S3. With
        *stall*, give up once that many seconds passed without any progress. Returns what is
        not in S3 yet (see not_in_s3): empty when everything is."""
        quiet_since = time.monotonic()
        committed = -math.inf
        self.uploader.hurry()  # until the drain ends (an unmount may still be refused)
        try:
            while True:
                before = (self.uploader.uploaded_count, len(self.closed_pending))
                # Every file is looked at once a second, and before the drain may end: not
                # at each upload's end (thousands of them, each a look at every file).
                idle = not self.uploader.pending and not self.closed_pending
                if idle or time.monotonic() - committed >= 1.0:
                    await self.commit_all(files())
                    committed = time.monotonic()
                    if not self.uploader.pending and not self.closed_pending:
                        break
                if stall is not None and time.monotonic() - quiet_since >= stall:
                    return self.not_in_s3()
                with trio.move_on_after(1.0 if stall is None else min(1.0, stall)):
                    await self.uploader.progress.wait()
                after = (self.uploader.uploaded_count, len(self.closed_pending))
                if after[0] > before[0] or after[1] < before[1]:
                    quiet_since = time.monotonic()
        finally:
            self.uploader.hurry(False)
        for stream in list(self.streams):
            await stream.finished.wait()  # dropped ones abort their multipart uploads
        return []

    # --- the write-back file -------------------------------------------------------------

    def new_staging(self, name: str) -> Staging:
        """A write-back file for the file at *name* in the volume."""
        seq = self.journal.next_seq()
        path = os.path.join(self.settings.staging_dir, f"{seq:012d}.plain")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        closed_files.tag(fd, name)
        return Staging(path, fd)

    async def materialize(self, f: Written, version: Version | None) -> Staging:
        """Give *f* a write-back file holding its current content: *version* (the newest one
        in S3, or None for no content), unless it has a sealed local version."""
        w = f.w
        if w.staging is not None:
            return w.staging
        staging = self.new_staging(f.path)
        if w.local_version is not None:
            version = w.local_version
        try:
            if version is not None:
                offset = 0
                step = 8 * 1024 * 1024
                while True:
                    data = await self.reader.read(version, offset, step)
                    if not data:
                        break
                    await self._thread(os.pwrite, staging.fd, data, offset)
                    offset += len(data)
        except BaseException:
            staging.close()
            raise
        w.attach(staging, dirty=False)
        return staging

    async def write(self, f: Written, offset: int, data: bytes) -> int:
        w = f.w
        staging = w.staging
        assert staging is not None  # the core materializes first
        self.counters["write_calls"] += 1
        self.counters["write_bytes"] += len(data)
        if w.stream is not None and offset < w.stream.frozen:
            await self.drop_stream(f, "a write behind the sealed part")
        if offset < staging.cut:
            async with f.lock:
                await self.uncut(f)
        old_size = f.size
        stream = w.stream
        if stream is not None:
            await stream.make_room(offset, len(data))
        if stream is not None and stream.absorb(offset, data):
            written = len(data)  # held by the stream until sealed (stream.py)
        else:
            if stream is not None and stream.holding():
                stream.stop_absorbing()
                await self._thread(stream.spill)
            written = await self._write_staging(staging, offset, data)
        w.dirtied()
        f.size = max(f.size, offset + written)
        if w.stream is not None:
            w.stream.wake()
        elif offset == old_size:
            self._maybe_stream(f)
        return written

    async def _write_staging(self, staging: Staging, offset: int, data: bytes) -> int:
        if len(data) <= INLINE_WRITE:
            # A small write to a local file lands in the page cache in microseconds: cheaper
            # than the hop to a worker thread and back, which dominates small-file copies.
            return os.pwrite(staging.fd, data, offset)
        written: int = await self._thread(os.pwrite, staging.fd, data, offset)
        return written

    async def truncate(self, f: Written, size: int) -> None:
        w = f.w
        staging = w.staging
        assert staging is not None
        if w.stream is not None and size < w.stream.frozen:
            await self.drop_stream(f, "truncated")
        # Dirty before the first await: without a writer, a clean write-back file is released
        # when the previous version's upload lands, and this truncate would go to a closed fd
        # (EBADF) or be lost, never committed.
        w.dirtied()
        if staging.cut:
            async with f.lock:
                await self.uncut(f)
        await self._thread(os.ftruncate, staging.fd, size)
        f.size = size

    async def read(self, f: Written, offset: int, size: int) -> bytes:
        """Read a file that has a write-back file, some of which may be cut out."""
        w = f.w
        staging = w.staging
        assert staging is not None
        stream = w.stream
        cut, cut_read = staging.cut, staging.cut_read
        with staging.reading():
            if stream is not None:  # under its lock: the next part may be cut meanwhile
                data: bytes = await self._thread(stream.read_through, offset, size)
                return data
            if offset >= cut or cut_read is None:
                data = await self._thread(os.pread, staging.fd, size, offset)
                return data
            low = await cut_read(offset, min(size, cut - offset))
            if offset + size <= cut:
                return low
            high = await self._thread(os.pread, staging.fd, offset + size - cut, cut)
            return low + high

    async def uncut(self, f: Written) -> None:
        """Put the plaintext a streamed commit cut out back into the write-back file, before
        anything writes, truncates or seals it. The caller holds f.lock."""
        staging = f.w.staging
        if staging is None or not staging.cut or staging.cut_read is None:
            return
        cut, step, offset = staging.cut, 8 * 1024 * 1024, 0
        while offset < cut:
            data = await staging.cut_read(offset, min(step, cut - offset))
            if not data:
                raise IntegrityError(f"{self.key(f)}: committed version ends early")
            await self._thread(os.pwrite, staging.fd, data, offset)
            offset += len(data)
        staging.cut, staging.cut_read = 0, None

    def release_if_idle(self, f: Written) -> None:
        """Close the write-back file of a file nobody writes whose content is sealed."""
        # Not while f.lock is held: a commit in progress reads the write-back file.
        w = f.w
        if (
            w.staging is not None
            and w.state is Staged.CLEAN
            and f.writers == 0
            and not f.lock.locked()
            and not w.keep
        ):
            w.detach()

    def discard(self, f: Written) -> None:
        """The file is gone (unlinked and closed): its write-back file goes too."""
        f.w.detach()
        self.closed_pending.pop(f, None)

    # --- streamed uploads ------------------------------------------------------------------

    def _maybe_stream(self, f: Written) -> None:
        """A file that grows by appending past one part starts its upload (stream.py)."""
        w = f.w
        staging = w.staging
        if (
            not self.settings.stream_uploads
            or not w.stream_ok
            or self.nursery is None
            or staging is None
            or staging.cut  # a stream seals the file from its start
            or f.unlinked
            or self.codec.writes_gateway
            or f.size <= part_plain_size(self.codec.chunk_size, self.store.settings.part_size)
        ):
            return
        seq = self.journal.next_seq()
        stream = Stream(
            key=self.key(f),
            seq=seq,
            body_path=self.journal.body_path(seq),
            staging_fd=staging.fd,
            written=lambda: f.size,
            codec=self.codec,
            store=self.store,
            attrs=posix_attrs(f),
            xattrs=dict(f.xattrs or {}),
            part_size=self.store.settings.part_size,
            concurrency=self.store.settings.part_concurrency,
            limiter=self.stream_limiter,
        )
        w.stream = stream
        self.streams.add(stream)
        self.counters["streams"] += 1

        async def run() -> None:
            try:
                with self.codec.fence():  # its key: until its commit queues the upload
                    await stream.run()
            finally:
                self.streams.discard(stream)

        self.nursery.start_soon(run)

    async def drop_stream(self, f: Written, why: str) -> None:
        """Abandon the file's stream; returns once its write-back file is whole again."""
        w = f.w
        stream = w.stream
        if stream is not None:
            stream.drop(why)
            await stream.give_back()  # until then, reads go through the stream
            if w.stream is stream:
                w.stream = None
            w.stream_ok = False

    # --- sealing -------------------------------------------------------------------------

    def base(self, f: Written) -> Base:
        # A version that lost and is settling (saved_as set) is no base: its lineage follows
        # it through w.diverted, and a new open starts from what the name holds.
        if any(e.saved_as is None for e in self.uploader.pending_for(self.key(f))):
            return CHAIN
        diverted = f.w.diverted
        if diverted is not None and diverted.saved_as:
            return (FOLLOW, diverted.saved_as)
        etag = f.remote_etag
        if etag is not None:
            return ("etag", etag)
        return ABSENT

    async def commit(self, f: Written) -> Entry | None:
        """Seal the file's write-back file into the journal and queue the upload."""
        await self.names.wait(f)
        with self.codec.fence():  # its key is in no hold until the upload is queued
            entry, moved = await self._commit(f)
        if moved is not None and self.callbacks.attrs_moved is not None:
            # A chmod or setxattr meanwhile left its change to this commit (Xattrs.persist),
            # which had taken the attributes before it sealed.
            try:
                await self.callbacks.attrs_moved(f, moved)
            except S3CryptFSError as exc:
                key = self.key(f)
                log.error("%s: attributes changed during its close not stored: %s", key, exc)
        return entry

    async def _commit(self, f: Written) -> tuple[Entry | None, bool | None]:
        """The version queued, and whether the attributes (True: also the extended ones)
        changed while it sealed (None: they did not)."""
        async with f.lock:
            w = f.w
            staging = w.staging
            if staging is None or not w.unsealed or f.unlinked:
                return w.local, None
            stream = w.stream
            await self.uploader.wait_for_space(self.settings.journal_limit)
            xattrs = await self.callbacks.xattrs(f) if self.callbacks.xattrs is not None else {}
            attrs = posix_attrs(f)
            # w.stream stays set while the stream stops: a write behind its frozen part
            # meanwhile drops it (and gets the cut plaintext back) as at any other time.
            if stream is not None and (w.stream is not stream or not await stream.stop()):
                stream.drop("not usable")  # its own task cleans up the upload
                await stream.give_back()
                stream = None
            w.stream = None
            w.stream_ok = True
            if stream is not None and stream.released:
                staging.cut = stream.released

                async def read_sealed(offset: int, size: int, stream: Stream = stream) -> bytes:
                    data: bytes = await self._thread(stream.read_sealed, offset, size)
                    return data

                staging.cut_read = read_sealed
            elif stream is None:
                await self.uncut(f)  # sealing reads all of it
            # Writes made while this seals (by other handles) make the file dirty again.
            writes = w.writes
            key = self.key(f)
            base = self.base(f)
            pending = self.uploader.pending_for(key) if base == CHAIN else []
            after = pending[-1] if pending else None
            staging_name = os.path.basename(staging.path) if w.state is Staged.CLOSED else None

            def new_entry(seq: int, sealed: SealedObject, path: str, offset: int) -> Entry:
                return Entry(
                    seq=seq,
                    key=key,
                    body_path=path,
                    metadata=sealed.metadata,
                    base=base,
                    after=after,
                    plain_size=sealed.plain_size,
                    body_size=sealed.body_size,
                    stream=stream,
                    body_offset=offset,
                    staging_name=staging_name,
                )

            slot = None
            try:
                if stream is not None:
                    self.counters["stream_bytes_sent_before_close"] += stream.sent_bytes
                    self.counters["stream_bytes_absorbed"] += stream.absorbed
                    sealed, entry = await self._thread(
                        self._commit_streamed, stream, f.size, attrs, xattrs, new_entry
                    )
                else:
                    seq = self.journal.next_seq()
                    slot = self.journal.slots.take() if f.size <= SLOT_PLAIN else None
                    if slot is None:
                        if f.size <= SLOT_PLAIN:
                            self.counters["small_closes_past_a_full_slot_pool"] += 1
                        await self._thread(self.journal.check_room, self.codec.body_size(f.size))
                    now = None
                    if slot is not None:
                        now = self._seal_now(staging, seq, slot, attrs, xattrs, key, new_entry)
                    if now is None:
                        sealed, entry = await self._thread(
                            self._commit_sealed, staging, seq, slot, attrs, xattrs, key, new_entry
                        )
                    else:
                        sealed, entry, body = now
                        self.counters["seals_on_event_loop"] += 1
                        if not self.journal.write_slot(entry, body):  # its record is too long
                            await self._thread(self._commit_files, entry, body)
                    if slot is not None and entry.slot is None:  # committed as files
                        self.journal.slots.give_back(slot)
            except BaseException:
                if stream is not None:
                    stream.drop("sealing failed")
                    with trio.CancelScope(shield=True):
                        await self._abandon(stream, staging)
                if slot is not None:
                    self.journal.slots.give_back(slot)
                raise
            if w.state is Staged.CLOSED:
                # The journal holds it now (its record names this file, should we stop here),
                # once flushed: the marker may only go after that.
                await self.journal.commits.sync()
                await self._thread(closed_files.remove, staging.path)
            self.unrecorded.discard(f)
            if self.closed_pending.pop(f, None) is not None:  # kept, recorded or not
                w.why = None
                log.info("%s: sealed for upload after all", key)
            w._to(Staged.CLEAN if w.writes == writes else Staged.DIRTY)
            self._install(f, entry, sealed)
            # Streamed: mostly in S3 already, and a wait could only have it resent whole.
            delay = 0.0 if entry.stream is not None else self.settings.upload_delay
            self.uploader.submit(entry, delay)
            xattrs_moved = f.xattrs is not None and f.xattrs != xattrs
            if xattrs_moved or posix_attrs(f) != attrs:
                return entry, xattrs_moved
            return entry, None

    def _install(self, f: Written, entry: Entry, sealed: SealedObject) -> None:
        """*entry* is the newest version of *f*: readers read it from the journal."""
        w = f.w
        staging = w.staging
        assert staging is not None
        key = entry.key

        def fetch_local(start: int, end: int) -> bytes:
            while not entry.released:
                moves = entry.moves
                try:
                    with open(entry.body_path, "rb") as fh:
                        data = os.pread(fh.fileno(), end - start + 1, entry.body_offset + start)
                except FileNotFoundError:
                    if not entry.released and entry.moves == moves:
                        raise
                    continue
                if entry.moves == moves and not entry.released:
                    return data
            # Uploaded and dropped from the journal while a reader still held this version:
            # the same bytes are in S3 now (and they authenticate under our key), under the
            # key it was uploaded to (a rename may have moved it since it was installed).
            return self.store.get(entry.key, start, end)

        if w.local_version is not None:
            self.reader.forget(w.local_version)
        w.local = entry
        w.local_version = Version(
            vid=("j", entry.seq),
            name=key,
            plain_size=sealed.plain_size,
            body_size=sealed.body_size,
            fetch=fetch_local,
            make_cipher=lambda header: sealed.cipher,
            cipher=sealed.cipher,
            header_len=sealed.cipher.header_len,
        )
        if staging.cut:
            # The body moves on (uploaded, then dropped from the journal): read what was
            # cut from the committed version, which falls back to S3.
            version = w.local_version

            async def read_committed(offset: int, size: int) -> bytes:
                return await self.reader.read(version, offset, size)

            staging.cut_read = read_committed

    async def _abandon(self, stream: Stream, staging: Staging) -> None:
        """A streamed commit failed: the write-back file gets its plaintext back and stays
        dirty (the next commit seals it whole); the stream's upload and body go."""
        try:
            await stream.give_back()
        except Exception as exc:  # noqa: BLE001 - the body still holds it: reads go there
            log.error("%s: cannot restore its write-back file yet: %s", stream.key, exc)
            return
        staging.cut, staging.cut_read = 0, None
        await stream.discard()

    def _seal_now(
        self,
        staging: Staging,
        seq: int,
        slot: int,
        attrs: md.PosixAttrs,
        xattrs: dict[bytes, bytes],
        key: str,
        new_entry: NewEntry,
    ) -> tuple[SealedObject, Entry, bytes] | None:
        """Seal a small version for its journal slot on the event loop, when nothing in that
        can wait on a server (codec.seal_small_now): reading it, encrypting it and writing the
        slot into the page cache take tens of microseconds, and the trip to a worker thread
        and back that it replaces took several times that, which a `cp -r` of small files
        waits for at each close. None: not possible now (nothing taken)."""
        data = os.pread(staging.fd, SLOT_PLAIN + 1, 0)
        if len(data) > SLOT_PLAIN:
            return None
        done = self.codec.seal_small_now(data, attrs, key, xattrs)
        if done is None:
            return None
        sealed, body = done
        pool = self.journal.slots
        entry = new_entry(seq, sealed, pool.path, pool.offset(slot))
        entry.slot = slot
        return sealed, entry, body

    def _commit_files(self, entry: Entry, body: bytes) -> None:
        """Commit a sealed small version as a body file and its record (blocking): its record
        did not fit a slot."""
        entry.body_path, entry.body_offset = self.journal.body_path(entry.seq), 0
        try:
            with open(entry.body_path, "wb") as fh:
                fh.write(body)
            self.journal.write_record(entry)
        except BaseException:
            with contextlib.suppress(OSError):  # (a full disk: the room it took)
                os.unlink(entry.body_path)
            raise

    def _commit_sealed(
        self,
        staging: Staging,
        seq: int,
        slot: int | None,
        attrs: md.PosixAttrs,
        xattrs: dict[bytes, bytes],
        key: str,
        new_entry: NewEntry,
    ) -> tuple[SealedObject, Entry]:
        """Seal the write-back file and commit it to the journal, in one trip to a worker
        thread: into a slot (one flush) when it is small, else as a body file and record."""
        with os.fdopen(os.dup(staging.fd), "rb") as src:
            src.seek(0)
            if slot is not None:
                out = io.BytesIO()
                sealed = self.codec.seal_stream(src, out, attrs, key, xattrs)
                body = out.getvalue()
                pool = self.journal.slots
                entry = new_entry(seq, sealed, pool.path, pool.offset(slot))
                entry.slot = slot
                if not self.journal.write_slot(entry, body):
                    self._commit_files(entry, body)
                return sealed, entry
            try:
                with self.journal.open_body(seq) as dst:
                    sealed = self.codec.seal_stream(src, dst, attrs, key, xattrs)
            except BaseException:
                # A part-written body (a full disk) would keep the room it took.
                with contextlib.suppress(OSError):
                    os.unlink(self.journal.body_path(seq))
                raise
            entry = new_entry(seq, sealed, self.journal.body_path(seq), 0)
        self.journal.write_record(entry)
        return sealed, entry

    def _commit_streamed(
        self,
        stream: Stream,
        size: int,
        attrs: md.PosixAttrs,
        xattrs: dict[bytes, bytes],
        new_entry: Any,
    ) -> tuple[SealedObject, Entry]:
        sealed = self._seal_streamed(stream, size, attrs, xattrs)
        entry = new_entry(stream.seq, sealed, stream.body_path, 0)
        self.journal.write_record(entry)
        return sealed, entry

    def _seal_streamed(
        self, stream: Stream, size: int, attrs: md.PosixAttrs, xattrs: dict[bytes, bytes]
    ) -> SealedObject:
        """Finish a streamed body. Mode, owner or extended attributes changed since it
        began: the metadata is the current one, and the uploader sends the body whole
        instead."""
        try:
            plain_size, body_size = stream.seal_rest(size)
        finally:
            stream.close_body()
        assert stream.metadata is not None and stream.cipher is not None
        metadata = dict(stream.metadata)
        if (attrs.mode, attrs.uid, attrs.gid) != (
            stream.attrs.mode,
            stream.attrs.uid,
            stream.attrs.gid,
        ):
            metadata.update(attrs.encode())
        if xattrs != stream.xattrs:
            metadata = self.codec.seal_xattrs(metadata, xattrs, stream.key)
        return SealedObject(metadata, plain_size, body_size, stream.cipher)
