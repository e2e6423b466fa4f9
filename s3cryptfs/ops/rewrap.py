"""Re-wrap every object's data key under the volume's active key, touching only metadata.

Each object whose envelope is not under the active provider and version gets its DEK unwrapped
by the manager its envelope names and wrapped again by the active one; the new envelope is
written with CopyObject onto itself (MetadataDirective=REPLACE, CopySourceIfMatch=the ETag the
HEAD saw), keeping every other metadata key. The body is never read or rewritten.

Idempotent and resumable: a rerun skips what is already under the active key. An object changed
between HEAD and copy (PreconditionFailed) is skipped and reported, never clobbered.
SeaweedFS keeps the ETag on such a metadata-only self-copy (AWS may not, for multipart objects);
the mount copes with both: it revalidates by ETag on open and re-reads the metadata when its
cached envelope names a key it cannot use.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from s3cryptfs.audit import NO_AUDIT, AuditLog
from s3cryptfs.codec import ObjectCodec
from s3cryptfs.errors import (
    FormatError,
    KeyManagerError,
    PreconditionFailed,
    StoreError,
    strip_subject,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.ops.checkpoint import Checkpoint, interruptible
from s3cryptfs.ops.walk import walk_heads
from s3cryptfs.store.s3 import ObjectInfo, S3Store

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
        if self.by_version:
            when = "" if dry_run else " after this run"
            lines.append(f"key versions of the examined objects{when}:")
        for (provider, version), count in sorted(self.by_version.items()):
            lines.append(f"  {provider} version {version}: {count}")
        for key in self.changed:
            lines.append(f"  skipped (changed while re-wrapping; run again): {key}")
        for key, why in self.failed:
            lines.append(f"  FAILED {key}: {why}")
        return "\n".join(lines)


class _Progress:
    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream if stream is not None and stream.isatty() else None
        self.lock = threading.Lock()

    def show(self, report: RewrapReport) -> None:
        if self.stream is None or report.examined % 50:
            return
        with self.lock:
            self.stream.write(f"\r{report.examined} examined, {report.rewrapped} re-wrapped")
            self.stream.flush()

    def end(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")


def new_metadata(old: dict[str, str], envelope_meta: dict[str, str]) -> dict[str, str]:
    """*old* with its envelope replaced; every other key (mode, owner, mtime...) kept."""
    meta = {k: v for k, v in old.items() if k not in md.ENVELOPE_NAMES}
    meta.update(envelope_meta)
    return meta


def rewrap_volume(
    store: S3Store,
    prefix: str,
    codec: ObjectCodec,
    jobs: int = 4,
    dry_run: bool = False,
    audit: AuditLog = NO_AUDIT,
    progress: TextIO | None = sys.stderr,
    checkpoint_path: str | None = None,
) -> RewrapReport:
    """Re-wrap (or with *dry_run* only count) every object. With *checkpoint_path*, resume
    after the key saved by an interrupted run for the same active key, and save progress."""
    report = RewrapReport()
    lock = threading.Lock()
    active = codec.ring.active()
    target = (active.provider, active.active_key_version())
    context = {"volume_id": codec.descriptor.volume_id}
    shown = _Progress(progress)
    checkpoint = None
    if checkpoint_path is not None and not dry_run:
        checkpoint = Checkpoint(checkpoint_path, target)
        report.resumed_after = checkpoint.load()

    def one(info: ObjectInfo) -> bool:
        meta = info.metadata or {}
        try:
            if md.object_format(meta) != md.FORMAT_V1:
                with lock:
                    report.examined += 1
                    report.plain += 1
                return True
            envelope = md.decode_envelope(meta)
        except FormatError as exc:
            with lock:
                report.examined += 1
                report.failed.append((info.key, strip_subject(exc, info.key)))
            return False
        found = (envelope.provider, envelope.key_version)
        with lock:
            report.examined += 1
        if dry_run or found == target:
            with lock:
                report.by_version[found] += 1
                if not dry_run:
                    report.current += 1
            return True
        try:
            dek = codec.unwrap_envelope(envelope, info.key)
            fresh = active.wrap_key(dek, context)
            store.copy(
                info.key,
                info.key,
                new_metadata(meta, md.encode_envelope(fresh)),
                src_etag=info.etag,
            )
        except PreconditionFailed:
            audit.event("rewrap", "PreconditionFailed", object=info.key, provider=found[0])
            with lock:
                report.by_version[found] += 1
                report.changed.append(info.key)
            return False
        except (KeyManagerError, StoreError) as exc:
            audit.event("rewrap", type(exc).__name__, object=info.key, provider=found[0])
            why = strip_subject(exc, info.key)
            log.error("%s: not re-wrapped: %s", info.key, why)
            with lock:
                report.by_version[found] += 1
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
            report.rewrapped += 1
            report.by_version[target] += 1
            shown.show(report)
        return True

    start = report.resumed_after
    stopped = False
    try:
        with interruptible():
            walk_heads(store, prefix, jobs, one, start, checkpoint)
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        shown.end()
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


def count_versions(store: S3Store, prefix: str, jobs: int = 8) -> Counter[tuple[str, int]]:
    """(provider, version) -> number of objects, by a LIST + HEAD walk."""
    counts: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def one(info: ObjectInfo) -> None:
        meta = info.metadata or {}
        try:
            if md.object_format(meta) != md.FORMAT_V1:
                return
            env = md.decode_envelope(meta)
        except FormatError:
            return
        with lock:
            counts[(env.provider, env.key_version)] += 1

    walk_heads(store, prefix, jobs, one)
    return counts
