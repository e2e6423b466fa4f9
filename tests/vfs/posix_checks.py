"""POSIX behaviour, written once: each check takes a driver (tests/vfs/harness.py) and runs
against the filesystem core directly (tests/vfs/test_core_posix.py, no kernel) and through a
real mount (tests/test_posix_shared.py). A check that fails in only one of them points at the
FUSE adapter, or at the kernel's part."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import pytest

Driver = Any
CHECKS: list[Callable[[Driver], None]] = []


def check(fn: Callable[[Driver], None]) -> Callable[[Driver], None]:
    CHECKS.append(fn)
    return fn


def raises(errnum: int, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == errnum, (fn, args, info.value)


@check
def create_read_overwrite_shorter(d: Driver) -> None:
    d.write_file("a.txt", b"a longer first version\n")
    assert d.read_file("a.txt") == b"a longer first version\n"
    d.write_file("a.txt", b"short\n")  # O_TRUNC: nothing of the old tail stays
    assert d.read_file("a.txt") == b"short\n"
    assert d.stat("a.txt").size == 6
    assert stat.S_ISREG(d.stat("a.txt").mode)


@check
def sparse_and_partial_writes(d: Driver) -> None:
    d.write_file("s.bin", b"")
    fh = d.open("s.bin", os.O_RDWR)
    d.write_at(fh, 100_000, b"end")
    d.write_at(fh, 10, b"mid")
    d.close(fh)
    data = d.read_file("s.bin")
    assert len(data) == 100_003 and data[10:13] == b"mid" and data[-3:] == b"end"
    assert data[:10] == bytes(10) and data[13:100_000] == bytes(100_000 - 13)


@check
def append_and_truncate(d: Driver) -> None:
    d.write_file("log", b"one\n")
    d.append("log", b"two\n")
    assert d.read_file("log") == b"one\ntwo\n"
    d.truncate("log", 3)
    assert d.read_file("log") == b"one"
    d.truncate("log", 6)
    assert d.read_file("log") == b"one\0\0\0"


@check
def directories(d: Driver) -> None:
    d.mkdir("dir")
    d.mkdir("dir/sub")
    d.write_file("dir/sub/f", b"x")
    assert d.listdir("dir") == ["sub"] and d.listdir("dir/sub") == ["f"]
    assert stat.S_ISDIR(d.stat("dir").mode)
    raises(errno.EEXIST, d.mkdir, "dir")
    raises(errno.ENOTEMPTY, d.rmdir, "dir")
    raises(errno.ENOTDIR, d.rmdir, "dir/sub/f")
    raises(errno.EISDIR, d.unlink, "dir")
    d.unlink("dir/sub/f")
    d.rmdir("dir/sub")
    d.rmdir("dir")
    assert not d.exists("dir")
    raises(errno.ENOENT, d.stat, "dir")


@check
def rename_file_over_another(d: Driver) -> None:
    d.write_file("old", b"the one that moves")
    d.write_file("target", b"the one replaced")
    d.rename("old", "target")
    assert not d.exists("old")
    assert d.read_file("target") == b"the one that moves"
    raises(errno.ENOENT, d.rename, "old", "other")


@check
def rename_directory_tree(d: Driver) -> None:
    d.mkdir("src")
    d.mkdir("src/deep")
    d.write_file("src/deep/f", b"deep file")
    d.write_file("src/g", b"shallow file")
    d.rename("src", "dst")
    assert not d.exists("src")
    assert d.read_file("dst/deep/f") == b"deep file" and d.read_file("dst/g") == b"shallow file"
    d.mkdir("full")
    d.write_file("full/x", b"x")
    raises(errno.ENOTEMPTY, d.rename, "dst", "full")


@check
def attributes_survive_a_remount(d: Driver) -> None:
    d.write_file("attrs", b"content")
    d.chmod("attrs", 0o640)
    d.utime("attrs", 1_700_000_000_123_456_789)
    d.mkdir("adir", 0o700)
    d.symlink("attrs", "link")
    d.remount()
    st = d.stat("attrs")
    assert stat.S_IMODE(st.mode) == 0o640 and st.mtime_ns == 1_700_000_000_123_456_789
    assert stat.S_IMODE(d.stat("adir").mode) == 0o700
    assert stat.S_ISLNK(d.stat("link").mode) and d.readlink("link") == "attrs"
    assert d.read_file("attrs") == b"content"


@check
def unlinked_while_open_stays_readable(d: Driver) -> None:
    d.write_file("gone", b"still here for whoever has it open")
    fh = d.open("gone", os.O_RDONLY)
    d.unlink("gone")
    assert not d.exists("gone")
    assert d.read_at(fh, 0, 100) == b"still here for whoever has it open"
    d.close(fh)


@check
def content_survives_a_remount(d: Driver) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: several chunks
    d.write_file("big", big)
    fh = d.open("big", os.O_RDWR)
    d.write_at(fh, 500_000, b"patched")
    d.fsync(fh)  # in S3 now, whatever the remount does
    d.close(fh)
    d.remount()
    want = big[:500_000] + b"patched" + big[500_007:]
    assert d.read_file("big") == want


@check
def a_size_past_one_s3_object_is_efbig(d: Driver) -> None:
    """A file is one S3 object, at most 5 TiB once sealed: a truncate or a write past that
    says EFBIG (pjdfstest's truncate/12 asks for 999999999999999999 bytes) and changes
    nothing."""
    d.write_file("f", b"kept")
    raises(errno.EFBIG, d.truncate, "f", 999_999_999_999_999_999)
    raises(errno.EFBIG, d.truncate, "f", 5 * 2**40)
    fh = d.open("f", os.O_WRONLY)
    try:
        raises(errno.EFBIG, d.write_at, fh, 5 * 2**40, b"x")
    finally:
        d.close(fh)
    assert d.read_file("f") == b"kept"
