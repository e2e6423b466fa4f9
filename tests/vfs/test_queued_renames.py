"""A version waits --upload-delay in the journal before its upload starts; a rename, delete or
fsync meanwhile: the temporary-file-then-rename pattern of git, rsync and editors costs no
copy in S3, a crash in the middle leaves the file under one name, and whoever waits for the
upload does not wait for the delay. Driven without a kernel, on the real server."""

from __future__ import annotations

import os
import stat
import time

import pytest

from s3cryptfs.upload.journal import Upload
from tests.vfs.harness import CoreDriver
from tests.vfs.test_write_states import keys_in_s3, wait_for

HOLD = 60.0  # an upload delay no test waits out: what is sent, is sent because of the test


@pytest.fixture
def held(driver: CoreDriver) -> CoreDriver:
    driver.core.stop()
    driver.core.start(upload_delay=HOLD)
    return driver


def sent_since(driver: CoreDriver, before: int, op: str) -> list[str]:
    """Requests *op* for files since *before* (not the directory indexes' bookkeeping)."""
    calls = driver.core.store.calls[before:]
    return [c for c in calls if c.startswith(op + " ") and "/.s3cryptfs/" not in c]


def fsynced(driver: CoreDriver, path: str, data: bytes) -> None:
    """Write *path* and fsync it: it is in S3 when this returns."""
    if not driver.exists(path):
        driver.write_file(path, b"")
    fh = driver.open(path, os.O_WRONLY | os.O_TRUNC)
    driver.write_at(fh, 0, data)
    driver.fsync(fh)
    driver.close(fh)


def test_a_file_renamed_before_its_upload_is_uploaded_once_under_its_new_name(
    held: CoreDriver,
) -> None:
    driver = held
    before = len(driver.core.store.calls)
    driver.write_file("tmp_obj_1", b"a git object")
    driver.rename("tmp_obj_1", "ab12")
    node = driver._lookup("ab12")
    assert node.w.local is not None and node.w.local.key == "vol/ab12"
    assert node.w.local.state is Upload.QUEUED
    assert not driver.exists("tmp_obj_1")
    assert driver.read_file("ab12") == b"a git object"  # from the journal
    assert sent_since(driver, before, "copy") == [] and sent_since(driver, before, "delete") == []
    driver.core.stop()  # the unmount sends it, without waiting for the delay
    puts = sent_since(driver, before, "put")
    assert puts == ["put vol/ab12"], puts
    assert keys_in_s3(driver) == ["vol/ab12"]
    driver.core.start()
    assert driver.read_file("ab12") == b"a git object"
    assert not driver.exists("tmp_obj_1")


def test_a_rename_over_a_file_in_s3_replaces_it_with_one_conditional_put(
    held: CoreDriver,
) -> None:
    driver = held
    fsynced(driver, "config", b"the old configuration")
    before = len(driver.core.store.calls)
    driver.write_file("config.tmp", b"the new configuration")
    driver.rename("config.tmp", "config")
    assert sent_since(driver, before, "copy") == []
    assert driver.read_file("config") == b"the new configuration"
    driver.core.stop()
    assert sent_since(driver, before, "put") == ["put vol/config"]
    assert keys_in_s3(driver) == ["vol/config"]
    driver.core.start()
    assert driver.read_file("config") == b"the new configuration"


def test_the_moved_version_still_loses_to_another_writer_of_the_new_name(
    held: CoreDriver,
) -> None:
    """The upload under the new name is conditional on what that name held when renamed
    over: another machine's version stored there since wins, and ours is a conflict copy."""
    driver = held
    fsynced(driver, "shared", b"the version we renamed over")
    driver.write_file("shared.tmp", b"our version")
    driver.rename("shared.tmp", "shared")
    driver.core.store.conflict_on("vol/shared")
    driver.core.stop()
    copies = [k for k in keys_in_s3(driver) if k.startswith("vol/shared.conflict-")]
    assert len(copies) == 1, keys_in_s3(driver)
    driver.core.start()
    assert driver.read_file(copies[0].removeprefix("vol/")) == b"our version"


def test_a_changed_file_renamed_before_its_upload_leaves_no_old_object(
    held: CoreDriver,
) -> None:
    driver = held
    fsynced(driver, "draft.txt", b"first draft")
    driver.write_file("draft.txt", b"second draft, not sent yet")
    before = len(driver.core.store.calls)
    driver.rename("draft.txt", "final.txt")
    # The old name's object (the first draft) goes at once; the second draft waits.
    assert sent_since(driver, before, "delete") == ["delete vol/draft.txt"]
    assert sent_since(driver, before, "copy") == [] and sent_since(driver, before, "put") == []
    assert keys_in_s3(driver) == []
    driver.core.stop()
    assert keys_in_s3(driver) == ["vol/final.txt"]
    driver.core.start()
    assert driver.read_file("final.txt") == b"second draft, not sent yet"
    assert not driver.exists("draft.txt")


def test_a_crash_after_a_queued_rename_keeps_the_file_under_its_new_name_only(
    held: CoreDriver,
) -> None:
    driver = held
    driver.write_file("report.tmp", b"closed, renamed, then the crash")
    driver.rename("report.tmp", "report")
    driver._run(driver.fs.fsyncdir)  # the rename is on the disk
    driver.core.stop(drain=False)  # the crash: nothing was sent
    assert keys_in_s3(driver) == []
    driver.core.start(upload_delay=0.0)  # the next mount uploads the journal first
    assert keys_in_s3(driver) == ["vol/report"]
    assert driver.read_file("report") == b"closed, renamed, then the crash"


def test_a_file_deleted_before_its_upload_never_reaches_s3(held: CoreDriver) -> None:
    driver = held
    before = len(driver.core.store.calls)
    driver.write_file("scratch.tmp", b"gone before it went")
    driver.unlink("scratch.tmp")
    driver.core.stop()
    assert [c for c in sent_since(driver, before, "put") if "scratch.tmp" in c] == []
    assert keys_in_s3(driver) == []


def test_fsync_and_sync_close_do_not_wait_for_the_delay(held: CoreDriver) -> None:
    driver = held
    start = time.monotonic()
    fsynced(driver, "synced.txt", b"wanted in S3 now")
    assert keys_in_s3(driver) == ["vol/synced.txt"]
    assert time.monotonic() - start < HOLD / 2  # (it did not sit out the delay)
    driver.core.stop()
    driver.core.start(upload_delay=HOLD, sync_close=True)
    driver.write_file("closed.txt", b"close returns once in S3")
    assert "vol/closed.txt" in keys_in_s3(driver)


def test_without_a_delay_an_upload_starts_at_close(driver: CoreDriver) -> None:
    driver.core.stop()
    driver.core.start(upload_delay=0.0)
    driver.write_file("now.txt", b"sent at once")
    wait_for(lambda: "vol/now.txt" in keys_in_s3(driver), 20, "the upload")
    driver.write_file("later.tmp", b"renamed after its upload")
    wait_for(lambda: "vol/later.tmp" in keys_in_s3(driver), 20, "the upload")
    driver.rename("later.tmp", "later")  # the long way: a copy in S3
    assert sorted(keys_in_s3(driver)) == ["vol/later", "vol/now.txt"]
    assert driver.read_file("later") == b"renamed after its upload"


def test_fsync_of_the_directory_puts_a_queued_rename_on_the_disk(held: CoreDriver) -> None:
    driver = held
    commits = driver.fs.journal.commits
    commits.interval = 3600.0
    time.sleep(0.7)  # the committer's current round ends: no more rounds
    driver.write_file("index.tmp", b"renamed, then the directory fsync'ed")
    driver.rename("index.tmp", "index")
    assert commits.durable < commits.written  # neither the close nor the rename flushed
    driver._run(driver.fs.fsyncdir)
    assert commits.durable >= commits.written


def test_a_streamed_file_completes_at_once(held: CoreDriver) -> None:
    """A large file sent in parts while it was written is not held back: its upload is
    mostly done, under its name, and waiting would only risk sending it again whole."""
    driver = held
    part = driver.core.store.settings.part_size
    driver.write_file("big.bin", os.urandom(3 * part))
    node = driver._lookup("big.bin")
    assert driver.fs.writes.counters["streams"] == 1  # it was streamed
    wait_for(lambda: node.w.local is None, 30, "the streamed version to complete")
    assert keys_in_s3(driver) == ["vol/big.bin"]


def test_the_delay_comes_back_after_a_drain(held: CoreDriver) -> None:
    """`s3cryptfs umount` drains first and may then be refused (the mount is in use): the
    mount goes on, and so does the delay for what is closed next."""
    driver = held
    driver.write_file("before.txt", b"closed before the drain")
    assert driver.core.call(driver.fs.drain, 5.0) == []
    assert keys_in_s3(driver) == ["vol/before.txt"]
    driver.write_file("after.tmp", b"closed after the drain")
    local = driver._lookup("after.tmp").w.local
    assert local is not None and local.not_before > time.monotonic() + HOLD / 2
    before = len(driver.core.store.calls)
    driver.rename("after.tmp", "after.txt")
    assert sent_since(driver, before, "copy") == []


def test_a_file_renamed_over_another_then_away_leaves_the_name_empty_in_s3(
    held: CoreDriver,
) -> None:
    """pjdfstest's rename/09 pattern: `b` is in S3, `a` is renamed over it and, before its
    upload, renamed away again. The version queued for `b` had replaced b's object; moved to
    `c`, it must take that object with it, or the deleted `b` comes back at the next mount
    (and a mkfifo of `b` fails its If-None-Match with EIO)."""
    driver = held
    fsynced(driver, "b", b"what b held")
    driver.write_file("a", b"what a held")
    driver.rename("a", "b")
    driver.rename("b", "c")
    assert not driver.exists("b")
    assert "vol/b" not in keys_in_s3(driver)
    # A FIFO where b was: its put wants an empty name.
    driver._run(driver.fs.mknod, 1, "b", stat.S_IFIFO | 0o644, 0, 0, 0)
    driver.core.stop()
    assert sorted(keys_in_s3(driver)) == ["vol/b", "vol/c"]
    driver.core.start()
    assert driver.read_file("c") == b"what a held"
    assert driver.stat("b").mode == stat.S_IFIFO | 0o644


def test_a_version_moved_into_a_directory_not_listed_yet_is_listed_there(
    held: CoreDriver,
) -> None:
    """The moved version is in S3 under no name until its upload: a listing of its new
    directory fetched from S3 must add it, as it adds a file created here."""
    driver = held
    driver.mkdir("a")
    fsynced(driver, "a/b", b"in S3")
    driver.remount()  # nothing listed
    driver.rename("a/b", "c")  # in S3: copied
    driver.truncate("c", 1)  # a new version, queued
    driver.rename("c", "a/b")  # moved in the journal; a/ was never listed
    assert driver.listdir("a") == ["b"]
    driver.core.stop()
    assert sorted(keys_in_s3(driver)) == ["vol/a/", "vol/a/b"]


def test_a_crash_after_renaming_a_rewritten_file_brings_no_old_name_back(
    held: CoreDriver,
) -> None:
    """The versions a queued one replaced stay in the journal until the next flush (a power
    loss must leave one of them): a rename that moves the newest syncs first, or a crash
    right after it sends the older ones under the old name."""
    driver = held
    driver.write_file("draft", b"first draft, 70 kB " * 4000)  # a body file of its own
    driver.write_file("draft", b"second draft")
    driver.rename("draft", "final")
    driver.core.stop(drain=False)  # the crash
    driver.core.start()
    driver.core.stop()  # (the recovered versions are in S3 once this returns)
    assert keys_in_s3(driver) == ["vol/final"]
    driver.core.start()
    assert driver.read_file("final") == b"second draft"
