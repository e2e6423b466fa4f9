"""Small files in one request, and directory scans read ahead (vfs/smallfiles.py), counted
request by request on the real server through the fault-injecting store's call log."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import time

import pytest
import trio

from s3cryptfs.store.base import ObjectInfo, PendingGet, StoreSettings
from s3cryptfs.vfs.smallfiles import _reply
from tests.vfs.harness import CoreDriver, CoreFs

DIR = "scan"


def per_key(core: CoreFs, op: str) -> collections.Counter[str]:
    return collections.Counter(
        c.split(" ", 1)[1] for c in core.store.calls if c.startswith(op + " ")
    )


def fill(driver: CoreDriver, count: int, size: int) -> dict[str, bytes]:
    driver.mkdir(DIR)
    files = {f"f{i:04d}": os.urandom(size) for i in range(count)}
    for name, data in files.items():
        driver.write_file(f"{DIR}/{name}", data)
    driver.core.call(driver.fs.drain, 5.0)
    return files


def cold(core: CoreFs, **opts: object) -> None:
    """A fresh mount: nothing cached, the call log cleared."""
    core.stop()
    core.start(**opts)
    core.store.calls.clear()


def test_cold_small_file_is_one_request(core: CoreFs, driver: CoreDriver) -> None:
    files = fill(driver, 3, 5000)
    cold(core)
    driver.listdir(DIR)
    assert driver.read_file(f"{DIR}/f0001") == files["f0001"]
    key = f"vol/{DIR}/f0001"
    assert per_key(core, "get")[key] == 1
    assert per_key(core, "head")[key] == 0
    # Opened again: the blocks are cached, one HEAD says they are still the object's.
    core.store.calls.clear()
    assert driver.read_file(f"{DIR}/f0001") == files["f0001"]
    assert per_key(core, "get")[key] == 0
    assert per_key(core, "head")[key] == 1


def test_scan_reads_each_file_once(core: CoreFs, driver: CoreDriver) -> None:
    files = fill(driver, 200, 4096)
    cold(core, file_ttl=60.0)
    names = driver.listdir(DIR)
    assert names == sorted(files)
    for name in names:
        assert driver.read_file(f"{DIR}/{name}") == files[name]
    gets, heads = per_key(core, "get"), per_key(core, "head")
    keys = [f"vol/{DIR}/{name}" for name in names]
    assert [k for k in keys if gets[k] != 1] == []
    assert sum(heads[k] for k in keys) == 0
    # Most of them came from fetches made ahead of the opens, not by the opens.
    assert driver.fs.small.ahead_used >= 150


def test_scan_without_file_ttl_fetches_ahead_larger_files(
    core: CoreFs, driver: CoreDriver
) -> None:
    files = fill(driver, 40, 100 * 1024)
    cold(core)
    for name in driver.listdir(DIR):
        assert driver.read_file(f"{DIR}/{name}") == files[name]
    gets, heads = per_key(core, "get"), per_key(core, "head")
    keys = [f"vol/{DIR}/{name}" for name in files]
    assert [k for k in keys if gets[k] != 1] == []
    # Every open still asks S3 (close-to-open): a HEAD when the body was fetched ahead.
    assert driver.fs.small.ahead_used >= 30
    assert sum(heads[k] for k in keys) == driver.fs.small.ahead_used


@pytest.mark.parametrize("size", [4096, 100 * 1024])
def test_file_changed_elsewhere_is_never_served_stale(
    core: CoreFs, driver: CoreDriver, seaweed, bucket, tmp_path, size: int
) -> None:
    """Fetched ahead, then replaced by another machine before its open: the open reads the
    new version (without --file-cache-ttl, every open asks S3)."""
    files = fill(driver, 30, size)
    other = CoreFs(seaweed, bucket, tmp_path / "other").start()
    try:
        cold(core)
        core.opts.pop("file_ttl", None)
        names = driver.listdir(DIR)
        for name in names[:10]:
            assert driver.read_file(f"{DIR}/{name}") == files[name]
        ahead = dict(driver.fs.small.fetched)
        changed = [k.rsplit("/", 1)[1] for k in ahead][:3]
        if size > 64 * 1024:
            assert changed, "nothing was fetched ahead"
        else:
            changed = names[10:13]
        new = {name: os.urandom(size + 7) for name in changed}
        other_driver = CoreDriver(other)
        for name, data in new.items():
            other_driver.write_file(f"{DIR}/{name}", data)
        other.call(other.fs.drain, 5.0)
        for name in names[10:]:
            assert driver.read_file(f"{DIR}/{name}") == new.get(name, files[name]), name
    finally:
        other.stop(drain=False)


def test_change_made_here_is_never_served_stale_with_file_ttl(
    core: CoreFs, driver: CoreDriver
) -> None:
    files = fill(driver, 30, 4096)
    cold(core, file_ttl=60.0)
    names = driver.listdir(DIR)
    for name in names[:5]:
        driver.read_file(f"{DIR}/{name}")
    ahead = [k.rsplit("/", 1)[1] for k in driver.fs.small.fetched]
    assert ahead, "nothing was fetched ahead"
    target = ahead[-1]
    driver.write_file(f"{DIR}/{target}", b"written here")
    driver.core.call(driver.fs.drain, 5.0)
    assert driver.read_file(f"{DIR}/{target}") == b"written here"
    for name in names[5:]:
        if name != target:
            assert driver.read_file(f"{DIR}/{name}") == files[name]


def test_forged_small_object_still_fails_as_before(core: CoreFs, driver: CoreDriver) -> None:
    fill(driver, 2, 5000)
    key = f"vol/{DIR}/f0000"
    info = core.store.head(key)
    body = bytearray(core.store.get(key))
    body[-20] ^= 1
    core.store.put(key, bytes(body), metadata=info.metadata or {})
    cold(core)
    with pytest.raises(OSError) as exc:
        driver.read_file(f"{DIR}/f0000")
    assert exc.value.errno == 5  # EIO


def test_kernel_keeps_listed_files_until_their_listing_expires(
    core: CoreFs, driver: CoreDriver
) -> None:
    """The kernel may keep a listed file's name and attributes as long as the mount trusts
    the listing they came from (a `cat *` then sends no LOOKUP per file); a directory, a file
    with local changes, or a listing about to expire get the shortest time."""
    fill(driver, 2, 100)
    cold(core, dir_ttl=30.0)
    driver.listdir(DIR)
    fs = driver.fs
    listed = driver._lookup(f"{DIR}/f0000")
    assert 25.0 < fs.attr(listed).ttl <= 30.0
    assert fs.attr(driver._lookup(DIR)).ttl == 0.0
    fh = driver.open(f"{DIR}/f0001", os.O_WRONLY)
    driver.write_at(fh, 0, b"changed here")
    assert fs.attr(driver._lookup(f"{DIR}/f0001")).ttl == 0.0  # written, not in S3 yet
    driver.close(fh)
    assert fs.attr(driver._lookup(f"{DIR}/f0001")).ttl == 0.0  # closed, still being uploaded
    cold(core, dir_ttl=0.0)
    driver.listdir(DIR)
    assert driver.fs.attr(driver._lookup(f"{DIR}/f0000")).ttl == 0.0


def test_a_renamed_file_leaves_no_chunks_cached_under_its_old_name(
    core: CoreFs, driver: CoreDriver
) -> None:
    """A rename copies the object in S3: the copy is read by its own key and ETag, so the
    chunks cached for the old one are dropped, not left to age out of the block cache."""
    files = fill(driver, 2, 5000)
    cold(core)
    assert driver.read_file(f"{DIR}/f0001") == files["f0001"]
    node = driver._lookup(f"{DIR}/f0001")
    old = node.version
    assert old is not None and driver.fs.blocks.contains(old.vid, 0)
    driver.rename(f"{DIR}/f0001", f"{DIR}/moved")
    assert node.version is None and node.remote is not None
    assert not driver.fs.blocks.contains(old.vid, 0)
    assert driver.read_file(f"{DIR}/moved") == files["f0001"]


def test_a_reply_sent_from_the_event_loop_that_does_not_come_is_given_up() -> None:
    """The CRT has no read timeout: the event loop waits for a fetch it sent itself no longer
    than a blocking request would, then closes its connection and lets the caller ask the
    blocking way."""
    settings = StoreSettings(bucket="b", read_timeout=0.2, connect_timeout=0.1)
    closed: list[int] = []
    never: concurrent.futures.Future[tuple[bytes, ObjectInfo]] = concurrent.futures.Future()
    start = time.monotonic()
    assert trio.run(_reply, PendingGet(never, lambda: closed.append(1)), settings) is None
    assert closed == [1] and 0.25 <= time.monotonic() - start < 5
    info = ObjectInfo("k", 4, '"e"', 0)
    later: concurrent.futures.Future[tuple[bytes, ObjectInfo]] = concurrent.futures.Future()
    threading.Timer(0.05, later.set_result, [(b"body", info)]).start()
    got = trio.run(_reply, PendingGet(later, lambda: closed.append(2)), settings)
    assert got == (b"body", info)
    failed: concurrent.futures.Future[tuple[bytes, ObjectInfo]] = concurrent.futures.Future()
    failed.set_exception(OSError("reset"))
    assert trio.run(_reply, PendingGet(failed, lambda: closed.append(3)), settings) is None
    assert closed == [1]
