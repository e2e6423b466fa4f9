"""The uploader: sends journal entries to S3 in the background, in parallel, in order per key,
with bounded retries.

Uploads replace objects with conditional writes (If-Match on the ETag the version was based on,
If-None-Match for new files), so a concurrent change by another client is detected. The losing
version is stored next to the original as ``<name>.conflict-<time>``, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio

from s3cryptfs import limits
from s3cryptfs.asyncutil import run_abandonable
from s3cryptfs.errors import (
    ObjectNotFound,
    PreconditionFailed,
    S3CryptFSError,
    StoreError,
    UploadConflict,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.store.base import ObjectStore
from s3cryptfs.store.helper import HelperUnavailable, UploadHelper
from s3cryptfs.upload.journal import ABSENT, CHAIN, FOLLOW, Base, Entry, Journal, Upload

log = logging.getLogger(__name__)

Uploaded = Callable[[Entry], Awaitable[None]]
# Seconds before a conflict copy that could not be stored is tried again.
CONFLICT_RETRY = 10.0


def copy_names(key: str, seq: int) -> list[str]:
    """Names for a conflict copy of *key*: KEY.conflict-TIME-N, then with .1, .2... when that
    one is taken. The file's own name is shortened as much as the suffix needs for the copy's
    name to stay within 255 bytes and its key within 1024 (limits.NAME_MAX, KEY_MAX)."""
    suffix = f".conflict-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{seq}"
    name = key.rsplit("/", 1)[-1]
    folder = key[: len(key) - len(name)]
    room = len(suffix) + 2  # and ".N"
    keep = min(limits.NAME_MAX - room, limits.KEY_MAX - room - len(folder.encode()))
    if keep > 0:
        name = name.encode()[:keep].decode(errors="ignore")  # (a character cut is dropped)
    stem = folder + name + suffix
    return [stem] + [f"{stem}.{n}" for n in range(1, 10)]


class Uploader:
    """Uploads journal entries in the background: in parallel, in order per key, with retries."""

    def __init__(
        self,
        store: ObjectStore,
        journal: Journal,
        limiter: trio.CapacityLimiter,
        concurrency: int = 16,
        large_concurrency: int = 3,
        large_size: int = 32 * 1024 * 1024,
        on_uploaded: Uploaded | None = None,
        on_conflict: Uploaded | None = None,
        helper: UploadHelper | None = None,
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
        self.helper = helper  # uploads off the FUSE loop's process (store/helper.py)
        self.queue: list[Entry] = []
        # The queued versions of each key, in queue order (changed with the queue, through
        # _enqueue and _dequeue): what is asked per key at each close and each upload's end
        # without a scan of the whole queue, thousands long under a `cp -r` of small files.
        self._by_key: dict[str, list[Entry]] = {}
        self._soonest = 0.0  # when the first delayed version is due (_next's last full scan)
        self.in_flight: dict[str, Entry] = {}
        self.last_etag: dict[str, str] = {}
        self.diverted: dict[str, str] = {}  # key -> the conflict copy its queued versions follow
        # Versions saved as conflict copies since the mount started, and the latest copies
        # made (`s3cryptfs status` names them).
        self.conflicts = 0
        self.recent_conflicts: list[str] = []
        self._wakeup = trio.Event()
        # When the worker loop, asleep, looks at the queue again by itself (0: it is awake).
        self._sleeps_until = 0.0
        self.uploaded_count = 0
        self.queued_bytes = 0
        self._space = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.trashed = trio.Event()  # a body went to the journal's trash
        self.progress = trio.Event()  # set whenever a version reaches S3 (or its conflict copy)
        self.hurrying = False  # hurry(): no more upload delays

    # --- submitting ---------------------------------------------------------------------

    def submit(self, entry: Entry, delay: float = 0.0) -> None:
        """Queue *entry*, to be sent no sooner than *delay* seconds from now (a new version:
        a rename, chmod or rewrite right after its close then costs no request). A version
        that replaces a queued one keeps that one's time, so a file rewritten without pause
        still goes out."""
        delay = 0.0 if self.hurrying else delay
        entry.not_before = max(entry.not_before, time.monotonic() + delay) if delay else 0.0
        if entry.base == CHAIN and entry.after is None:
            pending = self.pending_for(entry.key)
            entry.after = pending[-1] if pending else None
        for older in self._by_key.get(entry.key, ()):
            if older.state is Upload.QUEUED:
                # Coalesce: the older version never needs to reach S3.
                self._dequeue(older)
                self.queued_bytes -= older.body_size
                if entry.base == CHAIN:
                    entry.base, entry.after = older.base, older.after
                    self._rewrite(entry)
                older.superseded_by = entry
                entry.earlier = self._maybe_sent(older)
                entry.displaced = True
                if delay:
                    entry.not_before = min(entry.not_before, older.not_before)
                self._discard_stream(older)
                self.journal.remove(older, replaced=True)
                older._notify()
                break
        self._enqueue(entry)
        self.queued_bytes += entry.body_size
        if entry.not_before < self._sleeps_until:
            # Not when the worker loop wakes before this one is due anyway: a `cp -r` of
            # thousands of small files would have it scan its whole queue at every close.
            self._kick()

    @staticmethod
    def _maybe_sent(older: Entry) -> list[str] | None:
        """What a version replacing *older* in the queue may find of this mount's own under
        its key: *older* itself if it was ever sent, and what *older* replaced."""
        found = list(older.earlier or [])
        wrapped = older.metadata.get("encryption-wrapped-key")
        if wrapped and (older.attempts or older.recovered):
            found.append(wrapped)
        return found or None

    def _rewrite(self, entry: Entry) -> None:
        self.journal.rewrite(entry)

    def _discard_stream(self, entry: Entry) -> None:
        """The streamed multipart upload of *entry* will never be completed: abort it."""
        stream, entry.stream = entry.stream, None
        if stream is not None and self._nursery is not None:
            self._nursery.start_soon(stream.abort)

    def update_metadata(self, key: str, metadata: dict[str, str]) -> bool:
        """Change the metadata of a queued version of *key*; False if none is queued."""
        for entry in reversed(self._by_key.get(key, ())):
            if entry.state is Upload.QUEUED:
                entry.metadata = dict(metadata)
                self._rewrite(entry)
                return True
        return False

    def movable(self, entry: Entry) -> bool:
        """Whether a rename may move *entry* to another key in the journal instead of waiting
        for its upload and copying it in S3: it is queued and was never tried (an attempt whose
        reply was lost may have stored it under its key), is the only version of its key here,
        is sent whole (no multipart upload begun under its key), and its base is a known state
        of its key: no chain behind another version, no conflict copy followed."""
        return (
            entry.state is Upload.QUEUED
            and entry.attempts == 0
            and entry.superseded_by is None
            and entry.stream is None
            and entry.stale_upload is None
            and entry.base[0] in ("etag", "absent")
            and entry.key not in self.diverted
            and self.pending_for(entry.key) == [entry]
        )

    def hurry(self, on: bool = True) -> None:
        """Send every version without its delay, now and until hurry(False): a drain (an
        unmount, which may yet be refused and leave the mount in use) is under way."""
        self.hurrying = on
        if not on:
            return
        for entry in self.queue:
            if entry.attempts == 0:
                entry.not_before = 0.0
        self._kick()

    def hold(self, entry: Entry) -> None:
        """Keep queued *entry* from being sent until release() (a rename is moving it)."""
        entry.held = True

    def release(self, entry: Entry) -> None:
        entry.held = False
        self._kick()

    def rekey(self, entry: Entry, key: str, base: Base) -> None:
        """Move held *entry* (movable when held) to *key*, based on *base* (what *key* holds
        in S3, or ABSENT): its journal record is rewritten in place (blocking; flushed by the
        group commit), so after a crash it is uploaded under one name or the other, never
        both."""
        assert entry.held and entry.state is Upload.QUEUED, entry.key
        old = self._by_key[entry.key]
        old.remove(entry)
        if not old:
            del self._by_key[entry.key]
        entry.key, entry.base = key, base
        # Its place in the queue stays; among the new key's versions, in queue order.
        self._by_key[key] = [e for e in self.queue if e.key == key]
        self._rewrite(entry)

    def _kick(self) -> None:
        self._wakeup.set()

    def _enqueue(self, entry: Entry, first: bool = False) -> None:
        """Into the queue, at its end (or its head: a retry), and into the index by key."""
        same = self._by_key.setdefault(entry.key, [])
        if first:
            self.queue.insert(0, entry)
            same.insert(0, entry)
        else:
            self.queue.append(entry)
            same.append(entry)

    def _dequeue(self, entry: Entry) -> None:
        self.queue.remove(entry)
        same = self._by_key[entry.key]
        same.remove(entry)
        if not same:
            del self._by_key[entry.key]

    def pending_for(self, key: str) -> list[Entry]:
        found = list(self._by_key.get(key, ()))
        if key in self.in_flight:
            found.insert(0, self.in_flight[key])
        return found

    def pending_under(self, prefix: str) -> list[Entry]:
        found = [e for e in self.queue if e.key.startswith(prefix)]
        found += [e for k, e in self.in_flight.items() if k.startswith(prefix)]
        return found

    def cancel(self, key: str) -> None:
        """Drop queued versions of *key* (it is being deleted). In-flight ones must be awaited."""
        if key in self.in_flight:
            self.in_flight[key].cancelled = True
        for entry in list(self._by_key.get(key, ())):
            copy = self._copy_followed(entry)
            if copy is not None and self._nursery is not None:
                # An earlier version went to this conflict copy and this one would have
                # replaced it there: the file is deleted here now, and the copy holds a state
                # its writer has since overwritten and deleted.
                self._nursery.start_soon(self._delete_copy, copy)
            self._dequeue(entry)
            self.queued_bytes -= entry.body_size
            self._discard_stream(entry)
            self.journal.remove(entry)
            entry.to(Upload.DONE)
            entry._notify()

    def _copy_followed(self, entry: Entry) -> str | None:
        """The conflict copy *entry* would replace, if it follows one."""
        if entry.base[0] == FOLLOW:
            return entry.base[1]
        if entry.base == CHAIN:
            if entry.after is not None:
                return entry.after.saved_as
            return self.diverted.get(entry.key)
        return None

    async def _delete_copy(self, copy: str) -> None:
        try:
            await run_abandonable(self.store.delete, copy, limiter=self.limiter)
            log.info("%s: deleted (its file was deleted by this mount since)", copy)
        except StoreError as exc:
            log.warning("%s: could not delete this superseded conflict copy: %s", copy, exc)

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.in_flight)

    # --- waiting ------------------------------------------------------------------------

    async def wait(self, entry: Entry, raise_errors: bool = True) -> None:
        """Until *entry* (or a newer version that replaced it) is in S3.

        Raises the error of a failed attempt (the entry stays queued and is retried). Its
        journal record is flushed to the disk first (fsync(), --sync-close): when the upload
        fails, the caller is told, and the version is as safe here as a group commit makes it."""
        if entry.state is Upload.QUEUED or entry.state is Upload.UPLOADING:
            await self.journal.commits.sync()
        while True:
            while entry.superseded_by is not None:
                entry = entry.superseded_by
            if entry.state is Upload.DONE:
                return
            if entry.state is Upload.CONFLICT:
                if raise_errors:
                    raise UploadConflict(str(entry.error))
                return
            if entry.state is Upload.QUEUED and entry.attempts == 0 and entry.not_before:
                entry.not_before = 0.0  # somebody waits for it: no delay (retries keep theirs)
                self._kick()
            seen_attempts = entry.attempts
            await entry.changed.wait()
            failed = entry.error is not None and entry.attempts > seen_attempts
            # mypy keeps entry.state narrowed from before the await, during which it changed.
            landed = entry.state is Upload.DONE  # type: ignore[comparison-overlap]
            if raise_errors and failed and not landed:
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
        await self.journal.commits.sync()  # the slots freed after a flush, too

    def waiting(self) -> list[Entry]:
        """Every version not in S3 yet, in flight first."""
        return list(self.in_flight.values()) + list(self.queue)

    def queued_versions(self) -> set[tuple[str, int]]:
        """(provider, key version) of the sealed versions not in S3 yet."""
        out = set()
        for entry in self.waiting():
            with contextlib.suppress(S3CryptFSError):
                envelope = md.decode_envelope(entry.metadata)
                out.add((envelope.provider, envelope.key_version))
        return out

    async def wait_for_space(self, limit: int) -> None:
        """Backpressure: wait while the journal holds more than *limit* bytes."""
        while self.queued_bytes > limit and self.pending:
            event = self._space
            await event.wait()

    # --- the workers ----------------------------------------------------------------------

    def _next(self) -> Entry | None:
        now = time.monotonic()
        large = sum(1 for e in self.in_flight.values() if e.body_size >= self.large_size)
        soonest = math.inf
        for entry in self.queue:
            if entry.not_before > now:
                if not entry.held and entry.not_before < soonest:
                    soonest = entry.not_before
                continue
            if entry.key in self.in_flight or entry.held:
                continue
            if entry.body_size >= self.large_size and large >= self.large_concurrency:
                continue
            if entry.base == CHAIN and not self._ready(entry):
                continue
            if entry.base == CHAIN and entry.key in self.diverted:
                # the previous version lost to another writer: this one follows it
                entry.base = (FOLLOW, self.diverted[entry.key])
                self._rewrite(entry)
            elif entry.base == CHAIN and entry.key not in self.last_etag:
                # the previous version of this key must land first; if none exists any more
                # (crash recovery), it was coalesced and this one is based on nothing known
                if not any(e.seq < entry.seq for e in self._by_key.get(entry.key, ())):
                    entry.base = ("unknown", "")
                else:
                    continue
            return entry
        self._soonest = soonest  # the whole queue was seen: for _idle_wait
        return None

    def _idle_wait(self) -> float:
        """Seconds until the next delayed or retried version is due (at most 0.5), as the
        last _next found it; with every upload slot busy, only an upload's end (which wakes
        the loop) frees one."""
        if len(self.in_flight) >= self.concurrency:
            return 0.5
        return min(0.5, max(0.005, self._soonest - time.monotonic()))

    def _ready(self, entry: Entry) -> bool:
        """Whether a CHAIN entry may go: the version it follows has ended, and its base is
        now what that one became (the ETag it got, or the conflict copy it went to)."""
        prev = entry.after
        if prev is None:
            return True  # read back from the journal: last_etag and diverted tell
        if prev.state is Upload.DONE:
            entry.base = ("etag", prev.etag) if prev.etag else ABSENT  # ABSENT: cancelled
        elif prev.state is Upload.CONFLICT and prev.saved_as:
            entry.base = (FOLLOW, prev.saved_as)
        else:
            return False
        entry.after = None
        self._rewrite(entry)
        return True

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.journal.commits.run)  # the journal's group commit
            while True:
                entry = self._next() if len(self.in_flight) < self.concurrency else None
                if entry is None:
                    self._wakeup = trio.Event()
                    wait = self._idle_wait()
                    self._sleeps_until = time.monotonic() + wait
                    try:
                        with trio.move_on_after(wait):
                            await self._wakeup.wait()
                    finally:
                        self._sleeps_until = 0.0
                    continue
                self._dequeue(entry)
                self.in_flight[entry.key] = entry
                entry.to(Upload.UPLOADING)
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
        if entry.base[0] == FOLLOW:
            await self._follow(entry, entry.base[1])
            return
        try:
            if_match, if_none_match = self._conditions(entry)
            try:
                etag = await self._send(entry, if_match, if_none_match)
            except (PreconditionFailed, ObjectNotFound):
                landed = await self._landed(entry)
                if landed is None:
                    await self._divert(entry)
                    return
                etag, ours = landed
                if not ours:
                    # An older version of ours is there (sent before a crash, or by a try
                    # whose reply was lost, then replaced in the queue): this one replaces it.
                    entry.base, entry.earlier = ("etag", etag), None
                    etag = await self._send(entry, etag, False)
        except (PreconditionFailed, ObjectNotFound):
            await self._divert(entry)
            return
        except Exception as exc:  # noqa: BLE001 - any failure: keep the data, retry later
            delay = min(60.0, 2.0 ** min(entry.attempts, 6))
            log.error(
                "upload of %s failed (attempt %d, retrying in %.0fs; the data is kept): %s",
                entry.key,
                entry.attempts,
                delay,
                exc,
            )
            self._retry_later(entry, exc, delay)
            return
        entry.etag = etag
        self.last_etag[entry.key] = etag
        if self.on_uploaded is not None:
            await self.on_uploaded(entry)
        await self._finish(entry, Upload.DONE)

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
        offset, size = entry.body_offset, entry.body_size
        if self.helper is not None:
            try:
                etag: str = await self.helper.call("upload_file", *args, offset=offset, size=size)
                self.store.count_sent(size)
                return etag
            except HelperUnavailable:
                pass

        def upload() -> str:
            return self.store.upload_file(*args, offset=offset, size=size)

        # A stop does not wait for a PUT that hangs: the journal keeps the entry either way,
        # and a retry recognises its own earlier write (_landed).
        return await run_abandonable(upload, limiter=self.limiter)

    async def _landed(self, entry: Entry) -> tuple[str, bool] | None:
        """After a refused conditional write: is the object there our own anyway? Its ETag,
        and whether it is this very version (else an older one of this mount's: *earlier*).

        A PUT whose reply was lost (timeout), or that was under way at a crash, may have been
        applied; its retry then fails the precondition against our own write. The wrapped data
        key is unique per version."""
        try:
            head = await run_abandonable(self.store.head, entry.key, limiter=self.limiter)
        except StoreError:
            return None
        theirs = head.metadata.get("encryption-wrapped-key") if head.metadata else None
        if not theirs:
            return None
        if theirs == entry.metadata.get("encryption-wrapped-key"):
            log.info("%s: an earlier attempt of this upload had already succeeded", entry.key)
            return head.etag, True
        if theirs in (entry.earlier or ()):
            log.info("%s: an older version sent by this mount is there; replacing it", entry.key)
            return head.etag, False
        return None

    async def _divert(self, entry: Entry) -> None:
        """Someone else changed the object: store our version beside it, never over it."""
        if entry.cancelled:
            log.info("%s: changed by another writer, and deleted here since: no copy", entry.key)
            self.last_etag.pop(entry.key, None)
            await self._finish(entry, Upload.DONE)
            return
        try:
            copy = await self._store_copy(entry)
        except Exception as exc:  # noqa: BLE001 - keep it queued, try again later
            log.error("conflict copy of %s could not be stored yet: %s", entry.key, exc)
            self._retry_later(entry, exc, CONFLICT_RETRY)
            return
        if entry.cancelled:  # deleted here while the copy was being stored
            await self._delete_copy(copy)
            self.last_etag.pop(entry.key, None)
            await self._finish(entry, Upload.DONE)
            return
        self.conflicts += 1
        log.error(
            "upload conflict: %s was changed by another writer; this mount's version was saved "
            "as %s",
            entry.key,
            copy,
        )
        # Versions of this file queued behind this one were based on it: they follow it to
        # the copy (an O_TRUNC's empty file there, then what was closed last), not over the
        # other writer's version.
        self.diverted[entry.key] = copy
        self.recent_conflicts = [*self.recent_conflicts[-9:], copy]
        await self._settle_conflict(entry, copy)

    async def _store_copy(self, entry: Entry) -> str:
        """Store *entry* under a new conflict copy's name; returns that name."""
        for name in copy_names(entry.key, entry.seq):
            try:
                await self._upload_body(entry, name, None, True)
                return name
            except PreconditionFailed:
                continue  # taken: another machine's copy, same second, same number
        raise PreconditionFailed(f"{entry.key}: no free name for a conflict copy")

    async def _follow(self, entry: Entry, copy: str) -> None:
        """A later version of a file whose earlier one was saved as *copy*: it
        replaces that copy (ours alone), so the copy holds what this mount closed last."""
        if entry.stale_upload:
            await run_abandonable(self.store.abort_multipart, entry.key, entry.stale_upload)
            entry.stale_upload = None
        stream, entry.stream = entry.stream, None
        if stream is not None:
            await stream.abort()  # begun under the file's own name: not where this goes
        try:
            await self._upload_body(entry, copy, None, False)
        except Exception as exc:  # noqa: BLE001 - keep it queued, try again later
            log.error("conflict copy of %s could not be updated yet: %s", entry.key, exc)
            self._retry_later(entry, exc, CONFLICT_RETRY)
            return
        log.info("%s: a later version of this mount's also went to %s", entry.key, copy)
        if entry.cancelled:
            await self._delete_copy(copy)
        await self._settle_conflict(entry, copy)

    async def _settle_conflict(self, entry: Entry, copy: str) -> None:
        entry.saved_as = copy
        entry.error = UploadConflict(
            f"{entry.key} was changed by another writer; your version was saved as {copy}"
        )
        self.last_etag.pop(entry.key, None)
        # Before the waiters wake (as for an upload): they find the file as it is now.
        if self.on_conflict is not None:
            await self.on_conflict(entry)
        await self._finish(entry, Upload.CONFLICT)

    def _retry_later(self, entry: Entry, exc: Exception, delay: float) -> None:
        """An attempt failed: *entry* goes back to the head of the queue, to be tried again
        after *delay* seconds; its waiters learn of *exc*, and the freed slot is used."""
        entry.error = exc
        entry.to(Upload.QUEUED)
        entry.not_before = time.monotonic() + delay
        del self.in_flight[entry.key]
        self._enqueue(entry, first=True)
        entry._notify()
        self._kick()

    async def _finish(self, entry: Entry, state: Upload) -> None:
        if entry.slot is not None:
            self.journal.remove(entry)  # an 8-byte write: cheaper than a trip to a thread
        else:
            await trio.to_thread.run_sync(self.journal.remove, entry)
            self.trashed.set()
        entry.to(state)
        self.in_flight.pop(entry.key, None)
        self.queued_bytes -= entry.body_size
        self.uploaded_count += 1
        if entry.key not in self._by_key:
            # nothing chains on this key any more
            self.last_etag.pop(entry.key, None)
            self.diverted.pop(entry.key, None)
        entry._notify()
        self._space.set()
        self._space = trio.Event()
        self.progress.set()
        self.progress = trio.Event()
        self._kick()
