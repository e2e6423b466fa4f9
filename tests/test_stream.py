"""Streamed uploads: a large file written from start to end is sealed and sent in parts while it
is written (upload/stream.py). Whatever happens to the file meanwhile (a write behind the sent
part, truncate, rename, chmod, unlink, another writer, a crash), the object that lands is the
file as it was closed, encrypted, and no multipart upload is left behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest

from tests.conftest import lazy_unmount
from tests.servers import TcpProxy
from tests.test_crash import wait_state

MIB = 1024 * 1024
PART = 8 * MIB  # plaintext per part at the default 64 KiB chunks


def stats(mountpoint) -> dict:
    return json.loads(os.getxattr(mountpoint, "user.s3cryptfs.stats"))


def wait_sent(mountpoint, at_least: int, timeout: float = 60) -> None:
    """Until the running stream has sent *at_least* bytes of parts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = stats(mountpoint)["streaming"]
        if st["active"] and st["sent_bytes"] >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"no part was sent while the file was written: {stats(mountpoint)}")


def write_in_steps(fd: int, data: bytes, step: int = MIB) -> None:
    for pos in range(0, len(data), step):
        os.write(fd, data[pos : pos + step])


def open_uploads(s3client, bucket: str) -> list:
    return s3client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def assert_no_plaintext(s3client, bucket: str, key: str, data: bytes) -> None:
    body = s3client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert len(body) > len(data)
    for pos in range(0, len(data) - 64, 7 * MIB + 13):
        assert data[pos : pos + 64] not in body


def test_sequential_write_is_sent_while_written(mounted, s3client):
    m, bucket = mounted.mountpoint, mounted.bucket
    data = os.urandom(3 * PART + 12345)
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o640)
    write_in_steps(fd, data[: 2 * PART + MIB])
    wait_sent(m, PART)  # the first part left before close
    write_in_steps(fd, data[2 * PART + MIB :])
    os.close(fd)
    assert wait_state(m / "big", {"clean"}) == "clean"
    fuse = stats(m)["fuse"]
    assert fuse["streams"] == 1
    assert fuse["stream_bytes_sent_before_close"] >= PART
    # From the first part boundary reached by appending, writes skipped the write-back file.
    assert fuse["stream_bytes_absorbed"] == len(data) - 2 * PART
    head = s3client.head_object(Bucket=bucket, Key="vol/big")
    assert head["ETag"].strip('"').endswith("-4")  # one object of four parts
    meta = head["Metadata"]
    assert meta["s3cryptfs-mode"] == "100640"
    assert "s3cryptfs-mtime-ns" not in meta  # fixed at the start: the object's date stands in
    assert_no_plaintext(s3client, bucket, "vol/big", data)
    assert open_uploads(s3client, bucket) == []
    mtime = os.stat(m / "big").st_mtime_ns
    mounted.remount()
    assert (m / "big").read_bytes() == data
    assert os.stat(m / "big").st_mtime_ns == mtime  # the directory index keeps the exact one
    assert mounted.run("fsck", mounted.url, *mounted.common_args()).returncode == 0


@pytest.mark.parametrize("size", [2 * PART, 2 * PART + 1, 2 * PART - 1])
def test_part_boundaries(mounted, s3client, size):
    """A file ending exactly at, just past or just before a part boundary: the last chunk is
    sealed as last exactly once."""
    m = mounted.mountpoint
    data = os.urandom(size)
    fd = os.open(m / "edge", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data, step=PART // 2)
    os.close(fd)
    assert wait_state(m / "edge", {"clean"}) == "clean"
    mounted.remount()
    assert (m / "edge").read_bytes() == data
    assert open_uploads(s3client, mounted.bucket) == []


def test_write_behind_the_sent_part_drops_the_stream(mounted, s3client):
    m = mounted.mountpoint
    data = bytearray(os.urandom(3 * PART))
    fd = os.open(m / "patched", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data[: 2 * PART + 1])
    wait_sent(m, PART)
    os.pwrite(fd, b"PATCHED HEADER", 100)  # like tar or a zip writer going back
    data[100:114] = b"PATCHED HEADER"
    write_in_steps(fd, data[2 * PART + 1 :])
    os.close(fd)
    assert wait_state(m / "patched", {"clean"}) == "clean"
    assert open_uploads(s3client, mounted.bucket) == []
    mounted.remount()
    assert (m / "patched").read_bytes() == bytes(data)


def staging_files(vol) -> list:
    return list(vol.cache_dir.rglob("staging/*.plain"))


def test_sealed_parts_leave_the_write_back_file_and_still_read(mounted, s3client):
    """Once a part is sealed, its plaintext is cut out of the write-back file (the body has
    it); a reader of the file being written gets it back from the body."""
    m = mounted.mountpoint
    data = os.urandom(3 * PART + 4321)
    fd = os.open(m / "growing", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data[: 2 * PART + MIB])
    wait_sent(m, PART)
    [plain] = staging_files(mounted)
    allocated = os.stat(plain).st_blocks * 512
    assert allocated <= PART + 2 * MIB, allocated  # at least the first part is cut out
    reader = os.open(m / "growing", os.O_RDONLY)
    try:
        for offset, size in [(0, 4096), (PART - 100, 300), (12345, 3 * MIB), (0, 2 * PART + MIB)]:
            assert os.pread(reader, size, offset) == data[offset : offset + size], offset
        write_in_steps(fd, data[2 * PART + MIB :])
        os.close(fd)
        assert os.pread(reader, len(data) + 10, 0) == data
    finally:
        os.close(reader)
    assert wait_state(m / "growing", {"clean"}) == "clean"
    mounted.remount()
    assert (m / "growing").read_bytes() == data
    assert open_uploads(s3client, mounted.bucket) == []


def test_appended_parts_held_in_memory_read_back_and_spill(mounted, s3client):
    """Appends from a part boundary on are held in memory until sealed, never in the write-back
    file. A reader sees them; a write that is not an append puts them back into the file
    first, and nothing is lost either way."""
    m = mounted.mountpoint
    data = bytearray(os.urandom(5 * PART + 3 * MIB))
    fd = os.open(m / "held", os.O_RDWR | os.O_CREAT, 0o644)
    write_in_steps(fd, data[: 4 * PART + MIB])
    wait_sent(m, PART)
    [plain] = staging_files(mounted)
    # Only the first two parts (written before the stream began) ever were in the file.
    assert os.stat(plain).st_blocks * 512 <= 2 * PART, os.stat(plain).st_blocks
    for offset, size in [(2 * PART - 100, 300), (4 * PART - 5, MIB), (0, 4 * PART + MIB)]:
        assert os.pread(fd, size, offset) == data[offset : offset + size], offset
    assert os.pread(fd, 10, 4 * PART + MIB) == b""  # nothing past the end
    # A write into the last part held in memory (not an append): the parts go to the file.
    patch = 4 * PART + 4096
    os.pwrite(fd, b"not an append", patch)
    data[patch : patch + 13] = b"not an append"
    assert os.pread(fd, MIB, 4 * PART) == data[4 * PART : 5 * PART][:MIB]
    write_in_steps(fd, data[4 * PART + MIB :])
    assert os.pread(fd, len(data), 0) == data
    os.close(fd)
    fuse = stats(m)["fuse"]
    assert 2 * PART <= fuse["stream_bytes_absorbed"] < len(data) - 2 * PART
    assert wait_state(m / "held", {"clean"}) == "clean"
    mounted.remount()
    assert (m / "held").read_bytes() == bytes(data)
    assert open_uploads(s3client, mounted.bucket) == []


@pytest.mark.parametrize("where", ["append", "inside the cut"])
def test_writes_after_a_streamed_close_on_a_duplicate(mounted, s3client, where):
    """close() of one descriptor commits the streamed version; the write-back file, with its
    first parts cut out, lives on for the duplicate, whose writes must see the whole file."""
    m = mounted.mountpoint
    data = bytearray(os.urandom(2 * PART + MIB))
    fd = os.open(m / "dup", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data)
    wait_sent(m, PART)
    other = os.dup(fd)
    os.close(fd)  # flush: the streamed version is committed
    offset = len(data) if where == "append" else 1000
    os.pwrite(other, b"written after the commit", offset)
    data[offset : offset + 24] = b"written after the commit"
    os.close(other)
    assert wait_state(m / "dup", {"clean"}) == "clean"
    assert (m / "dup").read_bytes() == bytes(data)
    mounted.remount()
    assert (m / "dup").read_bytes() == bytes(data)
    assert open_uploads(s3client, mounted.bucket) == []


def test_truncate_while_streaming(mounted, s3client):
    m = mounted.mountpoint
    data = os.urandom(2 * PART + MIB)
    fd = os.open(m / "cut", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data)
    wait_sent(m, PART)
    os.ftruncate(fd, 3 * MIB)
    os.pwrite(fd, b"tail", 3 * MIB)
    os.close(fd)
    assert wait_state(m / "cut", {"clean"}) == "clean"
    mounted.remount()
    assert (m / "cut").read_bytes() == data[: 3 * MIB] + b"tail"
    assert open_uploads(s3client, mounted.bucket) == []


def test_rename_and_chmod_while_streaming(mounted, s3client):
    m, bucket = mounted.mountpoint, mounted.bucket
    (m / "dir").mkdir()
    data = os.urandom(3 * PART)
    fd = os.open(m / "dir" / "part.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data[: 2 * PART + 1])
    wait_sent(m, PART)
    os.rename(m / "dir" / "part.tmp", m / "dir" / "final")
    os.fchmod(fd, 0o600)
    write_in_steps(fd, data[2 * PART + 1 :])
    os.close(fd)
    assert wait_state(m / "dir" / "final", {"clean"}) == "clean"
    keys = [
        o["Key"] for o in s3client.list_objects_v2(Bucket=bucket, Prefix="vol/dir/")["Contents"]
    ]
    assert "vol/dir/part.tmp" not in keys and "vol/dir/final" in keys
    head = s3client.head_object(Bucket=bucket, Key="vol/dir/final")
    assert head["Metadata"]["s3cryptfs-mode"] == "100600"
    assert open_uploads(s3client, bucket) == []
    mounted.remount()
    assert (m / "dir" / "final").read_bytes() == data
    assert os.stat(m / "dir" / "final").st_mode & 0o777 == 0o600


def test_chmod_after_close_while_streaming_waits(mounted, s3client):
    """Metadata changed after close, before the upload completed: the object carries it."""
    m, bucket = mounted.mountpoint, mounted.bucket
    data = os.urandom(2 * PART + MIB)
    with open(m / "late", "wb") as f:
        f.write(data)
    os.chmod(m / "late", 0o604)
    os.utime(m / "late", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    assert wait_state(m / "late", {"clean"}) == "clean"
    meta = s3client.head_object(Bucket=bucket, Key="vol/late")["Metadata"]
    assert meta["s3cryptfs-mode"] == "100604"
    assert meta["s3cryptfs-mtime-ns"] == "1600000000000000000"
    assert open_uploads(s3client, bucket) == []
    mounted.remount()
    assert (m / "late").read_bytes() == data
    assert os.stat(m / "late").st_mtime_ns == 1_600_000_000_000_000_000


def test_unlink_while_streaming(mounted, s3client):
    m, bucket = mounted.mountpoint, mounted.bucket
    data = os.urandom(2 * PART + 1)
    fd = os.open(m / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    write_in_steps(fd, data)
    wait_sent(m, PART)
    os.unlink(m / "gone")
    os.write(fd, b"still writable")
    # the whole content stays readable through the handle, the first parts (cut out of the
    # write-back file while streaming) included
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read from the mount, not the cache
    assert os.pread(fd, len(data) + 100, 0) == data + b"still writable"
    os.close(fd)
    deadline = time.monotonic() + 30
    while open_uploads(s3client, bucket) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_uploads(s3client, bucket) == []
    assert "gone" not in os.listdir(m)
    listed = s3client.list_objects_v2(Bucket=bucket, Prefix="vol/gone")
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.expect_log_errors(r"was changed by another writer", r"shared: not encrypted")
def test_another_writer_during_the_stream_gets_a_conflict_copy(mounted, s3client):
    m, bucket = mounted.mountpoint, mounted.bucket
    data = os.urandom(2 * PART + MIB)
    fd = os.open(m / "shared", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data[: 2 * PART])
    wait_sent(m, PART)
    s3client.put_object(Bucket=bucket, Key="vol/shared", Body=b"theirs")  # another client
    write_in_steps(fd, data[2 * PART :])
    os.close(fd)
    # Ours lost: the name is the other client's object again here, a plaintext one, which
    # this volume refuses (an error state, not a clean file over what S3 holds).
    assert wait_state(m / "shared", {"clean", "conflict", "error"}) == "error"
    with pytest.raises(OSError) as info:
        (m / "shared").read_bytes()
    assert info.value.errno == errno.EIO
    deadline = time.monotonic() + 30
    names: list[str] = []
    while time.monotonic() < deadline:
        listed = s3client.list_objects_v2(Bucket=bucket, Prefix="vol/shared")
        names = [o["Key"] for o in listed.get("Contents", [])]
        if len(names) == 2:
            break
        time.sleep(0.2)
    assert s3client.get_object(Bucket=bucket, Key="vol/shared")["Body"].read() == b"theirs"
    copies = [n for n in names if n.startswith("vol/shared.conflict-")]
    assert len(copies) == 1, names
    assert open_uploads(s3client, bucket) == []
    mounted.umount()
    mounted.mount()
    assert (m / copies[0][len("vol/") :]).read_bytes() == data


@pytest.fixture
def proxy(seaweed):
    p = TcpProxy("127.0.0.1", seaweed.s3_port)
    yield p
    p.stop()


def test_crash_after_close_recovers_a_streamed_version(make_volume, bucket, proxy, s3client):
    vol = make_volume(bucket=bucket, endpoint_url=proxy.endpoint_url)
    vol.init()
    vol.mount("--s3-timeout", "5")
    m = vol.mountpoint
    data = os.urandom(3 * PART + 777)
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    write_in_steps(fd, data[: 2 * PART + 1])
    wait_sent(m, PART)  # a multipart upload is open, with parts in it
    proxy.set_mode("reset")  # S3 goes away: the rest cannot be sent
    write_in_steps(fd, data[2 * PART + 1 :])
    os.close(fd)  # committed to the journal
    assert wait_state(m / "big", {"dirty", "uploading"})
    for pid in vol.pids():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vol.pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    lazy_unmount(m)
    proxy.set_mode("pass")
    vol.mount("--s3-timeout", "5")  # recovery: the stale upload is aborted, the body sent
    assert (m / "big").read_bytes() == data
    assert open_uploads(s3client, bucket) == []
    vol.umount()
    vol.mount()
    assert (m / "big").read_bytes() == data
