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
SLOT_COUNT = 256


@dataclass
class SlotRecord:
    slot: int
    seq: int
    generation: int
    body_len: int
    record: dict[str, Any]


class SlotPool:
    def __init__(self, path: str, count: int = SLOT_COUNT, size: int = SLOT_SIZE) -> None:
        self.path = path
        self.count = count
        self.size = size
        if not os.path.exists(path) or os.path.getsize(path) != count * size:
            self._create()
        self.fd = os.open(path, os.O_RDWR)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._used: set[int] = set()

    def _create(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            zeros = bytes(1024 * 1024)
            total = self.count * self.size
            for pos in range(0, total, len(zeros)):
                os.write(fd, zeros[: min(len(zeros), total - pos)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
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
        with self._lock:
            if not self._free:
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
