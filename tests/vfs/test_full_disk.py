"""A cache directory without room for a seal, driven without a kernel: the seal is refused
before it writes (a sparse file is small on disk but not once encrypted), a disk filled
halfway through keeps no part of a body, and a record that cannot be written does not stop
the mount. Each file reaches S3 once there is room again."""

from __future__ import annotations

import errno
import os

import pytest

from s3cryptfs import limits
from s3cryptfs.upload import closed as closed_files
from s3cryptfs.upload.state import Staged
from tests.vfs.harness import CoreDriver
from tests.vfs.test_write_states import in_s3, wait_for

BODY = os.urandom(200 * 1024)  # past the journal's slots: sealed into a body file


def bodies(driver: CoreDriver) -> list[str]:
    return [n for n in os.listdir(driver.fs.writes.journal.dir) if n.endswith(".body")]


def test_a_seal_without_room_is_refused_before_it_writes(driver, monkeypatch) -> None:
    monkeypatch.setattr(limits, "CACHE_RESERVE", 1 << 62)  # no file system has that free
    driver.write_file("big.bin", BODY)  # close() succeeds: kept as closed, durably
    node = driver._lookup("big.bin")
    assert node.w.state is Staged.CLOSED
    [(key, kind, why)] = driver.fs.not_in_s3()
    assert (key, kind) == ("vol/big.bin", "local")
    assert "No space" not in why and "sealing it takes 0.2 MiB in the cache directory" in why
    assert bodies(driver) == []
    driver.write_file("small.txt", b"a slot is taken in advance")  # still sealed
    wait_for(lambda: in_s3(driver, "small.txt"))
    monkeypatch.undo()
    wait_for(lambda: in_s3(driver, "big.bin"), 90, "the retry once there is room")
    assert driver.read_file("big.bin") == BODY


def test_a_disk_filled_halfway_through_a_seal_keeps_no_part_of_it(driver, monkeypatch) -> None:
    codec = driver.fs.writes.codec
    real = codec.seal_stream

    def full(src, dst, *args, **kwargs):
        dst.write(b"\0" * 100_000)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(codec, "seal_stream", full)
    driver.write_file("half.bin", BODY)
    assert driver._lookup("half.bin").w.state is Staged.CLOSED
    assert bodies(driver) == []  # the 100,000 bytes are given back
    monkeypatch.setattr(codec, "seal_stream", real)
    wait_for(lambda: in_s3(driver, "half.bin"), 90, "the retry")
    assert driver.read_file("half.bin") == BODY


def test_a_record_that_cannot_be_written_does_not_stop_the_mount(driver, monkeypatch) -> None:
    """Neither sealed nor recorded: a close says ENOSPC, a truncate by name too; a release
    (nobody to tell) keeps the file in memory and retries. The mount serves on."""
    monkeypatch.setattr(limits, "CACHE_RESERVE", 1 << 62)

    def no_room(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(closed_files, "write", no_room)
    with pytest.raises(OSError) as told:
        driver.write_file("told.bin", BODY)  # flush fails, then release keeps it in memory
    assert told.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as told:
        driver.truncate("told.bin", 150_000)
    assert told.value.errno == errno.ENOSPC
    fs = driver.fs
    assert [k for k, _, _ in fs.not_in_s3()] == ["vol/told.bin"]
    assert fs.writes.unrecorded
    driver.write_file("other.txt", b"the mount still works")
    assert driver.read_file("told.bin") == BODY[:150_000]
    monkeypatch.undo()
    wait_for(lambda: in_s3(driver, "told.bin"), 90, "the retry once there is room")
    wait_for(lambda: not fs.writes.unrecorded, 10, "the file to leave the pending set")
    assert driver.read_file("told.bin") == BODY[:150_000]
    assert driver.read_file("other.txt") == b"the mount still works"
