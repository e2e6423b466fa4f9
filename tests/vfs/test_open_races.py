"""Requests on one file that overlap in the mount (two processes, or a process and the
mount's own background work): an answer S3 gives one of them must not undo what another did
meanwhile. Each test holds one request at a chosen S3 call (FaultyStore.hold) while another
runs, then lets it go."""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import trio

from s3cryptfs.errors import S3CryptFSError
from tests.vfs.harness import CoreDriver
from tests.vfs.test_write_states import wait_for


def keys_in_s3(driver: CoreDriver, prefix: str = "vol/") -> list[str]:
    client = driver.core.store._client
    found = client.list_objects_v2(Bucket=driver.core.url.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in found.get("Contents", []) if "/.s3cryptfs/" not in o["Key"])


async def _until_arrived(store: Any, what: str) -> None:
    await trio.to_thread.run_sync(wait_for, lambda: what in store.arrived)


def test_a_truncating_open_that_meets_a_delete_found_by_another_open_keeps_its_data(
    driver: CoreDriver,
) -> None:
    """`echo new > t` and `cat t` open a file another machine deleted: the reader's look
    finds it gone while the writer's is out. The writer's open makes the file anew (as when
    its own look finds it gone), and what it writes and closes reaches S3."""
    fs, store = driver.fs, driver.core.store
    driver.write_file("t.bin", os.urandom(1_500_000))
    wait_for(lambda: not fs.uploader.pending)
    node = driver._lookup("t.bin")
    store.delete("vol/t.bin")  # another machine
    gate = store.hold("head", "vol/t.bin", times=1)
    out: dict[str, Any] = {}

    async def scenario() -> None:
        async def writer() -> None:
            out["w"] = (await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC))[0]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await _until_arrived(store, "head vol/t.bin")
            try:
                await fs.open(node.ino, os.O_RDONLY)
            except S3CryptFSError as exc:
                out["r"] = exc
            gate.set()

    driver.core.call(scenario)
    assert isinstance(out.get("r"), S3CryptFSError)  # the reader: the file is gone
    driver.write_at(out["w"].fh, 0, b"new content")
    driver.close(out["w"].fh)
    wait_for(lambda: not fs.uploader.pending)
    assert keys_in_s3(driver) == ["vol/t.bin"]
    assert driver.read_file("t.bin") == b"new content"


def test_an_open_whose_look_was_out_during_a_rename_keeps_the_renamed_file(
    driver: CoreDriver,
) -> None:
    """An open asks S3 for a file while `mv src dst` renames it: not found under the old name
    says nothing of the file, which is at dst; the open asks there. Neither that open, nor a
    writer that had the file open before, loses it."""
    fs, store = driver.fs, driver.core.store
    data = os.urandom(1_500_000)  # over the size fetched whole: the open HEADs
    driver.write_file("src.bin", data)
    wait_for(lambda: not fs.uploader.pending)
    node = driver._lookup("src.bin")
    writer = driver.open("src.bin", os.O_WRONLY)  # a log writer, nothing written yet
    gate = store.hold("head", "vol/src.bin", times=1)
    out: dict[str, Any] = {}

    async def scenario() -> None:
        async def opener() -> None:
            try:
                out["open"] = (await fs.open(node.ino, os.O_RDONLY))[0]
            except S3CryptFSError as exc:
                out["open"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(opener)
            await _until_arrived(store, "head vol/src.bin")
            await fs.rename(1, "src.bin", 1, "dst.bin", 0)
            gate.set()

    driver.core.call(scenario)
    assert not isinstance(out["open"], Exception), out["open"]
    driver.core.call(fs.release, out["open"].fh)
    assert not node.unlinked and node.path == "dst.bin"
    assert driver.read_file("dst.bin") == data
    driver.write_at(writer, 0, b"APPENDED")
    driver.close(writer)
    wait_for(lambda: not fs.uploader.pending)
    assert keys_in_s3(driver) == ["vol/dst.bin"]
    assert driver.read_file("dst.bin") == b"APPENDED" + data[8:]


def _hold_seals(driver: CoreDriver) -> tuple[threading.Event, threading.Event]:
    """Hold the next seal in its worker thread: (started, go)."""
    writes = driver.fs.writes
    started, go = threading.Event(), threading.Event()
    seal = writes._commit_sealed

    def held(*args: Any) -> Any:
        started.set()
        go.wait(30)
        return seal(*args)

    writes._commit_sealed = held  # type: ignore[method-assign]
    return started, go


def _close_during_rename(driver: CoreDriver, fh: int) -> None:
    """The file's close (FLUSH) is sealing in a worker thread when `mv a.bin b.bin` comes."""
    fs = driver.fs
    started, go = _hold_seals(driver)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.flush, fh)
            await trio.to_thread.run_sync(started.wait, 30)
            nursery.start_soon(fs.rename, 1, "a.bin", 1, "b.bin", 0)
            await trio.sleep(0.3)
            go.set()
        await fs.release(fh)

    driver.core.call(scenario)


def test_a_rename_during_the_close_of_a_new_file_moves_what_was_closed(
    driver: CoreDriver,
) -> None:
    fs = driver.fs
    data = os.urandom(200_000)  # sealed in a worker thread
    fh = driver.core.call(fs.create, 1, "a.bin", 0o100644, os.getuid(), 0).fh
    driver.write_at(fh, 0, data)
    _close_during_rename(driver, fh)
    wait_for(lambda: not fs.uploader.pending)
    assert keys_in_s3(driver) == ["vol/b.bin"]
    assert driver.read_file("b.bin") == data


def test_a_rename_during_the_close_of_a_rewritten_file_moves_what_was_closed(
    driver: CoreDriver,
) -> None:
    fs = driver.fs
    driver.write_file("a.bin", b"old " * 50_000)
    wait_for(lambda: not fs.uploader.pending)
    fh = driver.open("a.bin", os.O_RDWR | os.O_TRUNC)
    new = os.urandom(200_000)
    driver.write_at(fh, 0, new)
    _close_during_rename(driver, fh)
    wait_for(lambda: not fs.uploader.pending)
    assert keys_in_s3(driver) == ["vol/b.bin"]
    assert driver.read_file("b.bin") == new
    assert fs.uploader.conflicts == 0


def test_a_chmod_during_a_close_is_in_s3_after_it(driver: CoreDriver) -> None:
    """`chmod 600` from another process while the file's close is sealing: the change, left
    to that commit (which had taken the attributes already), is in the next version."""
    fs = driver.fs
    fh = driver.core.call(fs.create, 1, "m.bin", 0o100644, os.getuid(), 0).fh
    driver.write_at(fh, 0, os.urandom(200_000))
    node = fs.nodes.at("m.bin")
    assert node is not None
    started, go = _hold_seals(driver)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.flush, fh)
            await trio.to_thread.run_sync(started.wait, 30)
            await fs.setattr(node.ino, None, mode=0o600)
            go.set()
        await fs.release(fh)

    driver.core.call(scenario)
    wait_for(lambda: not fs.uploader.pending)
    client = driver.core.store._client
    meta = client.head_object(Bucket=driver.core.url.bucket, Key="vol/m.bin")["Metadata"]
    assert meta.get("s3cryptfs-mode") == "100600"
    assert fs.state_of(node) == "clean"


def test_a_lookup_answered_after_a_readdir_made_the_file_gives_the_same_inode(
    driver: CoreDriver,
) -> None:
    """`stat x` and `ls` in a directory not listed yet: the lookup's HEAD answers after the
    readdir made the file's node. Both give the kernel the same inode, and writes through it
    land as one file's versions (never a conflict copy of itself)."""
    fs, store = driver.fs, driver.core.store
    driver.write_file("x.txt", b"v1")
    wait_for(lambda: not fs.uploader.pending)
    old = fs.nodes.at("x.txt")
    assert old is not None
    fs.nodes.detach(old)  # as after the kernel's FORGET
    fs.nodes.by_ino.pop(old.ino)
    root = fs.node(1)
    root.listing = None

    async def not_small(parent: Any) -> bool:
        return False  # a wide directory, whose lookups HEAD the name

    fs.listing._small = not_small  # type: ignore[method-assign]
    gate = store.hold("head", "vol/x.txt", times=1)
    out: dict[str, Any] = {}

    async def scenario() -> None:
        async def lookup() -> None:
            out["lookup"] = await fs.lookup(1, "x.txt")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            await _until_arrived(store, "head vol/x.txt")
            out["readdir"] = dict(await fs.readdir(1))["x.txt"]
            gate.set()

    driver.core.call(scenario)
    assert out["lookup"] is out["readdir"]
    node = out["readdir"]
    for data in (b"v2", b"v3"):
        handle, _ = driver.core.call(fs.open, node.ino, os.O_WRONLY | os.O_TRUNC)
        driver.write_at(handle.fh, 0, data)
        driver.close(handle.fh)
        wait_for(lambda: not fs.uploader.pending)
    assert fs.uploader.conflicts == 0
    assert keys_in_s3(driver) == ["vol/x.txt"]
    assert driver.read_file("x.txt") == b"v3"


def test_a_file_deleted_while_its_last_close_seals_stays_deleted(driver: CoreDriver) -> None:
    """`rm` of a file whose last close is sealing it (nobody has it open any more, so the
    unlink waits for nothing of it): what that seal makes is not uploaded after the delete,
    which would bring the file back."""
    fs = driver.fs
    fh = driver.core.call(fs.create, 1, "gone.bin", 0o100644, os.getuid(), 0).fh
    driver.write_at(fh, 0, os.urandom(200_000))  # no flush: sealed at release
    started, go = _hold_seals(driver)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.release, fh)
            await trio.to_thread.run_sync(started.wait, 30)
            nursery.start_soon(fs.unlink, 1, "gone.bin")
            await trio.sleep(0.3)
            go.set()

    driver.core.call(scenario)
    wait_for(lambda: not fs.uploader.pending)
    time.sleep(1.5)  # past the upload delay of anything queued
    assert keys_in_s3(driver) == []
    assert not driver.exists("gone.bin")


def test_a_close_of_the_file_a_rename_replaces_does_not_undo_the_rename(
    driver: CoreDriver,
) -> None:
    """`mv a.bin b.bin` while a process that has b.bin open closes it: the rename waits for
    b.bin's version in flight, and the close comes meanwhile. What b.bin holds in S3 at the
    end is a.bin's content (the close wrote to the file the rename replaced), not the
    closed version queued over the moved one."""
    fs, store = driver.fs, driver.core.store
    driver.write_file("b.bin", b"old b")
    wait_for(lambda: not fs.uploader.pending)
    fh = driver.open("b.bin", os.O_RDWR)
    driver.write_at(fh, 0, os.urandom(200_000))
    driver._run(fs.flush, fh)  # a version of b.bin, queued
    driver.write_at(fh, 0, os.urandom(200_000))  # and more, closed during the rename
    driver.write_file("a.bin", b"the new a")
    put_gate = store.hold("put", "vol/b.bin", times=1)
    started, go = _hold_seals(driver)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.rename, 1, "a.bin", 1, "b.bin", 0)
            await _until_arrived(store, "put vol/b.bin")  # the rename waits for b.bin's
            nursery.start_soon(fs.flush, fh)
            await trio.to_thread.run_sync(started.wait, 1)  # (not with the fence)
            put_gate.set()
            await trio.sleep(0.5)
            go.set()
        await fs.release(fh)

    driver.core.call(scenario)
    wait_for(lambda: not fs.uploader.pending)
    time.sleep(1.5)  # past the upload delay of anything queued
    assert keys_in_s3(driver) == ["vol/b.bin"]
    assert driver.read_file("b.bin") == b"the new a"


def test_a_read_through_the_write_back_file_outlives_its_release(driver: CoreDriver) -> None:
    """A read served from the write-back file is in a worker thread when the writer's last
    close lets that file go: the read still returns what the file holds (closing the file
    under it would fail the read with EBADF, or read whatever file got the descriptor)."""
    fs = driver.fs
    writer = driver.core.call(fs.create, 1, "r.txt", 0o100644, os.getuid(), 0).fh
    driver.write_at(writer, 0, b"hello, reader")
    driver._run(fs.flush, writer)
    reader = driver.open("r.txt", os.O_RDONLY)
    started, go = threading.Event(), threading.Event()
    run_in_thread = fs.writes._thread

    async def held(fn: Any, *args: Any) -> Any:
        if fn is os.pread:
            started.set()
            await trio.to_thread.run_sync(go.wait, 30)
        return await run_in_thread(fn, *args)

    fs.writes._thread = held  # type: ignore[method-assign]
    out: dict[str, bytes] = {}

    async def scenario() -> None:
        async def read() -> None:
            out["read"] = await fs.read(reader, 0, 100)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.to_thread.run_sync(started.wait, 30)
            await fs.release(writer)  # the write-back file is let go here
            go.set()

    try:
        driver.core.call(scenario)
    finally:
        fs.writes._thread = run_in_thread  # type: ignore[method-assign]
    assert out["read"] == b"hello, reader"
    driver.core.call(fs.release, reader)
    assert driver.read_file("r.txt") == b"hello, reader"


def test_a_read_during_a_rewrite_here_answers_as_the_kernels_size_says(
    driver: CoreDriver,
) -> None:
    """`cat f` while `echo x > f` runs on this mount. The kernel takes a short read as the
    end of the file and keeps the rest of its page as zeros, and it sets a truncated file's
    size only once the mount has answered the truncation: a read answered in between comes
    back short for a size the kernel may still go by (vfs/pages.py). Until the rewrite
    writes, a read is answered with the version before; the next direct write, or the last
    close, drops the kernel's pages. A file appended to (no truncation) drops nothing."""
    fs = driver.fs
    dropped: list[int] = []

    async def drop_pages(ino: int) -> None:
        dropped.append(ino)

    fs.pages.drop = drop_pages
    driver.write_file("p.txt", b"x" * 10_000)
    wait_for(lambda: not fs.uploader.pending)
    node = driver._lookup("p.txt")
    reader = driver.open("p.txt", os.O_RDONLY)
    writer = driver.open("p.txt", os.O_WRONLY | os.O_APPEND)
    fs.handles[writer].direct = True  # (as the FUSE adapter gives write-only handles)
    assert len(driver.read_at(reader, 8192, 4096)) == 10_000 - 8192  # `tail -f`
    driver.write_at(writer, 10_000, b"y")
    driver.close(writer)
    assert dropped == []  # no rewrite: a short read is the end of the file
    wait_for(lambda: not fs.uploader.pending)
    writer = driver.open("p.txt", os.O_WRONLY | os.O_TRUNC)
    fs.handles[writer].direct = True
    assert driver.read_at(reader, 0, 4096) == b"x" * 4096  # the version before
    driver._run(fs.flush, writer)  # the shell's flush of the empty file
    assert driver.read_at(reader, 8192, 4096) == b"x" * (10_000 - 8192) + b"y"
    driver.write_at(writer, 0, b"new content")
    assert dropped == [node.ino]
    assert driver.read_at(reader, 0, 4096) == b"new content"  # (short: the end of the file)
    driver.write_at(writer, 11, b", more")
    assert dropped == [node.ino] * 2  # after that short read, once
    driver.write_at(writer, 17, b"!")
    assert dropped == [node.ino] * 2
    assert driver.read_at(reader, 0, 4096) == b"new content, more!"
    driver.close(writer)
    assert dropped == [node.ino] * 3  # the last close, after a short read
    driver.close(reader)
    assert driver.read_file("p.txt") == b"new content, more!"


def test_the_version_before_a_truncation_is_only_for_a_moment_and_that_size(
    driver: CoreDriver, monkeypatch
) -> None:
    """What a file held before its truncation answers reads only while it still has the size
    it was truncated to, and only for a moment: `ftruncate` that grows it again reads zeros,
    and a read long after the truncation reads the empty file (O_DIRECT readers)."""
    from s3cryptfs.vfs import pages

    fs = driver.fs
    driver.write_file("q.txt", b"q" * 5000)
    wait_for(lambda: not fs.uploader.pending)
    node = driver._lookup("q.txt")
    writer = driver.open("q.txt", os.O_RDWR | os.O_TRUNC)
    assert driver.read_at(writer, 0, 4096) == b"q" * 4096  # within the moment
    driver._run(functools.partial(fs.setattr, node.ino, writer, size=100))  # ftruncate
    assert driver.read_at(writer, 0, 4096) == b"\0" * 100
    driver.close(writer)
    monkeypatch.setattr(pages, "TRUNCATED_FOR", 0.05)
    writer = driver.open("q.txt", os.O_WRONLY | os.O_TRUNC)
    reader = driver.open("q.txt", os.O_RDONLY)
    time.sleep(0.1)
    assert driver.read_at(reader, 0, 4096) == b""
    driver.close(writer)
    driver.close(reader)


def test_a_read_overtaken_by_a_rewrite_here_is_answered_with_the_new_content(
    driver: CoreDriver,
) -> None:
    """A read of the end of a file asks S3 while a rewrite on this mount truncates and writes
    the file: answered short with the old version's end, the kernel would keep the rest of its
    page as zeros (vfs/pages.py). It is answered again, with what the file holds now."""
    fs, store = driver.fs, driver.core.store
    size = 1_500_000  # over the size fetched whole: reads are ranged GETs
    driver.write_file("e.bin", b"o" * size)
    wait_for(lambda: not fs.uploader.pending)
    node = driver._lookup("e.bin")
    reader = driver.open("e.bin", os.O_RDONLY)
    gate = store.hold("get", "vol/e.bin", times=1)
    out: dict[str, Any] = {}

    async def scenario() -> None:
        async def read() -> None:
            out["read"] = await fs.read(reader, size - 100, 4096)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await _until_arrived(store, "get vol/e.bin")
            writer, _ = await fs.open(node.ino, os.O_WRONLY | os.O_TRUNC)
            await fs.write(writer.fh, 0, b"n" * size)
            out["writer"] = writer.fh
            gate.set()

    driver.core.call(scenario)
    assert out["read"] == b"n" * 100  # not the old version's end, short of the new one's
    driver.close(out["writer"])
    driver.close(reader)
