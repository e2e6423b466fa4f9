"""Per-directory attribute index: mode, owner and mtime of a directory's entries in one object.

S3's LIST returns names, sizes and ETags but no user metadata, and our POSIX attributes live in
each object's metadata; without help, `ls -l` would need one HEAD per file. So each directory
has an index object, ``PREFIX.s3cryptfs/dirs/<hash of the directory path>``, holding for every
entry the ETag it was seen with and its attributes. The index is a cache, never the truth for
files: an entry is used only while its ETag equals the one LIST reports, otherwise the file is
HEADed as before. For directories it is the only home of their attributes on stores that drop
metadata on ``dir/`` markers (SeaweedFS), so there it is authoritative.

The index is sealed like any object (format v1 under the volume's key manager), so it is
authenticated and its contents are not readable from the bucket. Writes are read-merge-write,
debounced, last writer wins: two mounts racing can only lose entries, which costs HEADs later,
never wrong attributes (entries are ETag-checked). See docs/FORMAT.md, "Directory index".
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import stat
from collections.abc import Awaitable, Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from s3cryptfs import limits
from s3cryptfs.codec import ObjectCodec
from s3cryptfs.errors import (
    KeyManagerError,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    S3CryptFSError,
    strip_subject,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.format import xattrs as xa
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.store.base import ObjectStore

log = logging.getLogger(__name__)

# Version 2 rows may carry a directory's extended attributes; an index with none is written as
# version 1, which mounts older than extended attributes read too.
INDEX_VERSIONS = (1, 2, 3)  # a writer writes the lowest one its entries fit (docs/FORMAT.md)
# An atime, in ns, is at most this: year 2262 (what fits an int64 of nanoseconds).
_TIME_MAX = 2**63 - 1
LAST_WRITTEN_DIRS = 64  # indexes whose last written state is kept to skip the GET before a PUT
SELF = "."  # the directory's own attributes, for the root (other directories: in the parent)


def index_key(prefix: str, dir_path: str) -> str:
    digest = hashlib.sha256(b"s3cryptfs dir\x00" + dir_path.encode()).hexdigest()[:40]
    return f"{prefix}{META_DIR}/dirs/{digest}"


_INDEX_NAME = re.compile(r"[0-9a-f]{40}")


def is_index_key(prefix: str, key: str) -> bool:
    """*key* has the form of a directory index of the volume at *prefix* (nothing else under
    ``.s3cryptfs/``: not the descriptor, not what a newer version may put there)."""
    head = f"{prefix}{META_DIR}/dirs/"
    return key.startswith(head) and _INDEX_NAME.fullmatch(key[len(head) :]) is not None


_SHARED_INTS: dict[int, int] = {}


def shared_int(value: int) -> int:
    """One object for each mode, uid and gid seen: a directory's files repeat a few of them,
    and each int over 256 is an object of its own (32 bytes) per file and per index entry.
    Bounded, since an untrusted index could hold as many values as entries."""
    if len(_SHARED_INTS) < 4096:
        return _SHARED_INTS.setdefault(value, value)
    return _SHARED_INTS.get(value, value)


@dataclass(slots=True)
class _Known:
    """The names a directory holds: those of its last full listing (*listed*, a live view:
    the listing's table, which the mount's own creates and removals keep current), and
    those noted in the index since, present or gone."""

    listed: Container[str]
    added: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)

    def note(self, name: str, present: bool) -> None:
        # Only what the listing does not say already: a pass of HEADs over a wide directory
        # notes every file it lists.
        if present:
            self.removed.discard(name)
            if name not in self.listed:
                self.added.add(name)
        else:
            self.added.discard(name)
            if name in self.listed:
                self.removed.add(name)

    def __contains__(self, name: object) -> bool:
        if name in self.added:
            return True
        return name in self.listed and name not in self.removed


# Slots: a loaded index holds one per entry of the directory, and a wide directory's index
# is in memory twice (as loaded, and as last written).
@dataclass(frozen=True, slots=True)
class IndexEntry:
    etag: str  # "" for directories (markers may not exist, and their ETags mean nothing)
    mode: int  # with the file type bits
    uid: int
    gid: int
    mtime_ns: int
    # Directories: their extended attributes, encoded (format/xattrs.py); b"" for none. Files
    # keep theirs in their object's metadata, never here.
    xattrs: bytes = b""
    # An access time set explicitly (section 6 of docs/FORMAT.md); None for none.
    atime_ns: int | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def rdev(self) -> None:
        return None  # a device's number is in its object's metadata only


def _row(e: IndexEntry) -> list[Any]:
    row: list[Any] = [e.etag, e.mode, e.uid, e.gid, e.mtime_ns]
    blob = base64.b64encode(e.xattrs).decode("ascii") if e.xattrs and e.is_dir else ""
    if e.atime_ns is not None and 0 <= e.atime_ns <= _TIME_MAX:
        # (one outside what readers accept, before 1970 or after 2262, is left to the object's
        # metadata: writing it would make every reader refuse the whole index)
        row += [blob, e.atime_ns]
    elif blob:
        row.append(blob)
    return row


def _version(rows: dict[str, list[Any]]) -> int:
    longest = max((len(r) for r in rows.values()), default=5)
    return {5: 1, 6: 2}.get(longest, 3)


def encode(dir_path: str, entries: dict[str, IndexEntry]) -> bytes:
    rows = {name: _row(e) for name, e in sorted(entries.items())}
    doc = {
        "s3cryptfs": "dir-index",
        "version": _version(rows),
        "path": dir_path,
        "entries": rows,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _xattrs(version: int, row: list[Any]) -> bytes:
    """The encoded extended attributes of a row (checked: the index is sealed, but what it
    says is still bounded before it is used)."""
    if len(row) == 5:
        return b""
    if version < 2 or len(row) > (6 if version == 2 else 7) or not isinstance(row[5], str):
        raise ValueError("directory index: malformed entry")
    if not row[5]:
        return b""
    if len(row[5]) > xa.BLOB_MAX_CHARS:
        raise ValueError("directory index: extended attributes too large")
    raw = base64.b64decode(row[5], validate=True)
    xa.decode_set(raw)  # FormatError if malformed: the index is ignored, as for a ValueError
    return raw


def decode(dir_path: str, raw: bytes) -> dict[str, IndexEntry]:
    """Entries of an index; ValueError (or FormatError) if it is malformed or belongs to
    another directory."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("s3cryptfs") != "dir-index":
        raise ValueError("not a directory index")
    version = doc.get("version")
    if version not in INDEX_VERSIONS or isinstance(version, bool):
        raise ValueError(f"directory index version {version!r} is not supported")
    if doc.get("path") != dir_path:
        # Sealed, but an index could still be copied over another directory's key.
        raise ValueError("directory index belongs to another directory")
    out: dict[str, IndexEntry] = {}
    for name, row in doc["entries"].items():
        etag, mode, uid, gid, mtime_ns = row[:5]
        entry = IndexEntry(
            str(etag), shared_int(int(mode)), shared_int(int(uid)), shared_int(int(gid)),
            int(mtime_ns),
        )  # fmt: skip
        extra = _xattrs(version, row)
        if extra and entry.is_dir:
            entry = dataclasses.replace(entry, xattrs=extra)
        if len(row) == 7:
            atime = row[6]
            if not isinstance(atime, int) or isinstance(atime, bool) or not 0 <= atime <= _TIME_MAX:
                raise ValueError("directory index: malformed access time")
            entry = dataclasses.replace(entry, atime_ns=atime)
        out[str(name)] = entry
    return out


def open_index(
    codec: ObjectCodec, dir_path: str, key: str, meta: dict[str, str], body: bytes
) -> dict[str, IndexEntry]:
    """The entries of a stored index, or {} for one that cannot be trusted (blocking)."""
    try:
        raw = codec.decrypt_whole(meta, body, key)
        return decode(dir_path, raw)
    except KeyManagerError as exc:
        # A cache: one whose key version was retired before `rewrap` reached it (or a forced
        # retire) is rebuilt under the active version.
        log.info("%s: directory index ignored: %s", key, strip_subject(exc, key))
        return {}
    except (S3CryptFSError, ValueError, KeyError, TypeError) as exc:
        # A cache that fails to authenticate is ignored (and rewritten), never trusted.
        log.warning("%s: directory index ignored: %s", key, strip_subject(exc, key))
        return {}


def read_index(
    store: ObjectStore, codec: ObjectCodec, prefix: str, dir_path: str
) -> tuple[str | None, dict[str, IndexEntry]]:
    """(ETag or None if absent, entries) of *dir_path*'s stored index (blocking)."""
    key = index_key(prefix, dir_path)
    try:
        body, info = store.get_bounded(key, limits.DIR_INDEX_MAX, "directory index")
    except ObjectNotFound:
        return None, {}
    except ObjectTooLarge as exc:
        # Planted (we never write one that big): ignored like any index that does not
        # authenticate, and replaced at the next write.
        log.warning("%s: directory index ignored: %s", key, exc)
        return None, {}
    return info.etag, open_index(codec, dir_path, key, info.metadata or {}, body)


Thread = Callable[..., Awaitable[Any]]


class AttrIndex:
    """Loads, merges and writes directory indexes for one mounted volume."""

    def __init__(
        self,
        store: ObjectStore,
        codec: ObjectCodec,
        prefix: str,
        thread: Thread,
        delay: float = 1.0,
    ) -> None:
        self.store = store
        self.codec = codec
        self.prefix = prefix
        self._thread = thread
        self.delay = delay
        # dir path -> name -> new entry, or None for "gone"
        self._pending: dict[str, dict[str, IndexEntry | None]] = {}
        # dir path -> names the directory is known to hold (when we have a fresh full listing)
        self._known_names: dict[str, _Known] = {}
        # dirs removed or renamed away: their stored index is discarded, not merged
        self._reset: set[str] = set()
        self._wake = trio.Event()
        # dir path -> passes in progress that note many of its entries (batch())
        self._held: dict[str, int] = {}
        # One writer at a time: two read-merge-writes of the same index from this process
        # would otherwise race, and the later PUT would drop the other's entries.
        self._write_lock = trio.Lock()
        self.writes = 0
        # dir path -> (ETag, entries) of the index as we last wrote or read it: the next write
        # starts from it with a conditional PUT instead of a GET (a busy directory is written
        # every second). Someone else's write in between fails the condition: then we merge.
        self._last: collections.OrderedDict[str, tuple[str, dict[str, IndexEntry]]] = (
            collections.OrderedDict()
        )

    # --- reading -----------------------------------------------------------------------

    def _fetch(self, dir_path: str) -> dict[str, IndexEntry]:
        return self._fetch_tagged(dir_path)[1]

    def _fetch_tagged(self, dir_path: str) -> tuple[str | None, dict[str, IndexEntry]]:
        """(ETag or None if absent, entries); entries are {} for an index we cannot trust."""
        return read_index(self.store, self.codec, self.prefix, dir_path)

    async def load(self, dir_path: str) -> dict[str, IndexEntry]:
        """The index of *dir_path* as stored, with our unwritten changes applied."""
        entries = {} if dir_path in self._reset else await self._thread(self._fetch, dir_path)
        for name, entry in self._pending.get(dir_path, {}).items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        return entries

    # --- writing -----------------------------------------------------------------------

    def note(self, dir_path: str, name: str, entry: IndexEntry | None) -> None:
        """Record *name*'s attributes (or its removal) for the next write of the index."""
        self._pending.setdefault(dir_path, {})[name] = entry
        known = self._known_names.get(dir_path)
        if known is not None:  # keep the pruning set as current as the listing would be
            known.note(name, entry is not None)
        self._wake.set()

    @contextlib.contextmanager
    def batch(self, dir_path: str) -> Iterator[None]:
        """Hold the background writes of *dir_path*'s index while many of its entries are
        noted (the HEADs of a directory without an index): each write is the whole
        directory, and one a second through a pass over 50,000 files is quadratic. A drain
        (umount) still writes it."""
        self._held[dir_path] = self._held.get(dir_path, 0) + 1
        try:
            yield
        finally:
            left = self._held.pop(dir_path) - 1
            if left:
                self._held[dir_path] = left
            if dir_path in self._pending:
                self._wake.set()

    def note_names(self, dir_path: str, names: Container[str]) -> None:
        """A fresh full listing of *dir_path*: entries for other names can be dropped.
        *names* is kept as it is, not copied (the listing's own table: a copy would cost a
        set slot per file of a wide directory); names noted since are tracked beside it."""
        self._known_names[dir_path] = _Known(names)

    def forget_dir(self, dir_path: str) -> None:
        """*dir_path* was removed or renamed away: drop its pending changes and its index."""
        self._pending[dir_path] = {}
        self._last.pop(dir_path, None)
        self._known_names.pop(dir_path, None)
        self._reset.add(dir_path)
        self._wake.set()

    def _write(self, dir_path: str, changes: dict[str, IndexEntry | None]) -> None:
        key = index_key(self.prefix, dir_path)
        reset = dir_path in self._reset
        self._reset.discard(dir_path)
        if reset and not changes:
            try:
                self.store.delete(key)
            except ObjectNotFound:
                pass
            return
        last = None if reset else self._last.get(dir_path)
        if last is not None:
            try:
                self._put(dir_path, key, dict(last[1]), changes, if_match=last[0])
                return
            except PreconditionFailed:
                pass  # written by another mount since: read it and merge
        self._last.pop(dir_path, None)
        entries = {} if reset else self._fetch(dir_path)
        self._put(dir_path, key, entries, changes)

    def _put(
        self,
        dir_path: str,
        key: str,
        entries: dict[str, IndexEntry],
        changes: dict[str, IndexEntry | None],
        if_match: str | None = None,
    ) -> None:
        for name, entry in changes.items():
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
        known = self._known_names.get(dir_path)
        if known is not None:
            entries = {n: e for n, e in entries.items() if n in known or n in changes or n == SELF}
        with self.codec.fence():
            body, meta = self.codec.seal_bytes(encode(dir_path, entries), md.PosixAttrs(), key)
            etag = self.store.put(key, body, meta, if_match)
        self.writes += 1
        self._last[dir_path] = (etag, entries)
        self._last.move_to_end(dir_path)
        while len(self._last) > LAST_WRITTEN_DIRS:
            self._last.popitem(last=False)

    async def flush(self, once: bool = False) -> None:
        """Write every index with pending changes (best effort: it is a cache). *once*: only
        those pending now; changes made meanwhile wait for the next round, so a long burst
        writes an index about once per delay, not back to back (each write is the whole
        directory)."""
        async with self._write_lock:
            rounds = len(self._pending) if once else -1
            while self._pending and rounds != 0:
                rounds -= 1
                ready = (d for d in reversed(self._pending) if not (once and d in self._held))
                dir_path = next(ready, None)
                if dir_path is None:
                    break
                changes = self._pending.pop(dir_path)
                try:
                    await self._thread(self._write, dir_path, changes)
                except S3CryptFSError as exc:
                    log.warning("directory index of /%s not written: %s", dir_path, exc)

    async def run(self) -> None:
        """Write pending changes a little after they happen, batching bursts (cp -r, tar x)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(self.delay)
            await self.flush(once=True)
            if self._pending:
                self._wake.set()
