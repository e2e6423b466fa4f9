"""Re-wrap every object's data key under the volume's active key, touching only metadata.

Each object whose envelope is not under the active provider and version gets its DEK unwrapped
by the manager its envelope names and wrapped again by the active one; the new envelope is
written with CopyObject onto itself (MetadataDirective=REPLACE, CopySourceIfMatch=the ETag the
HEAD saw), keeping every other metadata key. The body is never read or rewritten.

Directory indexes (``.s3cryptfs/dirs/``) are sealed like files and re-wrapped the same way:
they are the only home of directories' attributes on some stores, and of the exact mtime of
streamed files, whose objects carry none. Such a file also gets that mtime written into its
metadata by the copy (the one the volume shows: its index entry while the ETag matches, else its
Last-Modified, which the copy would otherwise move to now).

Idempotent and resumable: a rerun skips what is already under the active key. An object changed
between HEAD and copy (PreconditionFailed) is skipped and reported, never clobbered; an index
(which mounts rewrite all the time) is HEADed and tried once more first.
SeaweedFS keeps the ETag on such a metadata-only self-copy (AWS may not, for multipart objects);
the mount copes with both: it revalidates by ETag on open and re-reads the metadata when its
cached envelope names a key it cannot use. An index whose ETag changed makes a mount's next
conditional write of it fail and merge; its entries keep the files' ETags, and a file whose
ETag changed is HEADed, which now finds its mtime in its metadata.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from s3cryptfs.audit import NO_AUDIT, AuditLog
from s3cryptfs.codec import ObjectCodec
from s3cryptfs.errors import (
    FormatError,
    KeyManagerError,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
    strip_subject,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.ops.checkpoint import Checkpoint, interruptible
from s3cryptfs.ops.progress import Progress
from s3cryptfs.ops.walk import walk_heads
from s3cryptfs.store.base import ObjectInfo, ObjectStore
from s3cryptfs.vfs.attrindex import IndexEntry, is_index_key, read_index

log = logging.getLogger(__name__)

PLAIN = ("(not encrypted)", 0)


@dataclass
class RewrapReport:
    examined: int = 0
    rewrapped: int = 0
    current: int = 0  # already under the active key
    plain: int = 0  # not s3cryptfs objects: left alone
    # (provider, version) -> objects under it once the run is over (a dry run changes nothing)
    by_version: Counter[tuple[str, int]] = field(default_factory=Counter)
    changed: list[str] = field(default_factory=list)  # skipped: changed concurrently
    failed: list[tuple[str, str]] = field(default_factory=list)
    resumed_after: str | None = None  # a checkpoint of an interrupted run was used
    # Directory indexes, counted apart from the files above (the same meanings).
    indexes_rewrapped: int = 0
    indexes_current: int = 0
    index_versions: Counter[tuple[str, int]] = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return not self.changed and not self.failed

    def summary(self, dry_run: bool) -> str:
        lines = [f"resumed after {self.resumed_after}"] if self.resumed_after else []
        lines += [
            f"examined {self.examined} object(s): "
            + (f"{self.current} already under the active key, " if not dry_run else "")
            + (f"{self.rewrapped} re-wrapped, " if not dry_run else "")
            + f"{self.plain} not encrypted by s3cryptfs"
        ]
        indexes = sum(self.index_versions.values())
        if indexes and dry_run:
            lines.append(f"and {indexes} directory index(es)")
        elif indexes:
            lines.append(
                f"and {indexes} directory index(es): {self.indexes_current} already under the "
                f"active key, {self.indexes_rewrapped} re-wrapped"
            )
        if self.by_version or self.index_versions:
            when = "" if dry_run else " after this run"
            lines.append(f"key versions of the examined objects{when}:")
        for found in sorted(set(self.by_version) | set(self.index_versions)):
            extra = self.index_versions[found]
            more = f" (+{extra} directory index(es))" if extra else ""
            lines.append(f"  {found[0]} version {found[1]}: {self.by_version[found]}{more}")
        for key in self.changed:
            lines.append(f"  skipped (changed while re-wrapping; run again): {key}")
        for key, why in self.failed:
            lines.append(f"  FAILED {key}: {why}")
        return "\n".join(lines)


def new_metadata(old: dict[str, str], envelope_meta: dict[str, str]) -> dict[str, str]:
    """*old* with its envelope replaced; every other key (mode, owner, mtime...) kept."""
    meta = {k: v for k, v in old.items() if k not in md.ENVELOPE_NAMES}
    meta.update(envelope_meta)
    return meta


class ShownMtimes:
    """The mtime a mount shows for a file whose object has none in its metadata (a streamed
    upload): its directory index entry while that names the object's ETag, else the object's
    Last-Modified. Indexes are read once per directory (a few kept: LIST order groups files by
    directory)."""

    KEEP = 64

    def __init__(self, store: ObjectStore, codec: ObjectCodec, prefix: str) -> None:
        self.store, self.codec, self.prefix = store, codec, prefix
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, dict[str, IndexEntry]] = OrderedDict()

    def _entries(self, dir_path: str) -> dict[str, IndexEntry]:
        with self._lock:
            found = self._indexes.get(dir_path)
        if found is None:
            found = read_index(self.store, self.codec, self.prefix, dir_path)[1]
        with self._lock:
            self._indexes[dir_path] = found
            self._indexes.move_to_end(dir_path)
            while len(self._indexes) > self.KEEP:
                self._indexes.popitem(last=False)
        return found

    def of(self, info: ObjectInfo) -> int:
        """(blocking: may GET the index; S3 errors propagate, the object is then not copied)"""
        dir_path, _, name = info.key[len(self.prefix) :].rpartition("/")
        entry = self._entries(dir_path).get(name)
        if entry is not None and not entry.is_dir and entry.etag == info.etag:
            return entry.mtime_ns
        return info.mtime_ns


def rewrap_volume(
    store: ObjectStore,
    prefix: str,
    codec: ObjectCodec,
    jobs: int = 4,
    dry_run: bool = False,
    audit: AuditLog = NO_AUDIT,
    progress: str = "none",
    checkpoint_path: str | None = None,
) -> RewrapReport:
    """Re-wrap (or with *dry_run* only count) every object. With *checkpoint_path*, resume
    after the key saved by an interrupted run for the same active key, and save progress."""
    report = RewrapReport()
    lock = threading.Lock()
    active = codec.ring.active()
    target = (active.provider, active.active_key_version())
    context = {"volume_id": codec.descriptor.volume_id}
    shown = Progress(
        "dry run" if dry_run else "rewrap",
        progress,
        describe=lambda: f"{report.rewrapped} re-wrapped, {len(report.failed)} failed",
    )
    checkpoint = None
    if checkpoint_path is not None and not dry_run:
        checkpoint = Checkpoint(checkpoint_path, target)
        report.resumed_after = checkpoint.load()

    mtimes = ShownMtimes(store, codec, prefix)

    def one(info: ObjectInfo, again: bool = True) -> bool:
        meta = info.metadata or {}
        index = is_index_key(prefix, info.key)
        try:
            if md.object_format(meta) != md.FORMAT_V1:
                if index:
                    return True  # not an index a mount would trust: nothing to keep
                with lock:
                    report.examined += 1
                    report.plain += 1
                return True
            envelope = md.decode_envelope(meta)
        except FormatError as exc:
            if index:
                return True
            with lock:
                report.examined += 1
                report.failed.append((info.key, strip_subject(exc, info.key)))
            return False
        found = (envelope.provider, envelope.key_version)
        versions = report.index_versions if index else report.by_version
        if not index:
            with lock:
                report.examined += 1
        if dry_run or found == target:
            with lock:
                versions[found] += 1
                if not dry_run and index:
                    report.indexes_current += 1
                elif not dry_run:
                    report.current += 1
            return True
        try:
            dek = codec.unwrap_envelope(envelope, info.key)
            fresh = active.wrap_key(dek, context)
            replaced = new_metadata(meta, md.encode_envelope(fresh))
            if not index and md.MTIME not in meta:
                replaced[md.MTIME] = str(mtimes.of(info))
            store.copy(info.key, info.key, replaced, src_etag=info.etag)
        except PreconditionFailed:
            if index and again:
                try:
                    now = store.head(info.key)
                except ObjectNotFound:
                    return True  # deleted meanwhile (its directory was removed)
                except StoreError:
                    now = None  # reported as changed: a rerun takes it
                if now is not None:
                    return one(now, again=False)
            audit.event("rewrap", "PreconditionFailed", object=info.key, provider=found[0])
            with lock:
                versions[found] += 1
                report.changed.append(info.key)
            return False
        except (KeyManagerError, StoreError) as exc:
            if index and isinstance(exc, ObjectNotFound):
                return True  # its directory was removed meanwhile
            audit.event("rewrap", type(exc).__name__, object=info.key, provider=found[0])
            why = strip_subject(exc, info.key)
            log.error("%s: not re-wrapped: %s", info.key, why)
            with lock:
                versions[found] += 1
                report.failed.append((info.key, why))
            return False
        audit.event(
            "rewrap",
            object=info.key,
            provider=fresh.provider,
            key_id=fresh.key_id,
            key_version=fresh.key_version,
            detail=f"from {found[0]} version {found[1]}",
        )
        with lock:
            versions[target] += 1
            if index:
                report.indexes_rewrapped += 1
            else:
                report.rewrapped += 1
        return True

    start = report.resumed_after
    stopped = False
    try:
        with interruptible():
            walk_heads(store, prefix, jobs, one, start, checkpoint, indexes=True, progress=shown)
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        shown.close()
        if checkpoint is not None:
            checkpoint.save()
            if stopped and checkpoint.after is not None:
                print(
                    "s3cryptfs: interrupted; progress is saved: the same command resumes after "
                    f"{checkpoint.after}",
                    file=sys.stderr,
                )
    if checkpoint is not None and report.complete:
        checkpoint.remove()  # done: the next run starts from the beginning
    report.changed.sort()
    report.failed.sort()
    return report


@dataclass
class VersionCounts:
    """(provider, version) -> how many objects are sealed under it: files, and directory
    indexes apart."""

    files: Counter[tuple[str, int]] = field(default_factory=Counter)
    indexes: Counter[tuple[str, int]] = field(default_factory=Counter)

    def in_use(self, found: tuple[str, int]) -> int:
        return self.files[found] + self.indexes[found]

    def versions(self) -> set[tuple[str, int]]:
        return {k for k, n in (self.files + self.indexes).items() if n}


def count_versions(store: ObjectStore, prefix: str, jobs: int = 8) -> VersionCounts:
    """Objects under each (provider, version), directory indexes included, by LIST + HEAD."""
    counts = VersionCounts()
    lock = threading.Lock()

    def one(info: ObjectInfo) -> None:
        meta = info.metadata or {}
        try:
            if md.object_format(meta) != md.FORMAT_V1:
                return
            env = md.decode_envelope(meta)
        except FormatError:
            return
        kind = counts.indexes if is_index_key(prefix, info.key) else counts.files
        with lock:
            kind[(env.provider, env.key_version)] += 1

    walk_heads(store, prefix, jobs, one, indexes=True)
    return counts
