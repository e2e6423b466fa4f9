"""The reader's single-flight fetches (cache/reader.py), without a mount: readers of the same
chunks share one download, and what that download ends with is what each of them gets."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from s3cryptfs.cache.blocks import BlockCache
from s3cryptfs.cache.reader import Reader, Version
from s3cryptfs.errors import (
    AccessDenied,
    IntegrityError,
    KeyRetired,
    ObjectNotFound,
    TransientStoreError,
)
from s3cryptfs.format.layout import PlainCipher

BODY = bytes(range(256)) * 16


def plain_version(fetch) -> Version:
    return Version(
        vid="v1",
        name="vol/file",
        plain_size=len(BODY),
        body_size=len(BODY),
        fetch=fetch,
        make_cipher=lambda header: PlainCipher(),
        cipher=PlainCipher(),
        header_len=0,
    )


async def read_into(reader: Reader, version: Version, results: list) -> None:
    try:
        results.append(await reader.read(version, 0, 100))
    except Exception as exc:  # noqa: BLE001 - the test looks at what each reader got
        results.append(exc)


@pytest.mark.parametrize(
    "error",
    [
        ObjectNotFound("vol/file: no such key"),
        TransientStoreError("get vol/file: 503 SlowDown"),
        AccessDenied("get vol/file: 403"),
        KeyRetired("key version 3 is retired"),
        IntegrityError("vol/file: chunk 0 does not authenticate"),
        OSError(5, "Input/output error"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_reader_that_joined_a_fetch_gets_its_error(error):
    calls = []
    release = threading.Event()

    def fetch(start: int, end: int) -> bytes:
        calls.append((start, end))
        release.wait(10)
        raise error

    reader = Reader(BlockCache(1 << 20), trio.CapacityLimiter(4))
    version = plain_version(fetch)
    results: list = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_into, reader, version, results)
            await trio.testing.wait_all_tasks_blocked()  # the first one is fetching
            nursery.start_soon(read_into, reader, version, results)
            await trio.testing.wait_all_tasks_blocked()  # the second one waits on it
            release.set()

    trio.run(main)
    assert len(calls) == 1  # one download for both
    assert len(results) == 2
    for got in results:
        assert type(got) is type(error)  # not IntegrityError whatever happened
        assert str(got) == str(error)
    assert results[0] is not results[1]  # each reader raises its own


def test_a_reader_whose_fetch_was_cancelled_leaves_the_others_to_fetch_again():
    calls = []
    limiter = trio.CapacityLimiter(1)

    def fetch(start: int, end: int) -> bytes:
        calls.append((start, end))
        return BODY[start : end + 1]

    reader = Reader(BlockCache(1 << 20), limiter)
    version = plain_version(fetch)
    results: list = []

    async def main() -> None:
        holder = object()
        await limiter.acquire_on_behalf_of(holder)  # the first fetch waits for a thread
        async with trio.open_nursery() as outer:
            first_scope = trio.CancelScope()

            async def first_reader() -> None:
                with first_scope:
                    await reader.read(version, 0, 100)

            outer.start_soon(first_reader)
            await trio.testing.wait_all_tasks_blocked()
            outer.start_soon(read_into, reader, version, results)
            await trio.testing.wait_all_tasks_blocked()
            first_scope.cancel()  # its reader went away before the fetch began
            await trio.testing.wait_all_tasks_blocked()
            limiter.release_on_behalf_of(holder)

    trio.run(main)
    assert results == [BODY[:100]]
    assert len(calls) == 1  # the cancelled one never fetched; the joiner did


def _sized_version(size: int, fetches: list[tuple[int, int]]) -> Version:
    body = bytes(i % 251 for i in range(size))

    def fetch(start: int, end: int) -> bytes:
        fetches.append((start, end))
        return body[start : end + 1]

    return Version(
        vid="big",
        name="vol/big",
        plain_size=size,
        body_size=size,
        fetch=fetch,
        make_cipher=lambda header: PlainCipher(),
        cipher=PlainCipher(),
        header_len=0,
    )


def test_a_long_sequential_read_does_not_take_the_whole_block_cache():
    """Scan resistance: past half the budget, what a sequential run has read whole leaves
    the cache (the kernel's page cache has it); a short run keeps its chunks."""
    from s3cryptfs.cache.reader import ReadState

    chunk = PlainCipher.chunk_size
    cache = BlockCache(8 * chunk)
    reader = Reader(cache, trio.CapacityLimiter(4))
    fetches: list[tuple[int, int]] = []
    big = _sized_version(32 * chunk, fetches)
    step = 128 * 1024

    async def read_all(version: Version, upto: int) -> bytes:
        state = ReadState()
        parts = [await reader.read(version, off, step, state) for off in range(0, upto, step)]
        return b"".join(parts)

    async def main() -> None:
        # A run of 3 chunks: under half the budget, kept; read again without a fetch.
        got = await read_all(big, 3 * chunk)
        assert got == bytes(i % 251 for i in range(3 * chunk))
        assert cache.used >= 3 * chunk  # (fetched in groups: maybe a chunk more)
        before = len(fetches)
        assert await read_all(big, 3 * chunk) == got
        assert len(fetches) == before
        # The whole file: it passes over the cache, which keeps none of what it read, the
        # chunks read before the run became long included.
        whole = await read_all(big, 32 * chunk)
        assert whole == bytes(i % 251 for i in range(32 * chunk))
        kept = [i for i in range(32) if cache.contains("big", i)]
        assert kept == [], kept

    trio.run(main)


def test_a_run_restarted_mid_group_does_not_fetch_its_group_again():
    """Past half the budget a run's chunks leave the cache as it reads them, the first of
    its current group included. When two of the kernel's reads arrive out of order the
    read-ahead starts over from the reader's position: it must look for the chunk there,
    not at the group's start (gone), or it fetches the whole group again."""
    from s3cryptfs.cache.reader import ReadState

    chunk = PlainCipher.chunk_size
    cache = BlockCache(8 * chunk)
    reader = Reader(
        cache,
        trio.CapacityLimiter(4),
        group_bytes=4 * chunk,
        readahead_max=8 * chunk,
        span_bytes=4 * chunk,
    )
    fetches: list[tuple[int, int]] = []
    big = _sized_version(64 * chunk, fetches)
    step = chunk // 4

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            state = ReadState()
            pos = 0
            while pos < 10 * chunk + 2 * step:  # past half the budget, mid-group, mid-chunk
                await reader.read(big, pos, step, state)
                pos += step
                await trio.testing.wait_all_tasks_blocked()
            # The kernel's next two reads, out of order: the later one first.
            await reader.read(big, pos + step, step, state)
            await reader.read(big, pos, step, state)
            await trio.testing.wait_all_tasks_blocked()
            before = len(fetches)
            # The two reads after them: the second continues a run again.
            for off in (pos + 2 * step, pos + 3 * step):
                got = await reader.read(big, off, step, state)
                await trio.testing.wait_all_tasks_blocked()
                assert got == bytes(i % 251 for i in range(off, off + step))
            here = (pos + 2 * step) // chunk * chunk
            refetched = [f for f in fetches[before:] if f[0] < here]
            assert refetched == [], f"fetched again behind the reader: {refetched}"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_block_cache_drops_a_version_whole_and_only_it():
    """drop() finds a version's chunks without a look at every cached chunk (its own index of
    them), and that index follows evictions and discards."""
    cache = BlockCache(budget=10 * 100)
    for i in range(4):
        cache.put("a", i, b"a" * 100)
        cache.put("b", i, b"b" * 100)
    cache.put("c", 0, b"c" * 400)  # over the budget: the oldest two (a 0, b 0) go
    assert not cache.contains("a", 0) and not cache.contains("b", 0)
    cache.discard("a", 1)
    cache.drop("a")
    assert [i for i in range(4) if cache.contains("a", i)] == []
    assert [i for i in range(4) if cache.contains("b", i)] == [1, 2, 3]
    assert cache.used == 3 * 100 + 400 and len(cache) == 4
    cache.drop("a")  # nothing left of it: nothing happens
    cache.drop("b")
    cache.drop("c")
    assert cache.used == 0 and len(cache) == 0 and not cache._held
