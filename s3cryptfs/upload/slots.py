"""Journal slots: small file versions committed with one data-only flush.

Committing a version as its own files costs three flushes (body, record, directory), and each
one commits the file system's journal, which on a busy disk takes milliseconds: for small files
that was most of the time `close()` took. Small versions therefore go into a pool file that is
written full of zeros once, so its blocks exist and its size never changes; a commit is a write
into a free slot, and the fdatasync that makes it durable has no metadata to commit. That
fdatasync is shared by every slot written in the last moment (group commit: commits.py).

A slot holds a header, the encrypted body and the JSON record:

    magic "S3CFSLT1" | seq (u64) | generation (u64) | body length (u32) | record length (u32)
    | SHA-256 of the body and record (32 bytes) | body | record

A slot counts only if its digest matches, so a write torn by a crash is ignored (it was never
acknowledged). Freeing a slot zeroes its magic, unflushed: a freed slot that comes back after a
crash is uploaded again, which the uploader recognises as its own version (same wrapped key).
Rewriting a record (new metadata, a new base) writes the entry to another slot with the next
generation; the old one is freed once that write is flushed. Of two slots with one seq, the
higher generation wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"S3CFSLT1"
_HEAD = struct.Struct(">8sQQII32s")
HEAD_LEN = _HEAD.size
SLOT_SIZE = 128 * 1024
SLOT_COUNT = 256  # as made (32 MiB)
# Closes outpacing uploads fill the slots; past them a close takes the three-flush path. The
# pool then grows, in the background, this many slots at a time up to SLOT_COUNT_MAX (and
# keeps its size: a pool only grows).
SLOT_GROW = 256
SLOT_COUNT_MAX = 1024


@dataclass
class SlotRecord:
    slot: int
    seq: int
    generation: int
    body_len: int
    record: dict[str, Any]


class SlotPool:
    def __init__(
        self,
        path: str,
        count: int = SLOT_COUNT,
        size: int = SLOT_SIZE,
        max_count: int = SLOT_COUNT_MAX,
        grow_by: int = SLOT_GROW,
    ) -> None:
        self.path = path
        self.count = count
        self.size = size
        self.max_count = max(max_count, count)
        self.grow_by = grow_by
        self._growing = False
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if have and have % size == 0:
            # A pool grown before, or made with another slot count: its slots keep their
            # offsets, so it grows in place, and it never shrinks (the slots past a smaller
            # count may hold versions waiting for upload).
            self.count = max(count, have // size)
            if have < self.count * size:
                self._grow(have)
        else:
            self._create()
        self.fd = os.open(path, os.O_RDWR)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._used: set[int] = set()

    def _create(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._zeros(fd, 0)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._sync_dir()

    def _grow(self, have: int) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            self._zeros(fd, have, self.count * self.size)
        finally:
            os.close(fd)

    def _zeros(self, fd: int, start: int, end: int | None = None) -> None:
        """Write the pool's blocks from *start* to *end* (written, not sparse: a slot write
        must never be the one that finds the disk full) and flush them."""
        zeros = bytes(1024 * 1024)
        total = self.count * self.size if end is None else end
        for pos in range(start, total, len(zeros)):
            os.pwrite(fd, zeros[: min(len(zeros), total - pos)], pos)
        os.fsync(fd)

    def _grow_more(self) -> None:
        """Background: add grow_by slots at the end of the pool (the others keep working)."""
        try:
            with self._lock:
                old = self.count
            new = min(self.max_count, old + self.grow_by)
            fd = os.open(self.path, os.O_WRONLY)
            try:
                self._zeros(fd, old * self.size, new * self.size)
            finally:
                os.close(fd)
            with self._lock:
                self.count = new
                self._free.extend(range(new - 1, old - 1, -1))  # take() pops: low ones first
            log.info("journal slot pool grown to %d slots", new)
        except OSError as exc:
            log.warning("journal slot pool cannot grow: %s", exc)
        finally:
            with self._lock:
                self._growing = False

    def _sync_dir(self) -> None:
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @property
    def capacity(self) -> int:
        """Body and record bytes one slot holds."""
        return self.size - HEAD_LEN

    def offset(self, slot: int) -> int:
        """Where the body of *slot* starts in the pool file."""
        return slot * self.size + HEAD_LEN

    # --- the free list -------------------------------------------------------------------

    def take(self) -> int | None:
        """A free slot; None when all are taken (the pool then grows, for the next ones)."""
        with self._lock:
            if not self._free:
                if not self._growing and self.count < self.max_count:
                    self._growing = True
                    threading.Thread(target=self._grow_more, name="slot-pool", daemon=True).start()
                return None
            slot = self._free.pop()
            self._used.add(slot)
            return slot

    def give_back(self, slot: int) -> None:
        with self._lock:
            if slot in self._used:
                self._used.discard(slot)
                self._free.append(slot)

    # --- reading and writing (blocking) ------------------------------------------------

    def write(self, slot: int, seq: int, generation: int, body: bytes, record: bytes) -> None:
        """Write an entry into *slot*, not flushed: the journal's group commit (commits.py)
        flushes the pool for many writes at once."""
        if len(body) + len(record) > self.capacity:
            raise ValueError("entry does not fit a slot")
        digest = hashlib.sha256(body + record).digest()
        head = _HEAD.pack(MAGIC, seq, generation, len(body), len(record), digest)
        os.pwrite(self.fd, head + body + record, slot * self.size)

    def flush(self) -> None:
        """Make every write so far durable: data only, the pool's size and blocks never change."""
        os.fdatasync(self.fd)

    def clear(self, slot: int) -> None:
        """Free *slot* on disk (not flushed) and in the free list."""
        os.pwrite(self.fd, bytes(len(MAGIC)), slot * self.size)
        self.give_back(slot)

    def scan(self) -> list[SlotRecord]:
        """Every valid entry; fills the free list with the other slots."""
        found: list[SlotRecord] = []
        free: list[int] = []
        for slot in range(self.count):
            raw = os.pread(self.fd, self.size, slot * self.size)
            entry = self._parse(slot, raw)
            if entry is None:
                free.append(slot)
            else:
                found.append(entry)
        with self._lock:
            self._free = free[::-1]  # take() pops: low slots first
            self._used = {e.slot for e in found}
        return found

    @staticmethod
    def _parse(slot: int, raw: bytes) -> SlotRecord | None:
        if raw[: len(MAGIC)] != MAGIC:
            return None
        magic, seq, generation, body_len, rec_len, digest = _HEAD.unpack(raw[:HEAD_LEN])
        end = HEAD_LEN + body_len + rec_len
        if end > len(raw):
            return None
        if hashlib.sha256(raw[HEAD_LEN:end]).digest() != digest:
            log.info("journal: ignoring a slot torn by a crash")
            return None
        try:
            record = json.loads(raw[HEAD_LEN + body_len : end])
        except ValueError:
            return None
        return SlotRecord(slot, seq, generation, body_len, record)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
