"""Reads plaintext ranges of encrypted object versions through the block cache.

A version is one immutable encrypted body, in S3 (range GETs) or in the local journal (pread).
Fetches are aligned to groups of chunks, deduplicated while in flight, run in worker threads
(fetch and decrypt together), and sequential readers get a readahead window that doubles up to
a bound, is topped up a span at a time, and resets on a random access.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from s3cryptfs.cache.blocks import BlockCache
from s3cryptfs.errors import IntegrityError
from s3cryptfs.format import v1
from s3cryptfs.format.layout import BodyCipher

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class Version:
    """One encrypted body. *fetch(start, end)* returns body bytes [start, end] (blocking)."""

    vid: Hashable
    name: str  # for log lines: the object key
    plain_size: int
    body_size: int
    fetch: Callable[[int, int], bytes]
    make_cipher: Callable[[bytes], BodyCipher]  # header bytes -> cipher (may call a KMS)
    cipher: BodyCipher | None = None
    header_len: int = v1.HEADER_LEN  # bytes make_cipher needs from the start of the body

    @property
    def chunk_size(self) -> int:
        assert self.cipher is not None
        return self.cipher.chunk_size

    def chunks(self) -> int:
        assert self.cipher is not None
        return self.cipher.chunk_count(self.plain_size)


@dataclass
class ReadState:
    """Per open handle: where the last read ended and how far ahead to fetch."""

    next_offset: int = -1
    window: int = 0
    ahead_to: int = 0  # readahead has been started up to here
    streamed: int = 0  # bytes read in one sequential run (see Reader._pass_over)


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    blocks: dict[int, bytes] | None = None
    error: BaseException | None = None


class Reader:
    def __init__(
        self,
        cache: BlockCache,
        limiter: trio.CapacityLimiter,
        # Few, large requests: per-request overhead (signing, parsing, a round trip) is what
        # bounds a cold sequential read. The price is that a cold random small read fetches a
        # whole group.
        group_bytes: int = 2 * 1024 * 1024,
        readahead_max: int = 32 * 1024 * 1024,
        span_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.cache = cache
        self.limiter = limiter
        self.group_bytes = group_bytes
        self.readahead_max = readahead_max
        self.span_bytes = span_bytes
        self._flights: dict[tuple[Hashable, int], _Flight] = {}
        self.nursery: trio.Nursery | None = None  # prefetches run here while run() runs

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery read-ahead tasks run in, until cancelled (the mount's lifetime).
        Without it (offline tools), reads simply do not prefetch."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.nursery = None

    def _group_len(self, version: Version) -> int:
        return max(1, self.group_bytes // version.chunk_size)

    async def _ensure_cipher(self, version: Version) -> None:
        if version.cipher is not None:
            return

        def load() -> BodyCipher:
            if version.header_len == 0:
                return version.make_cipher(b"")
            return _retry_uncached(
                version, 0, version.header_len - 1, lambda data: version.make_cipher(data)
            )

        cipher = await trio.to_thread.run_sync(load, limiter=self.limiter)
        # Kept only once the size is accepted: a cipher refusing the body (too short, too
        # large to fetch) must refuse the next read too, not be found ready.
        expected = cipher.plain_size_of(version.body_size)
        version.cipher = cipher
        if expected != version.plain_size:
            version.plain_size = expected

    def open_whole(self, version: Version, body: bytes) -> tuple[BodyCipher, dict[int, bytes]]:
        """Blocking: *version*'s cipher, made from the header in its whole *body* (fetched
        in one request, vfs/smallfiles.py), and every chunk of it decrypted, for install().
        IntegrityError (and the KMS's errors) when it does not open."""
        if len(body) != version.body_size:
            raise IntegrityError(f"{version.name}: object is not its listed size")
        cipher = version.make_cipher(body[: version.header_len])
        plain_size = cipher.plain_size_of(len(body))
        total = cipher.chunk_count(plain_size)
        if total == 0:
            return cipher, {}
        start, end = cipher.span(0, total - 1, len(body))
        chunks = cipher.open_range(0, body[start : end + 1], total)
        return cipher, dict(enumerate(chunks))

    def install(self, version: Version, cipher: BodyCipher, blocks: dict[int, bytes]) -> None:
        """What open_whole() gave, for *version* or another view of the same object version
        (same vid): its reads send nothing."""
        version.plain_size = cipher.plain_size_of(version.body_size)
        version.cipher = cipher
        for index, block in blocks.items():
            self.cache.put(version.vid, index, block)

    def _fetch_group(
        self, version: Version, group: int, header_checked: bool = False, count: int = 1
    ) -> dict[int, bytes]:
        """Blocking: fetch and decrypt *count* consecutive groups of chunks in one request."""
        glen = self._group_len(version)
        first = group * glen
        last = min(first + glen * count, version.chunks()) - 1
        try:
            return self._fetch_chunks(version, first, last)
        except IntegrityError:
            invalidate = getattr(version.fetch, "invalidate", None)
            hlen = version.header_len
            if header_checked or not hlen or invalidate is None or not invalidate(0, hlen - 1):
                raise
        # The chunks are fine in S3 but the cached header was not: start again from S3's.
        version.cipher = version.make_cipher(version.fetch(0, hlen - 1))
        return self._fetch_group(version, group, header_checked=True, count=count)

    async def _group(self, version: Version, group: int) -> dict[int, bytes]:
        key = (version.vid, group)
        while (joined := self._flights.get(key)) is not None:
            await joined.done.wait()
            if joined.blocks is not None:
                return joined.blocks
            if isinstance(joined.error, Exception):
                # The same failure for every reader that waited on it: its kind is what the
                # application sees (a deleted object is ENOENT, an outage EIO).
                raise _again(joined.error) from joined.error
            # Cancelled (its reader went away, or the mount stops): not a failure of the
            # fetch. Fetch again, or join whoever started to meanwhile.
        flight = _Flight()
        self._flights[key] = flight
        try:
            blocks: dict[int, bytes] = await trio.to_thread.run_sync(
                self._fetch_group, version, group, limiter=self.limiter
            )
            for index, block in blocks.items():
                self.cache.put(version.vid, index, block)
            flight.blocks = blocks
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return blocks

    async def read(
        self, version: Version, offset: int, size: int, state: ReadState | None = None
    ) -> bytes:
        await self._ensure_cipher(version)
        if offset >= version.plain_size or size <= 0:
            return b""
        end = min(offset + size, version.plain_size)
        cipher = version.cipher
        assert cipher is not None
        first, last = cipher.chunk_of(offset), cipher.chunk_of(end - 1)
        blocks: dict[int, bytes] = {}
        missing_groups: set[int] = set()
        glen = self._group_len(version)
        for index in range(first, last + 1):
            block = self.cache.get(version.vid, index)
            if block is None:
                missing_groups.add(index // glen)
            else:
                blocks[index] = block
        if missing_groups and self._random(offset, state):
            # A cold random read: only its chunks, not a whole group it will not use.
            found = await trio.to_thread.run_sync(
                self._fetch_chunks, version, first, last, limiter=self.limiter
            )
            for index, block in found.items():
                self.cache.put(version.vid, index, block)
            blocks.update(found)
            missing_groups.clear()
        if missing_groups:
            results: list[dict[int, bytes]] = []
            errors: list[BaseException] = []

            async def one(g: int) -> None:
                try:
                    results.append(await self._group(version, g))
                except Exception as exc:  # noqa: BLE001 - re-raised below, first one wins
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for g in sorted(missing_groups):
                    nursery.start_soon(one, g)
            if errors:
                raise errors[0]
            for found in results:
                for index, block in found.items():
                    if first <= index <= last:
                        blocks[index] = block
        if state is not None:
            self._readahead(version, offset, end, state)
            self._pass_over(version, offset, end, state)
        data = b"".join(blocks[i] for i in range(first, last + 1))
        skip = offset - cipher.chunk_start(first)
        return data[skip : skip + (end - offset)]

    def _pass_over(self, version: Version, offset: int, end: int, state: ReadState) -> None:
        """Scan resistance: once a sequential run has read more than half the cache's budget,
        the chunks it has read whole leave the cache, and from then on each as it is read
        past. The kernel's page cache holds them now, and a `cat` of a big file would
        otherwise push out every other file's chunks and keep the budget's worth of memory
        in use after it (a copy right after it then peaked above the mount's usual
        footprint). Shorter runs, small files and random reads keep their chunks."""
        if not state.window:  # (not a continuation: _readahead has just set it)
            state.streamed = end - offset  # a run may start with this read
            return
        half = self.cache.budget // 2
        crossing = state.streamed <= half
        state.streamed += end - offset
        if state.streamed <= half:
            return
        cipher = version.cipher
        assert cipher is not None
        # The run has read [end - streamed, end) in order: the chunks wholly inside it that
        # this read touched (reads are often smaller than a chunk). The read that makes it a
        # long run takes what the run read before it too: kept, that half budget would stay
        # in memory after a `cat` of a big file, under the next transfer's buffers.
        run_start = end - state.streamed
        first = cipher.chunk_of(run_start if crossing else offset)
        last = cipher.chunk_of(end - 1)
        if cipher.chunk_start(first) < run_start:
            first += 1
        if end < min(cipher.chunk_start(last + 1), version.plain_size):
            last -= 1  # its end is still to be read
        for index in range(first, last + 1):
            self.cache.discard(version.vid, index)

    def _random(self, offset: int, state: ReadState | None) -> bool:
        # A handle's first read counts as random unless it starts the file: sequential
        # readers mostly do. After that, only a jump of more than a group: the kernel sends
        # a sequential reader's reads several at a time, and they may arrive out of order.
        if state is None:
            return False
        if state.next_offset < 0:
            return offset != 0
        return abs(offset - state.next_offset) > self.group_bytes

    def _fetch_chunks(self, version: Version, first: int, last: int) -> dict[int, bytes]:
        """Blocking: fetch and decrypt chunks *first*..*last* in one ranged GET."""
        cipher = version.cipher
        assert cipher is not None
        total = version.chunks()
        start, end = cipher.span(first, last, version.body_size)

        def open_all(data: bytes) -> dict[int, bytes]:
            if len(data) != end - start + 1:
                raise IntegrityError(
                    f"{version.name}: object is shorter than its listed size (truncated?)"
                )
            return dict(enumerate(cipher.open_range(first, data, total), start=first))

        return _retry_uncached(version, start, end, open_all)

    def _readahead(self, version: Version, offset: int, end: int, state: ReadState) -> None:
        if offset == state.next_offset:
            state.window = min(max(state.window * 2, self.group_bytes), self.readahead_max)
        else:
            state.window = state.ahead_to = 0
        state.next_offset = end
        if not state.window or self.nursery is None or end >= version.plain_size:
            return
        cipher = version.cipher
        assert cipher is not None
        target = min(end + state.window, version.plain_size)
        start = max(end, state.ahead_to)
        # Top the window up only once a whole span (or half the window) is missing: sliding it
        # by each read would send one small GET per read, and per-request overhead (signing,
        # parsing: milliseconds of CPU in botocore) would cap sequential reads well below what
        # the server delivers.
        if target - start < min(self.span_bytes, state.window // 2, version.plain_size - start):
            return
        state.ahead_to = target
        glen = self._group_len(version)
        first_group = cipher.chunk_of(start) // glen
        last_group = cipher.chunk_of(target - 1) // glen
        span = max(1, self.span_bytes // self.group_bytes)
        run: list[int] = []
        # Whether a group is here already: its first chunk, or for the group the window
        # starts in, the chunk there (a long run's chunks behind the reader left the cache,
        # _pass_over, and a window started over mid-group would fetch the group again).
        first_chunk = cipher.chunk_of(start)
        for g in range(first_group, last_group + 1):
            probe = max(g * glen, first_chunk)
            busy = (version.vid, g) in self._flights or self.cache.contains(version.vid, probe)
            if not busy:
                run.append(g)
            if run and (busy or len(run) == span or g == last_group):
                self.nursery.start_soon(self._prefetch_run, version, run[0], len(run))
                run = []

    async def _prefetch_run(self, version: Version, group: int, count: int) -> None:
        flights = {}
        for g in range(group, group + count):
            if (version.vid, g) in self._flights:  # started meanwhile: fetch no further
                break
            flights[g] = self._flights[(version.vid, g)] = _Flight()
        if not flights:
            return
        glen = self._group_len(version)
        try:
            blocks = await trio.to_thread.run_sync(
                self._fetch_group, version, group, False, len(flights), limiter=self.limiter
            )
            for index, block in blocks.items():
                self.cache.put(version.vid, index, block)
            for g, flight in flights.items():
                flight.blocks = {i: b for i, b in blocks.items() if i // glen == g}
        except Exception as exc:  # noqa: BLE001 - a prefetch failing is not a read failing
            log.debug("readahead of %s failed: %s", version.name, exc)
            for flight in flights.values():
                flight.error = exc
        finally:
            for g, flight in flights.items():
                del self._flights[(version.vid, g)]
                flight.done.set()

    def forget(self, version: Version) -> None:
        self.cache.drop(version.vid)


def _again(exc: Exception) -> Exception:
    """*exc* for one more reader to raise: the same kind and message, with a traceback of its
    own (one exception object raised by several tasks would collect all their frames)."""
    try:
        return copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied is raised as it is
        return exc


def _retry_uncached(version: Version, start: int, end: int, use: Callable[[bytes], T]) -> T:
    """use(fetch(start, end)); if the bytes came from a local cache and do not authenticate,
    drop them and try once more with bytes from S3."""
    data = version.fetch(start, end)
    try:
        return use(data)
    except IntegrityError:
        invalidate = getattr(version.fetch, "invalidate", None)
        if invalidate is None or not invalidate(start, end):
            raise
    return use(version.fetch(start, end))
