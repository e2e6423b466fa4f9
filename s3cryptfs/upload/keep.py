"""Closed files that could not be sealed: kept on this disk and sealed later.

A file whose close could not seal it (its key manager down, a full disk) keeps its write-back
file with a record naming it (closed.py), so that neither a retry nor a crash loses it; a
task retries the seal with a bounded backoff. WritePath (files.py) takes this part as a base
class: it is the state of the same files, split off to keep each module to one job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from s3cryptfs.errors import strip_subject
from s3cryptfs.upload import closed as closed_files
from s3cryptfs.upload.journal import Base, Entry
from s3cryptfs.upload.state import Staged, Written, trouble_kind
from s3cryptfs.upload.uploader import Uploader

log = logging.getLogger(__name__)
T = TypeVar("T")


class KeptClosed:
    """The closed-file half of WritePath (which sets these attributes)."""

    uploader: Uploader
    closed_pending: dict[Any, str]  # file -> why it is kept as closed
    unrecorded: set[Any]  # of those, the ones whose record could not be written
    _closed_kick: trio.Event

    def key(self, f: Written) -> str:
        raise NotImplementedError

    def base(self, f: Written) -> Base:
        raise NotImplementedError

    async def commit(self, f: Written) -> Entry | None:
        raise NotImplementedError

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def not_in_s3(self) -> list[tuple[str, str, str]]:
        """(key, kind of trouble, why) of every closed version not in S3 yet: files closed but
        not sealed (kind "key manager", "volume" or "local"), and sealed versions waiting
        for their upload (kind "S3")."""
        out = [(self.key(f), trouble_kind(why), why) for f, why in self.closed_pending.items()]
        for entry in self.uploader.waiting():
            why = str(entry.error) if entry.error is not None else "waiting for its upload"
            out.append((entry.key, "S3", why))
        return out

    # --- closed files that could not be sealed ------------------------------------------

    async def seal_closed(self, f: Written, tell: bool = False) -> bool:
        """Seal a closed file into the journal now; on failure keep it as closed (durably)
        and let the retry task try again. True when it was sealed.

        When even the record that keeps it cannot be written (a full or failing disk), the
        file stays pending in memory, retried like the others, and the log says so; the
        error is raised with *tell* (a truncate by name: its caller is told), not without
        it (a release, the retry task: no caller to tell)."""
        try:
            await self.commit(f)
        except Exception as exc:  # noqa: BLE001 - whatever stops the seal, the content stays
            try:
                await self.keep_closed(f, exc)
            except Exception:
                if tell:
                    raise  # (kept in memory all the same: see keep_closed)
            return False
        return True

    def _keep_unrecorded(self, f: Written, exc: BaseException) -> None:
        key = self.key(f)
        self.closed_pending.setdefault(f, f"{type(exc).__name__}: {strip_subject(exc, key)}")
        f.w.why = self.closed_pending[f]
        if f not in self.unrecorded:
            self.unrecorded.add(f)
            log.error(
                "%s: closed, but neither sealed nor recorded as closed on this disk (%s); "
                "kept and retried while the mount runs, but a crash before then loses it",
                key,
                strip_subject(exc, key),
            )
        self._closed_kick.set()

    async def keep_closed(self, f: Written, exc: BaseException) -> None:
        w = f.w
        staging = w.staging
        if staging is None or f.unlinked or not w.unsealed:
            return
        key = self.key(f)
        why = f"{type(exc).__name__}: {strip_subject(exc, key)}"
        first = f not in self.closed_pending
        self.closed_pending[f] = w.why = why
        kind, etag = self.base(f)
        base = [kind, etag] if kind in ("etag", "absent") else ["unknown", ""]
        xattrs = closed_files.xattrs_field(f.xattrs)
        record = closed_files.ClosedRecord(
            f.path, base, f.mode, f.uid, f.gid, f.mtime_ns, f.size, xattrs
        )
        try:
            await self._thread(closed_files.write, staging.fd, staging.path, record)
        except Exception as record_exc:
            self._keep_unrecorded(f, record_exc)
            raise
        self.unrecorded.discard(f)
        w._to(Staged.CLOSED)
        if first:
            log.error(
                "%s: closed, but it cannot be sealed for upload now (%s); its content is kept "
                "on this disk and sealed as soon as that works",
                key,
                why,
            )
            self._closed_kick.set()

    async def _retry_closed(self) -> None:
        """Seal the files kept as closed, with a bounded backoff (1 s doubling to 60 s)."""
        delay = 1.0
        while True:
            wait = delay if self.closed_pending else float("inf")
            with trio.move_on_after(wait):
                await self._closed_kick.wait()
            self._closed_kick = trio.Event()
            failed = False
            for f in list(self.closed_pending):
                if f.unlinked or not f.w.unsealed:
                    self.closed_pending.pop(f, None)
                    self.unrecorded.discard(f)
                    continue
                if f.writers:
                    continue  # open for writing again: its next close seals it
                failed |= not await self.seal_closed(f)
            delay = min(60.0, delay * 2) if failed else 1.0

    async def forget_closed(self, f: Written) -> None:
        """*f* was deleted by its user: a crash must not bring it back (its write-back file
        stays for readers that still have it open; it is never sealed once unlinked)."""
        w = f.w
        if w.state is Staged.CLOSED and w.staging is not None:
            await self._thread(closed_files.remove, w.staging.path)
        self.closed_pending.pop(f, None)

