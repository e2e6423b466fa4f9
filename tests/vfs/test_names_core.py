"""Names the bucket cannot hold, without a kernel (vfs/names.py): the backslash probe against
the test SeaweedFS (which stores "\\" as "/") and against a client that keeps backslashes as
AWS S3 does (tests/faults.py), a probe that fails, and the errnos of the core itself."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pytest

from s3cryptfs.errors import AccessDenied, TransientStoreError
from s3cryptfs.vfs import names
from s3cryptfs.vfs.nodes import ROOT_INODE, ChildInfo
from tests.faults import keep_backslashes
from tests.vfs.harness import CoreDriver, CoreFs

PREFIX = "vol/"


def raises(errnum: int, fn, *args) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == errnum, (fn, args, info.value)


def reserved_area(core: CoreFs) -> tuple[list[str], list[str]]:
    """Objects and folders under the volume's .s3cryptfs/ (one level)."""
    page = core.store.list(f"{PREFIX}.s3cryptfs/", "/")
    return [o.key for o in page.objects], page.prefixes


def probe_requests(core: CoreFs) -> list[str]:
    return [c for c in core.store.calls if "probe-" in c]


def test_probe_finds_seaweedfs_rewrites_backslashes_and_cleans_up(core, caplog):
    before = reserved_area(core)
    core.store.calls.clear()
    with caplog.at_level(logging.INFO, logger="s3cryptfs.vfs.names"):
        assert names.keeps_backslash(core.store, PREFIX, "t1") is False
        assert names.backslash_allowed(core.store, PREFIX, "t2") is False
    # PUT, LIST, and the DELETEs of the key as sent, as listed, and of the folder it made.
    assert len(probe_requests(core)) <= 2 * 5, probe_requests(core)
    assert reserved_area(core) == before  # no object, and no empty folder left behind
    said = [r for r in caplog.records if "names with a backslash are refused" in r.message]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_probe_allows_backslashes_where_the_server_keeps_them(seaweed, bucket, tmp_path):
    core = CoreFs(seaweed, bucket, tmp_path, client=keep_backslashes(seaweed.client())).init()
    core.store.calls.clear()
    assert names.keeps_backslash(core.store, PREFIX, "t1") is True
    assert len(probe_requests(core)) == 3, probe_requests(core)  # PUT, LIST, DELETE
    assert not [k for k in core.store.list(PREFIX, None).objects if "probe" in k.key]
    # What the mount does with that answer: backslashes are names like any other.
    core.start(backslash_names=names.backslash_allowed(core.store, PREFIX, "t2"))
    try:
        d = CoreDriver(core)
        d.write_file("back\\slash", b"kept\n")
        d.mkdir("dir\\name")
        d.write_file("dir\\name/in\\it", b"below\n")
        d.rename("back\\slash", "back\\slash\\2")
        d.remount()
        assert d.listdir("") == ["back\\slash\\2", "dir\\name"]
        assert stat.S_ISREG(d.stat("back\\slash\\2").mode)
        assert d.read_file("back\\slash\\2") == b"kept\n"
        assert stat.S_ISDIR(d.stat("dir\\name").mode)
        assert d.read_file("dir\\name/in\\it") == b"below\n"
        keys = {o.key for o in core.store.list(PREFIX, None).objects}
        assert {f"{PREFIX}back\\slash\\2", f"{PREFIX}dir\\name/in\\it"} <= keys
        # A mount that did not probe (read-only, or its probe failed) refuses new ones but
        # still finds the existing ones, through listings.
        core.stop()
        core.start(backslash_names=False)
        raises(errno.EINVAL, d.write_file, "new\\name", b"x")
        assert d.read_file("back\\slash\\2") == b"kept\n"
        assert d.read_file("dir\\name/in\\it") == b"below\n"
    finally:
        core.stop()


@pytest.mark.parametrize(
    "fault",
    [
        lambda what: AccessDenied(f"{what}: injected"),
        lambda what: TransientStoreError(f"{what}: injected"),
    ],
    ids=["refused", "down"],
)
@pytest.mark.parametrize("op", ["put", "list"])
def test_a_failed_probe_refuses_backslashes_quickly(core, caplog, op, fault):
    core.store.fail(op, "probe-", times=None, error=fault)
    started = time.monotonic()
    assert names.keeps_backslash(core.store, PREFIX, "t1") is None
    assert time.monotonic() - started < names.PROBE_DEADLINE + 3
    core.store.heal()
    with caplog.at_level(logging.INFO, logger="s3cryptfs.vfs.names"):
        core.store.fail(op, "probe-", times=None, error=fault)
        assert names.backslash_allowed(core.store, PREFIX, "t2") is False
    assert any("could not tell" in r.message for r in caplog.records)
    core.store.heal()
    assert not [k for k in core.store.list(PREFIX, None).objects if "probe" in k.key]


# --- the core's errnos (tests/test_names.py has them through the mount) -------------------


def test_core_refuses_names_the_bucket_cannot_hold(driver):
    bad = os.fsdecode(b"caf\xe9.txt")  # what the FUSE adapter makes of those bytes
    driver.write_file("good.txt", b"good\n")
    driver.mkdir("sub")
    for where in ("", "sub/"):
        raises(errno.EILSEQ, driver.write_file, where + bad, b"x")
        raises(errno.EILSEQ, driver.mkdir, where + bad)
        raises(errno.EILSEQ, driver.symlink, "good.txt", where + bad)
        raises(errno.EILSEQ, driver.rename, "good.txt", where + bad)
        raises(errno.ENOENT, driver.stat, where + bad)
        raises(errno.ENOENT, driver.unlink, where + bad)
        raises(errno.EINVAL, driver.write_file, where + "back\\slash", b"x")
        raises(errno.EINVAL, driver.mkdir, where + "back\\slash")
        raises(errno.ENOENT, driver.stat, where + "back\\slash")
        raises(errno.ENAMETOOLONG, driver.write_file, where + "n" * 256, b"x")
        raises(errno.ENAMETOOLONG, driver.stat, where + "n" * 256)
    driver.write_file("n" * 255, b"255\n")
    assert driver.read_file("n" * 255) == b"255\n"
    assert driver.listdir("") == sorted(["good.txt", "n" * 255, "sub"])
    raises(errno.EPERM, driver._run, driver.fs.link, 1, 1, "hard")
    raises(errno.EILSEQ, driver._run, driver.fs.link, 1, 1, bad)
    fifo = stat.S_IFIFO | 0o644
    raises(errno.EILSEQ, driver._run, driver.fs.mknod, 1, bad, fifo, 0, 0, 0)
    raises(errno.EINVAL, driver._run, driver.fs.mknod, 1, "dir", stat.S_IFDIR | 0o755, 0, 0, 0)
    assert stat.S_ISFIFO(driver._run(driver.fs.mknod, 1, "fifo", fifo, 0, 0, 0).mode)


def test_core_finds_an_existing_name_over_255_bytes(driver):
    """Another tool may store a longer name where the server allows it (AWS S3 does, SeaweedFS
    does not): such a name is listed, and found; one that is not there is too long."""
    long = "l" * 300
    assert driver.listdir("") == []
    root = driver.fs.node(ROOT_INODE)
    assert root.listing is not None
    root.listing.children[long] = ChildInfo(False, 0, "etag", 1)  # as a LIST would show it
    assert long in driver.listdir("")
    assert driver.exists(long)
    raises(errno.ENAMETOOLONG, driver.stat, "m" * 300)
