"""The journal: a crash-safe local store of encrypted file versions waiting for upload.

A version enters the journal when a file is closed (or fsync'ed): its encrypted body is written
and fsync'ed first, then a small JSON record is written and renamed into place. Only a renamed
record counts; after a crash, the next mount uploads every record it finds, in order, before it
serves anything. Bodies are ciphertext, so the journal never holds plaintext. Small versions
share one pool file instead (slots.py), whose writes are flushed in groups (commits.py): a
close writes its slot, and the flush comes a moment later, shared with the closes around it.
The uploader (uploader.py) sends them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import trio

from s3cryptfs import limits
from s3cryptfs.upload.commits import GroupCommit
from s3cryptfs.upload.slots import SlotPool, SlotRecord

log = logging.getLogger(__name__)

# base of a version: the ETag it replaces, "absent" (a new file), "chain" (the previous
# journal entry of the same key, whose ETag is only known once it is uploaded), or "follow"
# with a conflict copy's key (an earlier version of this file lost to another writer and was
# saved there: the versions closed after it, by the same writers, go there too, never over
# the winner).
Base = tuple[str, str]
ABSENT: Base = ("absent", "")
CHAIN: Base = ("chain", "")
FOLLOW = "follow"


class Upload(enum.Enum):
    """Where a journal entry's upload is."""

    QUEUED = "queued"  # waiting (or waiting to retry after a failure)
    UPLOADING = "uploading"  # being sent
    DONE = "done"  # in S3; dropped from the journal
    CONFLICT = "conflict"  # another writer won: saved beside the object; dropped


UPLOAD_TRANSITIONS: dict[Upload, set[Upload]] = {
    Upload.QUEUED: {Upload.UPLOADING, Upload.DONE},  # DONE: superseded or cancelled
    Upload.UPLOADING: {Upload.QUEUED, Upload.DONE, Upload.CONFLICT},  # QUEUED: retry
    Upload.DONE: set(),
    Upload.CONFLICT: set(),
}


@dataclass(eq=False)
class Entry:
    seq: int
    key: str
    body_path: str
    metadata: dict[str, str]
    base: Base
    plain_size: int
    body_size: int
    state: Upload = Upload.QUEUED  # changed through to(), along UPLOAD_TRANSITIONS
    etag: str | None = None
    error: BaseException | None = None
    superseded_by: Entry | None = None
    attempts: int = 0
    not_before: float = 0.0
    changed: trio.Event = field(default_factory=trio.Event)
    # A multipart upload of this body begun while the file was written (upload/stream.py);
    # in memory only. After a crash only its id is known (stale_upload), and it is aborted.
    stream: Any = None
    stale_upload: str | None = None
    # Small versions live in a slot of the pool file (upload/slots.py); the body starts at
    # body_offset of body_path. moves counts relocations (a reader that raced one reads
    # again); released: the journal no longer holds the body (it is in S3).
    slot: int | None = None
    generation: int = 0
    body_offset: int = 0
    moves: int = 0
    released: bool = False
    # The write-back file this version was sealed from, when it had been kept as closed
    # (upload/closed.py): after a crash, its marker is stale once this record exists.
    staging_name: str | None = None
    # Set when another writer won: the conflict copy this version was stored as.
    saved_as: str | None = None
    # The file was deleted or replaced here while this version was being sent: if another
    # writer won meanwhile, no conflict copy is made (this mount no longer wants the version).
    cancelled: bool = False
    # base CHAIN: the version this one follows (in memory; Uploader._ready resolves the base
    # from how that one ended, whenever that was).
    after: Entry | None = None
    # A rename is moving this queued version to another key (Uploader.hold): not sent meanwhile.
    held: bool = False
    # Loaded from the journal by the next mount: it may have been sent before the crash.
    recovered: bool = False
    # It replaced older versions of its key in the queue, whose records stay on the disk
    # until it is flushed (Journal.remove): a rename moving it syncs first (vfs/namespace.py).
    displaced: bool = False
    # The wrapped data keys of older versions of the file that this one replaced in the queue
    # and that may be in S3 already (tried before, or recovered): one of them under the key is
    # this mount's own earlier write, not another writer's (Uploader._landed). In memory only.
    earlier: list[str] | None = None

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

    def to(self, new: Upload) -> None:
        if new not in UPLOAD_TRANSITIONS[self.state]:
            raise AssertionError(f"upload of {self.key}: no transition {self.state} -> {new}")
        self.state = new

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
        # file is slow on some file systems (ext4 mounted with `discard`, for one: seconds),
        # and nobody should wait for it (an fsync, the unmount).
        self.trash = directory.rstrip("/") + ".trash"
        os.makedirs(self.trash, mode=0o700, exist_ok=True)
        self.slots = SlotPool(directory.rstrip("/") + ".slots")
        self.commits = GroupCommit(self.slots.flush)
        self._slot_records = self.slots.scan()
        for rec in self._slot_records:
            self._seq = max(self._seq, rec.seq)

    def check_room(self, needed: int) -> None:
        """ENOSPC unless *needed* bytes fit in the journal's file system with CACHE_RESERVE
        to spare, checked before a body is written: a sparse file of a terabyte is small on
        this disk but a terabyte of ciphertext here, and a disk filled halfway through a
        seal leaves every other file without room."""
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        # (a file system that reports no size at all, as some FUSE ones do, is not judged)
        if st.f_blocks and needed + limits.CACHE_RESERVE > free:
            raise OSError(
                errno.ENOSPC,
                f"sealing it takes {needed / limits.MiB:,.1f} MiB in the cache directory, "
                f"which has {free / limits.MiB:,.1f} MiB free and keeps "
                f"{limits.CACHE_RESERVE // limits.MiB} MiB of them in reserve",
            )

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
        """Commit *entry* (its slot taken, body_offset set) with one write, flushed by the group
        commit. False if it does not fit (entry.slot None): commit it as files instead, and
        give the slot back once that is done (given back before, it could be taken by another
        version, and then given back again should the files fail)."""
        assert entry.slot is not None
        record = json.dumps(entry.record()).encode()
        if len(body) + len(record) > self.slots.capacity:
            entry.slot = None
            return False
        self.slots.write(entry.slot, entry.seq, entry.generation, body, record)
        self.commits.wrote()
        return True

    def rewrite(self, entry: Entry) -> None:
        """Commit a changed record (blocking). A version in a slot moves to another slot (or to
        files): its old place is freed only once the new one is durable."""
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
            self.commits.wrote()
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
        entry.moves += 1  # (readers look again now; the old slot holds the same body meanwhile)
        self.commits.after_durable(lambda: self.slots.clear(old_slot))

    def remove(self, entry: Entry, replaced: bool = False) -> None:
        """Drop *entry* from the journal: the record goes, the body to the trash. *replaced*: a
        newer version of the file takes its place, and this one stays on the disk until that
        one is durable (a power loss before then leaves this one, not neither)."""
        if replaced:
            self.commits.after_durable(lambda: self._drop(entry))
        else:
            self.commits.in_order(lambda: self._drop(entry))

    def _drop(self, entry: Entry) -> None:
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
