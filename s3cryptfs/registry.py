"""The mounts of a volume tell the administration commands which key versions they still use.

Each writable mount keeps one small object, ``<prefix>.s3cryptfs/mounts/<id>.json``: the
descriptor generation it has in force, and every (provider, key version) under which it holds
wrapped data keys that are not in S3 yet (its pool of keys wrapped ahead of time, the versions
queued in its journal) or wraps new files now. It is rewritten every heartbeat and deleted at a
clean unmount. `keys retire` reads them before it erases a version: it waits until every live
mount has seen the descriptor that stopped that version and holds nothing under it, and refuses
while a mount that stopped without unmounting (no heartbeat for long) still holds some.

Ages are measured with the S3 server's clock (LastModified against the Date of the LIST), never
this machine's. The records are not authenticated: someone who can write to the bucket can
forge or delete them, and so make a retire go ahead too early. That is an availability attack,
as deleting objects is (docs/SECURITY.md).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from s3cryptfs.errors import ObjectNotFound, S3CryptFSError
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.store.base import ObjectStore

# A mount that has not rewritten its record for this many of its own heartbeats (and at least
# STALE_MIN seconds) is taken as stopped without unmounting (crash, power loss).
STALE_HEARTBEATS = 10
STALE_MIN = 300.0
RECORD_MAX = 64 * 1024


def records_prefix(prefix: str) -> str:
    return f"{prefix}{META_DIR}/mounts/"


@dataclass
class MountRecord:
    mount_id: str
    host: str
    pid: int
    generation: int
    heartbeat: float  # seconds between rewrites
    holds: list[tuple[str, int]] = field(default_factory=list)
    age: float = 0.0  # seconds since it was written, by the server's clock (when listed)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "mount": self.mount_id,
                "host": self.host,
                "pid": self.pid,
                "generation": self.generation,
                "heartbeat": self.heartbeat,
                "holds": [list(h) for h in sorted(set(self.holds))],
            },
            sort_keys=True,
        ).encode()

    @staticmethod
    def from_json(raw: bytes) -> MountRecord:
        doc = json.loads(raw)
        return MountRecord(
            mount_id=str(doc["mount"]),
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            generation=int(doc["generation"]),
            heartbeat=float(doc["heartbeat"]),
            holds=[(str(p), int(v)) for p, v in doc.get("holds", [])],
        )

    @property
    def stale(self) -> bool:
        return self.age > max(STALE_MIN, STALE_HEARTBEATS * self.heartbeat)

    def describe(self) -> str:
        return f"mount {self.mount_id} on {self.host} (pid {self.pid})"


def new_mount_id() -> str:
    return os.urandom(8).hex()


def valid_mount_id(text: str) -> bool:
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def this_host() -> str:
    return socket.gethostname()


def publish(store: ObjectStore, prefix: str, record: MountRecord) -> None:
    store.put(f"{records_prefix(prefix)}{record.mount_id}.json", record.to_json(), {})


def withdraw(store: ObjectStore, prefix: str, mount_id: str) -> None:
    try:
        store.delete(f"{records_prefix(prefix)}{mount_id}.json")
    except ObjectNotFound:
        pass


def read_all(store: ObjectStore, prefix: str) -> list[MountRecord]:
    """Every mount record of the volume, with its age (blocking). Unreadable ones are skipped:
    they were not written by a mount of this version."""
    found: list[MountRecord] = []
    for page in store.list_all(records_prefix(prefix), delimiter=None):
        now_ns = page.server_time_ns or time.time_ns()
        for obj in page.objects:
            if not obj.key.endswith(".json"):
                continue
            try:
                raw, _ = store.get_bounded(obj.key, RECORD_MAX, "mount record")
                record = MountRecord.from_json(raw)
            except ObjectNotFound:
                continue  # unmounted meanwhile
            except (S3CryptFSError, ValueError, KeyError, TypeError):
                continue
            record.age = max(0.0, (now_ns - obj.mtime_ns) / 1e9)
            found.append(record)
    return found


def blockers(
    records: list[MountRecord], provider: str, version: int | None, generation: int
) -> tuple[list[MountRecord], list[MountRecord]]:
    """(live mounts that must catch up first, stopped mounts that still hold keys) before
    *provider*'s *version* (None: every version of it) may stop unwrapping. A live mount is
    ready once it has descriptor *generation* (or later) in force and holds nothing under it."""

    def holds(record: MountRecord) -> bool:
        return any(p == provider and version in (None, v) for p, v in record.holds)

    waiting = [r for r in records if not r.stale and (r.generation < generation or holds(r))]
    lost = [r for r in records if r.stale and holds(r)]
    return waiting, lost

