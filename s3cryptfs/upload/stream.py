"""Streaming upload: a large file written from start to end is sealed and sent while it is written.

Without it, copying 1 GiB into the mount writes the plaintext write-back file, seals all of it into
the journal at close (a second GiB of disk writes, then an fsync), and only then starts the upload,
the slowest step. With it, every part of plaintext the writer has moved past is sealed into the
journal body, flushed to disk, and sent as one part of a multipart upload right away; close seals
only the tail.

The journal does not change: close still commits a complete ciphertext body and its record, so
crash recovery, conflict copies and retries all work from the body. The multipart upload is only
a head start, completed by the uploader when the version's turn comes (with the usual conditional
write), and abandoned (aborted) at the first sign of trouble: a write behind the sealed point, a
truncate, a rename or unlink, a change of metadata, a failed completion.

A stream never seals a chunk twice with different plaintext under its key: the plaintext it has
started to seal is frozen, and a write into the frozen part drops the stream (and its key) first.

Once a part is sealed, its plaintext is cut out of the write-back file (a punched hole): the
body holds it, encrypted. Keeping a second copy would cost a gigabyte of page cache per
gigabyte written, and fresh page-cache pages can be the most expensive part of a copy (each
is allocated and zeroed, and in a virtual machine may cost a fault to its host), while pages
freed by the cut are reused by the next writes at a fraction of that. Reads of the cut range
decrypt the body (read_through); a dropped stream first puts the plaintext back (give_back);
after a streamed commit the file system reads it from the committed version.

Better still, once the writer appends at a part boundary, its writes skip the write-back file:
the stream takes them into part-sized buffers in memory (absorb) and seals from there, so the
plaintext never goes through the page cache at all (a write and a read of a GiB saved, about a
quarter of the mount's CPU for a large copy). Only plain appends are taken. Anything else (a
write elsewhere, too many parts waiting for the sealer, close, a drop) first spills the
buffers into the write-back file, which is then as if the stream had never held them.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import trio

from s3cryptfs.codec import ObjectCodec
from s3cryptfs.format import metadata as md
from s3cryptfs.format import v1
from s3cryptfs.store.base import ObjectStore
from s3cryptfs.store.base import conditions as write_conditions

log = logging.getLogger(__name__)

MAX_PARTS = 10000  # S3's limit; a longer file stops streaming and is uploaded at close
KEEP_IN_MEMORY = 2  # sealed parts waiting to be sent that stay in memory (others: re-read)
# Appended parts held in memory for the sealer; beyond, writes wait for it (or spill to disk).
# The part being filled and the one being sealed: with more, a copy's peak memory grew by
# the extra parts and it went no faster (the sealer keeps up; the upload is the slow end).
ABSORB_PARTS = 2


_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sync_file_range.argtypes = [
                ctypes.c_int,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_uint,
            ]
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk without waiting (Linux sync_file_range), so the
    fsync at close has only the tail left; a no-op where the call is missing."""
    libc = _load_libc()
    if libc:
        libc.sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a range of a file without changing its size; False where that is unsupported."""
    libc = _load_libc()
    if not libc:
        return False
    return bool(libc.fallocate(fd, _FALLOC_PUNCH, offset, length) == 0)


def _let_go(path: str, offset: int, length: int) -> None:
    """Drop a written range of a file from the page cache (it is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def part_plain_size(chunk_size: int, part_size: int) -> int:
    """Plaintext per part: whole chunks, at least *part_size* bytes of ciphertext's worth."""
    return chunk_size * max(1, -(-part_size // chunk_size))


class Phase(enum.Enum):
    """Where a streamed upload is."""

    STARTING = "starting"  # creating the multipart upload and the body file
    RUNNING = "running"  # sealing parts the writer moved past, and sending them
    CLOSING = "closing"  # the file is being closed: the sealer stops, the tail is sealed next
    SEALED = "sealed"  # the whole body is sealed: the uploader completes the upload
    DROPPED = "dropped"  # abandoned: the file is sealed and uploaded whole at close


PHASES: dict[Phase, set[Phase]] = {
    Phase.STARTING: {Phase.RUNNING, Phase.CLOSING, Phase.DROPPED},
    Phase.RUNNING: {Phase.CLOSING, Phase.DROPPED},
    Phase.CLOSING: {Phase.SEALED, Phase.DROPPED},
    Phase.SEALED: {Phase.DROPPED},  # a journal record that could not be written
    Phase.DROPPED: set(),
}


class Stream:
    """One version of one file, sealed part by part under one data key while it is written."""

    def __init__(
        self,
        *,
        key: str,
        seq: int,
        body_path: str,
        staging_fd: int,
        written: Callable[[], int],
        codec: ObjectCodec,
        store: ObjectStore,
        attrs: md.PosixAttrs,
        xattrs: dict[bytes, bytes] | None = None,
        part_size: int,
        concurrency: int,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.key = key
        self.seq = seq
        self.body_path = body_path
        self._staging_fd = staging_fd
        self._written = written  # the file's current plaintext size
        self._codec = codec
        self._store = store
        # The data key's envelope is fixed when the upload is created, and so is the metadata:
        # mode and owner as they are now; no mtime, which is not known before the last write
        # (readers fall back to the object's Last-Modified; our mounts keep the exact one in the
        # directory index).
        self.attrs = md.PosixAttrs(attrs.mode, attrs.uid, attrs.gid, None, atime_ns=attrs.atime_ns)
        self.xattrs = dict(xattrs or {})  # the file's extended attributes, sealed in it too
        self.chunk_size = codec.chunk_size
        self.part_plain = part_plain_size(self.chunk_size, part_size)
        self._chunks_per_part = self.part_plain // self.chunk_size
        self.part_body = self.part_plain + self._chunks_per_part * v1.TAG_LEN
        self._concurrency = max(1, concurrency)
        self._limiter = limiter
        self.state = Phase.STARTING
        self.frozen = 0  # plaintext [0, frozen) may no longer change
        self.sealed = 0  # plaintext [0, sealed) is in the body
        self.released = 0  # plaintext [0, released) is cut out of the write-back file
        self._cut_lock = threading.Lock()  # a cut, a read through it and its give-back
        self._can_cut = True
        self.parts: dict[int, str] = {}  # part number -> ETag, sent
        self.upload_id: str | None = None
        self.metadata: dict[str, str] | None = None
        self.cipher: v1.ChunkCipher | None = None
        self._body_fd = -1
        self._sending = 0
        self._held: dict[int, bytearray] = {}  # sealed parts not sent yet, kept in memory
        self._free: list[bytearray] = []  # part buffers to reuse
        self._plain_buf: bytearray | None = None
        # Appended plaintext held in memory instead of the write-back file: part index ->
        # buffer of that whole part's range, filled up to _append_at. Changed under _cut_lock
        # (readers look at it from worker threads) except that absorb fills buffers in place.
        self._mem: dict[int, bytearray] = {}
        self._append_at: int | None = None  # where the next absorbed write must start
        self._absorbing = True
        self._plain_free: list[bytearray] = []
        self._sealing: int | None = None  # part index the sealer is working on
        self.absorbed = 0  # bytes taken into memory
        self._freed = trio.Event()  # set when the sealer frees a buffer, or the state changes
        self._wake = trio.Event()
        self._kick = trio.Event()
        self._idle_scope: trio.CancelScope | None = None
        self._scope = trio.CancelScope()
        self._sealer_done = trio.Event()
        self.finished = trio.Event()  # run() returned: nothing of the stream is in flight
        self.sent_bytes = 0

    def _to(self, new: Phase) -> None:
        if new is not self.state and new not in PHASES[self.state]:
            raise AssertionError(f"stream of {self.key}: no transition {self.state} -> {new}")
        self.state = new

    # --- driven by the file system -------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.state in (Phase.STARTING, Phase.RUNNING)

    def wake(self) -> None:
        self._wake.set()

    def absorb(self, offset: int, data: bytes) -> bool:
        """Take an appending write into memory instead of the write-back file (from the trio
        loop). False: the caller writes it to the file, after spill() if holding() says so."""
        if not (self._absorbing and self.alive and self._can_cut):
            return False
        if self._append_at is None:
            # Start at a part boundary, so that every buffer covers a whole part.
            if offset % self.part_plain or offset != self._written():
                return False
            self._append_at = offset
        if offset != self._append_at:
            return False
        new = self._new_parts(offset, len(data))
        if new is None or len(self._mem) + len(new) > ABSORB_PARTS:
            return False  # the sealer is behind (see make_room): keep memory bounded
        for k in new:
            buf = self._plain_free.pop() if self._plain_free else bytearray(self.part_plain)
            with self._cut_lock:
                self._mem[k] = buf
        view, pos = memoryview(data), offset
        while view:
            k, at = divmod(pos, self.part_plain)
            n = min(len(view), self.part_plain - at)
            self._mem[k][at : at + n] = view[:n]
            view, pos = view[n:], pos + n
        self._append_at = offset + len(data)
        self.absorbed += len(data)
        return True

    def _new_parts(self, offset: int, size: int) -> list[int] | None:
        """Parts a write of [offset, offset + size) needs that no buffer holds yet; None if it
        reaches the parts the sealer leaves to close (S3's part limit)."""
        last = (offset + size - 1) // self.part_plain
        if last >= MAX_PARTS - 1:
            return None
        return [k for k in range(offset // self.part_plain, last + 1) if k not in self._mem]

    def _needs_room(self, offset: int, size: int) -> bool:
        if not (self._absorbing and self.state is Phase.RUNNING and offset == self._append_at):
            return False
        new = self._new_parts(offset, size)
        return new is not None and len(self._mem) + len(new) > ABSORB_PARTS

    async def make_room(self, offset: int, size: int) -> None:
        """Before absorb(): while the sealer works through the parts held, wait for it rather
        than give up memory for the write-back file. Only a running sealer is waited for (it
        needs no network); while the upload is being created, the writes spill instead."""
        while self._needs_room(offset, size):
            self._freed = trio.Event()
            await self._freed.wait()

    def _roomier(self) -> None:
        self._freed.set()

    def holding(self) -> bool:
        """Plaintext is held in memory: a write that absorb() refused must spill() first."""
        return bool(self._mem)

    def stop_absorbing(self) -> None:
        self._absorbing = False

    def spill(self) -> None:
        """Write the plaintext held in memory to the write-back file (blocking); absorb() must
        be off (stop_absorbing, or the stream no longer running)."""
        with self._cut_lock:
            for k in sorted(self._mem):
                if k == self._sealing:
                    continue  # the sealer finishes it, and writes it here if it cannot cut it
                buf = self._mem.pop(k)
                start = k * self.part_plain
                assert self._append_at is not None
                os.pwrite(self._staging_fd, memoryview(buf)[: self._append_at - start], start)
                self._give_plain(buf)

    def drop(self, why: str) -> None:
        """Abandon the stream; the file is sealed and uploaded at close as usual."""
        if self.state is Phase.DROPPED:
            return
        log.debug("streaming upload of %s dropped: %s", self.key, why)
        self._to(Phase.DROPPED)
        self._scope.cancel()
        self.wake()
        self._roomier()

    async def stop(self) -> bool:
        """At close: stop sealing in the background. True if the stream can be finished."""
        if self.alive:
            self._to(Phase.CLOSING)
            if self._idle_scope is not None:
                self._idle_scope.cancel()
            self.wake()
            self._roomier()
        await self._sealer_done.wait()
        return self.state is Phase.CLOSING and self.upload_id is not None

    def seal_rest(self, size: int) -> tuple[int, int]:
        """Seal plaintext [sealed, size) with the last-chunk flag, and make the body durable
        (blocking). Returns (plaintext size, body size)."""
        assert self.cipher is not None and self.state is Phase.CLOSING
        self.spill()  # the tail is read from the write-back file, which keeps it after close
        first = self.sealed // self.chunk_size
        count = v1.chunk_count(size, self.chunk_size)
        offset = v1.HEADER_LEN + first * (self.chunk_size + v1.TAG_LEN)
        for index in range(first, count):
            start = index * self.chunk_size
            plain = os.pread(self._staging_fd, min(self.chunk_size, size - start), start)
            sealed = self.cipher.seal(index, plain, index == count - 1)
            os.pwrite(self._body_fd, sealed, offset)
            offset += len(sealed)
        os.ftruncate(self._body_fd, offset)
        os.fsync(self._body_fd)
        self._to(Phase.SEALED)
        return size, offset

    def close_body(self) -> None:
        if self._body_fd >= 0:
            os.close(self._body_fd)
            self._body_fd = -1

    # --- the background task -------------------------------------------------------------
    #
    # Two loops share the task. The sealer seals every part the writer has moved past, as
    # soon as it can, so that close has only the tail left; at close it seals the remaining
    # whole parts and stops. The sender sends sealed parts in order, at most `concurrency` at
    # once, and goes on after close while the file is committed, so the upload never waits
    # for the seal. A part is sent from memory when the sealer kept it, else read back from
    # the body (still in the page cache): memory stays bounded when sealing runs ahead.

    async def run(self) -> None:
        try:
            with self._scope:
                try:
                    await self._start()
                    if self.state is Phase.STARTING:
                        self._to(Phase.RUNNING)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._sender)
                        try:
                            await self._sealer()
                        finally:
                            self._sealer_done.set()
                            self._kick_sender()
                finally:
                    self._sealer_done.set()
        except Exception as exc:  # noqa: BLE001 - the upload at close does it the usual way
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]
            log.warning("streaming upload of %s stopped (sent at close): %s", self.key, cause)
            if self.state is not Phase.SEALED:
                self._to(Phase.DROPPED)
        finally:
            self._sealer_done.set()
            self._roomier()
            if self.state is Phase.DROPPED:
                with trio.CancelScope(shield=True):
                    try:
                        await self.give_back()
                    except Exception as exc:  # noqa: BLE001 - the next give_back tries again
                        log.error("%s: cannot restore its write-back file yet: %s", self.key, exc)
                    if not self.released:  # else the body is what holds that plaintext
                        await self._discard_body()
                    await self._abort_upload()
            self.finished.set()

    async def _start(self) -> None:
        def prepare() -> None:
            header = v1.Header.new(self.chunk_size)
            dek, self.metadata = self._codec.new_key(self.attrs, self.key, self.xattrs)
            self.cipher = v1.ChunkCipher(dek, header)
            fd = os.open(self.body_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._body_fd = fd
            os.pwrite(fd, header.encode(), 0)

        await trio.to_thread.run_sync(prepare)
        assert self.metadata is not None
        meta = self.metadata
        self.upload_id = await trio.to_thread.run_sync(
            self._store.create_multipart, self.key, meta, limiter=self._limiter
        )

    def _full(self) -> bool:
        """A whole part beyond the sealed point is written, and a byte more (so it never holds
        the file's last chunk)."""
        full = self._written() > self.sealed + self.part_plain
        return full and self.sealed // self.part_plain < MAX_PARTS - 1

    async def _sealer(self) -> None:
        while True:
            while self.state is Phase.RUNNING and not self._full():
                with trio.CancelScope() as idle:  # stop() ends the wait
                    self._idle_scope = idle
                    self._wake = trio.Event()
                    await self._wake.wait()
                self._idle_scope = None
            if self.state not in (Phase.RUNNING, Phase.CLOSING) or not self._full():
                return
            index = self.sealed // self.part_plain
            self.frozen = self.sealed + self.part_plain
            self._sealing = index
            try:
                data = await trio.to_thread.run_sync(self._seal_part, index)
            finally:
                self._sealing = None
            self.sealed = self.frozen
            self._roomier()
            if len(self._held) < KEEP_IN_MEMORY:
                self._held[index + 1] = data
            else:
                self._recycle(data)  # sent from the body later
            self._kick_sender()

    def _room(self) -> bool:
        return self._sending < self._concurrency

    def _kick_sender(self) -> None:
        self._kick.set()

    async def _sender(self) -> None:
        number = 1
        async with trio.open_nursery() as sends:
            while True:
                # parts 1..(sealed // part_plain) are in the body
                while not (number <= self.sealed // self.part_plain and self._room()):
                    if self._sealer_done.is_set() and number > self.sealed // self.part_plain:
                        return
                    self._kick = trio.Event()
                    await self._kick.wait()
                self._sending += 1
                sends.start_soon(self._send, number, self._held.pop(number, None))
                number += 1

    def _seal_part(self, index: int) -> bytearray:
        """Seal plaintext part *index* (never the file's last chunk) into the body; returns the
        part's bytes (the header too, for the first). Chunks are read and sealed in place, one
        buffer each way: at a GiB a copy more or less is a CPU-second on a small machine."""
        assert self.cipher is not None
        start = index * self.part_plain
        with self._cut_lock:
            held = self._mem.get(index)
        if held is not None:
            plain = memoryview(held)
        else:
            if self._plain_buf is None:
                self._plain_buf = bytearray(self.part_plain)
            plain = memoryview(self._plain_buf)
            if os.preadv(self._staging_fd, [plain], start) != self.part_plain:
                raise OSError(f"write-back file shorter than expected at {start}")
        head = v1.HEADER_LEN if index == 0 else 0
        out = bytearray(head + self.part_body) if head else self._buffer()
        view = memoryview(out)
        if head:
            view[:head] = self.cipher.header.encode()
        first = index * self._chunks_per_part
        step, stride = self.chunk_size, self.chunk_size + v1.TAG_LEN
        for i in range(self._chunks_per_part):
            pos = head + i * stride
            self.cipher.seal_into(
                first + i, plain[i * step : (i + 1) * step], False, view[pos : pos + stride]
            )
        offset = v1.HEADER_LEN + index * self.part_body
        os.pwrite(self._body_fd, view[head:], offset)
        start_writeback(self._body_fd, offset, self.part_body)
        if held is not None:
            with self._cut_lock:
                del self._mem[index]
                if self.released == start:
                    self.released = start + self.part_plain  # it never was in the file
                else:  # the cut stopped before it: the file must hold it
                    os.pwrite(self._staging_fd, plain, start)
            self._give_plain(held)
        elif self._can_cut and self.released == start:
            with self._cut_lock:
                if punch_hole(self._staging_fd, start, self.part_plain):
                    self.released = start + self.part_plain
                else:
                    self._can_cut = False  # the cache directory's file system cannot
        return out

    # --- the cut plaintext ---------------------------------------------------------------

    def read_sealed(self, offset: int, size: int) -> bytes:
        """Plaintext [offset, offset + size) of the sealed part of the body (blocking)."""
        assert self.cipher is not None
        end = offset + size
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        stride = self.chunk_size + v1.TAG_LEN
        with open(self.body_path, "rb") as f:
            raw = os.pread(f.fileno(), (last - first + 1) * stride, v1.HEADER_LEN + first * stride)
        plain = b"".join(
            self.cipher.open(first + i, raw[i * stride : (i + 1) * stride], False)
            for i in range(last - first + 1)
        )
        skip = offset - first * self.chunk_size
        return plain[skip : skip + size]

    def read_through(self, offset: int, size: int) -> bytes:
        """Read the file being written: the cut range from the body, parts held in memory
        from there, the rest from the write-back file (blocking)."""
        with self._cut_lock:
            pieces: list[bytes] = []
            pos, end = offset, offset + size
            while pos < end:
                if pos < self.released:
                    piece = self.read_sealed(pos, min(end, self.released) - pos)
                else:
                    k, at = divmod(pos, self.part_plain)
                    held = self._mem.get(k)
                    if held is not None:
                        assert self._append_at is not None
                        stop = min(end, (k + 1) * self.part_plain, self._append_at)
                        piece = bytes(held[at : at + stop - pos])
                    else:
                        later = [j * self.part_plain for j in self._mem if j > k]
                        piece = os.pread(self._staging_fd, min([end, *later]) - pos, pos)
                if not piece:
                    break
                pieces.append(piece)
                pos += len(piece)
            return b"".join(pieces)

    def _restore(self) -> None:
        self.spill()
        with self._cut_lock:
            for start in range(0, self.released, self.part_plain):
                data = self.read_sealed(start, min(self.part_plain, self.released - start))
                os.pwrite(self._staging_fd, data, start)
            self.released = 0

    async def give_back(self) -> None:
        """After a drop: put the cut plaintext back into the write-back file, which is then
        whole again. Raises if it cannot (the body stays, and the next call tries again)."""
        await self._sealer_done.wait()  # nothing is cut or absorbed any more
        if self.released or self._mem:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._restore)

    def _give_plain(self, buf: bytearray) -> None:
        if len(self._plain_free) < 2:
            self._plain_free.append(buf)

    def _buffer(self) -> bytearray:
        try:
            return self._free.pop()  # atomic: the sealer and readers may race here
        except IndexError:
            return bytearray(self.part_body)

    def _read_part(self, number: int) -> bytearray:
        start, end = self._part_range(number, v1.HEADER_LEN + number * self.part_body)
        data = self._buffer() if end - start == self.part_body else bytearray(end - start)
        with open(self.body_path, "rb") as f:
            if os.preadv(f.fileno(), [data], start) != end - start:
                raise OSError(f"journal body shorter than expected at {start}")
        return data

    async def _upload_part(self, number: int, data: bytes | bytearray) -> None:
        assert self.upload_id is not None
        self.parts[number] = await trio.to_thread.run_sync(
            self._store.upload_part, self.key, self.upload_id, number, data, limiter=self._limiter
        )
        self.sent_bytes += len(data)

    async def _send(self, number: int, data: bytearray | None) -> None:
        try:
            if data is None:
                data = await trio.to_thread.run_sync(self._read_part, number)
            await self._upload_part(number, data)
        except Exception as exc:  # noqa: BLE001 - sent again from the body when completing
            log.info("part %d of %s will be sent again: %s", number, self.key, exc)
        finally:
            self._sending -= 1
            if isinstance(data, bytearray):
                self._recycle(data)
            self._kick_sender()
        # Sent: its pages can serve the next parts (reused pages are cheaper than fresh ones:
        # see the module's docstring).
        start, end = self._part_range(number, v1.HEADER_LEN + number * self.part_body)
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(_let_go, self.body_path, start, end - start)

    def _recycle(self, data: bytearray) -> None:
        # Part buffers are reused: a fresh 8 MiB buffer costs zeroing and page faults, which
        # for a GiB is most of a CPU-second.
        if len(data) == self.part_body and len(self._free) < self._concurrency + KEEP_IN_MEMORY:
            self._free.append(data)

    # --- finishing (the uploader) --------------------------------------------------------

    def _part_range(self, number: int, body_size: int) -> tuple[int, int]:
        start = 0 if number == 1 else v1.HEADER_LEN + (number - 1) * self.part_body
        return start, min(v1.HEADER_LEN + number * self.part_body, body_size)

    async def complete(
        self, body_path: str, body_size: int, if_match: str | None, if_none_match: bool
    ) -> str:
        """Send what is missing from the body and complete the upload; aborted on failure."""
        assert self.upload_id is not None and self.state is Phase.SEALED
        await self.finished.wait()
        count = max(1, -(-(body_size - v1.HEADER_LEN) // self.part_body))
        try:
            fd = os.open(body_path, os.O_RDONLY)
            try:

                async def send(number: int, gate: trio.Semaphore) -> None:
                    async with gate:
                        start, end = self._part_range(number, body_size)
                        data = await trio.to_thread.run_sync(os.pread, fd, end - start, start)
                        await self._upload_part(number, data)

                gate = trio.Semaphore(self._concurrency)
                async with trio.open_nursery() as nursery:
                    for number in range(1, count + 1):
                        if number not in self.parts:
                            nursery.start_soon(send, number, gate)
            finally:
                os.close(fd)
            parts = [(n, self.parts[n]) for n in range(1, count + 1)]
            conditions = write_conditions(if_match, if_none_match)
            etag: str = await trio.to_thread.run_sync(
                self._store.complete_multipart,
                self.key,
                self.upload_id,
                parts,
                conditions,
                limiter=self._limiter,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.abort()
            raise
        self.upload_id = None
        return etag

    async def abort(self) -> None:
        """Stop sending and abort the multipart upload (parts in flight land first, so that
        the abort leaves none behind)."""
        self._scope.cancel()
        await self.finished.wait()
        await self._abort_upload()

    async def discard(self) -> None:
        """Abort the upload and delete the body (after give_back, which needs it)."""
        await self.abort()
        if not self.released:
            await self._discard_body()

    async def _abort_upload(self) -> None:
        upload_id, self.upload_id = self.upload_id, None
        if upload_id is not None:
            await trio.to_thread.run_sync(self._store.abort_multipart, self.key, upload_id)

    async def _discard_body(self) -> None:
        self.close_body()
        with contextlib.suppress(FileNotFoundError):
            await trio.to_thread.run_sync(os.unlink, self.body_path)

    def usable_for(self, metadata: dict[str, str]) -> bool:
        """The entry may be finished through this stream: same metadata, upload still open."""
        sealed = self.state is Phase.SEALED and self.upload_id is not None
        return sealed and metadata == self.metadata
