"""Crash recovery: versions committed to the journal while S3 was unreachable are uploaded by the
next mount before it serves them; a version still open for writing at the crash never is. A
crash right after close() returned, before the journal's group commit flushed it, loses
nothing either."""

from __future__ import annotations

import os
import signal
import time

import pytest

from s3cryptfs.upload.commits import COMMIT_INTERVAL
from tests.conftest import lazy_unmount
from tests.servers import TcpProxy


@pytest.fixture
def proxy(seaweed):
    p = TcpProxy("127.0.0.1", seaweed.s3_port)
    yield p
    p.stop()


def wait_state(path, want: set[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = os.getxattr(path, "user.s3cryptfs.state").decode()
        if state in want:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{path}: state {state!r}, wanted one of {want}")


def test_journal_survives_crash_and_outage(make_volume, bucket, proxy):
    vol = make_volume(bucket=bucket, endpoint_url=proxy.endpoint_url)
    vol.init()
    # A long listing lifetime lets new names be created while S3 is away (no lookup needed).
    vol.mount("--s3-timeout", "5", "--dir-cache-ttl", "600")
    m = vol.mountpoint
    (m / "edited").write_bytes(b"version one\n")
    (m / "open-at-crash").write_bytes(b"committed before the crash\n")
    assert sorted(os.listdir(m)) == ["edited", "open-at-crash"]
    wait_state(m / "edited", {"clean"})
    wait_state(m / "open-at-crash", {"clean"})
    edited = os.open(m / "edited", os.O_RDWR)
    still_open = os.open(m / "open-at-crash", os.O_RDWR)

    proxy.set_mode("reset")  # S3 is gone: every upload fails and is retried
    os.ftruncate(edited, 0)
    os.pwrite(edited, b"version two, written during the outage\n", 0)
    os.close(edited)  # committed to the journal: close returns 0
    (m / "created").write_bytes(b"created during the outage\n")
    os.ftruncate(still_open, 0)  # (a partial write would need the old bytes from S3)
    os.pwrite(still_open, b"NEVER CLOSED", 0)  # not committed: must not reach S3
    assert wait_state(m / "edited", {"dirty", "uploading"})
    assert wait_state(m / "created", {"dirty", "uploading"})

    for pid in vol.pids():  # the crash
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vol.pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(OSError):
        os.close(still_open)  # the mount is gone under this descriptor
    lazy_unmount(m)
    assert not vol.is_mounted()

    proxy.set_mode("pass")
    vol.mount("--s3-timeout", "5")  # recovers the journal before it reports ready
    assert (m / "edited").read_bytes() == b"version two, written during the outage\n"
    assert (m / "created").read_bytes() == b"created during the outage\n"
    assert (m / "open-at-crash").read_bytes() == b"committed before the crash\n"
    assert wait_state(m / "edited", {"clean"}) == "clean"
    journals = [p for p in vol.cache_dir.glob("*/journal")]
    assert journals, "the mount keeps its journal under the cache dir"
    leftovers = [p for j in journals for p in j.rglob("*") if p.is_file()]
    assert not leftovers, leftovers  # every recovered version was uploaded and dropped
    vol.umount()
    trash = [p for p in vol.cache_dir.glob("*/journal.trash/*")]
    deadline = time.monotonic() + 10  # uploaded bodies are deleted in the background
    while trash and time.monotonic() < deadline:
        time.sleep(0.1)
        trash = [p for p in trash if p.exists()]
    assert not trash, trash
    vol.mount()  # and the data really is in S3, not only in a local cache
    assert (m / "edited").read_bytes() == b"version two, written during the outage\n"


def crash(vol) -> None:
    """kill -9 of the mount, and the unmount a supervisor would do after it."""
    for pid in vol.pids():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vol.pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    lazy_unmount(vol.mountpoint)
    assert not vol.is_mounted()


def test_a_crash_right_after_close_still_uploads_every_file(make_volume, bucket, proxy, s3client):
    """close() returns once the version is written to the journal, before any flush: a kill -9
    of the mount a moment later, with every upload still held back, loses none of them."""
    vol = make_volume(bucket=bucket, endpoint_url=proxy.endpoint_url)
    vol.init()
    vol.mount("--s3-timeout", "5", "--dir-cache-ttl", "600")
    m = vol.mountpoint
    (m / "d").mkdir()
    assert os.listdir(m / "d") == []  # listed: new names need no lookup in S3 meanwhile
    pids = vol.pids()
    assert pids
    proxy.set_mode("reset")  # every upload fails and stays in the journal
    files = {f"d/f{i:03d}": os.urandom(4096) + str(i).encode() for i in range(200)}
    for name, data in files.items():
        (m / name).write_bytes(data)  # open, write, close: close returned
    closed_at = time.monotonic()
    for pid in pids:  # the crash, before the next group commit
        os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - closed_at < COMMIT_INTERVAL
    crash(vol)

    proxy.set_mode("pass")
    vol.mount("--s3-timeout", "5")  # recovers the journal before it reports ready
    found = s3client.list_objects_v2(Bucket=bucket, Prefix="vol/d/")
    keys = sorted(o["Key"] for o in found.get("Contents", []) if "/d/f" in o["Key"])
    assert keys == sorted(f"vol/{name}" for name in files)  # in S3, every one
    leftovers = [p for p in vol.cache_dir.glob("*/journal/*") if p.is_file()]
    assert not leftovers, leftovers  # uploaded, so the journal let go of them
    for name, data in files.items():
        assert (m / name).read_bytes() == data, name  # from S3: the journal is empty
    vol.umount()  # while the proxy still forwards (it stops before the volume's cleanup)


def test_uploaded_bodies_leave_the_cache_directory(mounted):
    """A large version's body goes to the journal's trash once uploaded and is deleted a little
    later, or in the background after the unmount; a leftover is deleted by the next mount."""
    m = mounted.mountpoint

    def trash() -> list:
        return [p for p in mounted.cache_dir.glob("*/journal.trash/*") if p.exists()]

    def eventually_empty(timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while trash() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not trash(), trash()

    data = os.urandom(3 * 1024 * 1024)
    with open(m / "big", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # in S3: the journal no longer holds it
    assert not [p for p in mounted.cache_dir.glob("*/journal/*") if p.is_file()]
    eventually_empty()  # while mounted
    (m / "second").write_bytes(data[::-1])
    mounted.umount()
    assert not [p for p in mounted.cache_dir.glob("*/journal/*") if p.is_file()]
    eventually_empty()  # after the unmount
    [trash_dir] = list(mounted.cache_dir.glob("*/journal.trash"))
    (trash_dir / "000000000099.body").write_bytes(b"left by a mount that was killed")
    mounted.mount()
    eventually_empty()
    assert (m / "big").read_bytes() == data
    assert (m / "second").read_bytes() == data[::-1]
