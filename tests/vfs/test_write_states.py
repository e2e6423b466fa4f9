"""The write path's states, driven without a kernel, with faults injected into the real store:
upload failures and their retries, an S3 outage, a conflict with another writer, a key manager
that does not answer at close, a crash with a file kept as closed, and attributes changed while
a version waits for its upload."""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from s3cryptfs.errors import ProviderUnavailable
from s3cryptfs.format import metadata as md
from s3cryptfs.upload.journal import Entry, Upload
from s3cryptfs.upload.state import FileWrite, Staged
from s3cryptfs.upload.stream import PHASES, Phase
from tests.vfs.harness import CoreDriver, CoreFs


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def in_s3(driver: CoreDriver, name: str) -> bool:
    client = driver.core.store._client
    try:
        client.head_object(Bucket=driver.core.url.bucket, Key=f"vol/{name}")
    except client.exceptions.ClientError:
        return False
    return True


def keys_in_s3(driver: CoreDriver) -> list[str]:
    client = driver.core.store._client
    found = client.list_objects_v2(Bucket=driver.core.url.bucket, Prefix="vol/")
    return [o["Key"] for o in found.get("Contents", []) if "/.s3cryptfs/" not in o["Key"]]


def another_machine_writes(seaweed, bucket: str, tmp_path, name: str, data: bytes) -> None:
    """A second Filesystem on the volume (another machine) writes *name*, until in S3."""
    other = CoreFs(seaweed, bucket, tmp_path / "other").start()
    try:
        CoreDriver(other).write_file(name, data)
        other.call(other.fs.drain, 5.0)
    finally:
        other.stop(drain=False)


# --- the tables ---------------------------------------------------------------------------------


def test_a_write_back_file_moves_only_along_its_table() -> None:
    w = FileWrite()
    assert w.state is Staged.NONE
    with pytest.raises(AssertionError, match="no transition"):
        w._to(Staged.CLOSED)  # nothing to keep before there is a write-back file
    w.state = Staged.CLOSED
    w.dirtied()  # written again while kept: still kept until a seal works
    assert w.state is Staged.CLOSED and w.unsealed and w.busy


def test_uploads_and_streams_move_only_along_their_tables() -> None:
    entry = Entry(1, "k", "/nowhere", {}, ("absent", ""), 0, 0)
    entry.to(Upload.UPLOADING)
    entry.to(Upload.QUEUED)  # a failed attempt: retried
    entry.to(Upload.UPLOADING)
    entry.to(Upload.DONE)
    with pytest.raises(AssertionError, match="no transition"):
        entry.to(Upload.QUEUED)  # nothing comes back from S3
    assert Phase.RUNNING not in PHASES[Phase.CLOSING] and not PHASES[Phase.DROPPED]


# --- a file's life ------------------------------------------------------------------------------


def test_a_file_goes_dirty_sealed_uploaded(driver: CoreDriver) -> None:
    fh = driver.core.call(driver.fs.create, 1, "life.txt", 0o100644, os.getuid(), 0).fh
    node = driver._lookup("life.txt")
    driver.write_at(fh, 0, b"first words")
    assert node.w.state is Staged.DIRTY and driver.fs.state_of(node) == "dirty"
    driver.core.store.fail("put", "life.txt", times=None)  # S3 refuses it for now
    driver.close(fh)
    assert node.w.state in (Staged.CLEAN, Staged.NONE)  # sealed into the journal
    local = node.w.local
    assert local is not None and local.state in (Upload.QUEUED, Upload.UPLOADING)
    wait_for(lambda: local.attempts >= 1 and local.error is not None, what="a failed attempt")
    assert not in_s3(driver, "life.txt")
    assert driver.read_file("life.txt") == b"first words"  # read from the journal meanwhile
    driver.core.store.heal()
    wait_for(lambda: local.state is Upload.DONE, 30, "the retry to land")
    assert in_s3(driver, "life.txt") and node.w.local is None
    assert node.w.state is Staged.NONE  # nobody writes it: the write-back file is gone
    assert driver.fs.state_of(node) == "clean"


def test_a_conflict_keeps_both_versions(driver: CoreDriver) -> None:
    driver.write_file("c.txt", b"ours")
    node = driver._lookup("c.txt")
    wait_for(lambda: in_s3(driver, "c.txt"), what="the first version")
    driver.core.store.conflict_on("c.txt")  # another writer changed it meanwhile
    fh = driver.open("c.txt", os.O_WRONLY | os.O_TRUNC)
    driver.write_at(fh, 0, b"our second version")
    with pytest.raises(OSError) as info:
        driver.fsync(fh)
    assert info.value.errno == errno.EIO
    driver.close(fh)
    copies = [k for k in keys_in_s3(driver) if ".conflict-" in k]
    assert len(copies) == 1 and copies[0].startswith("vol/c.txt.conflict-")
    assert node.w.local is None and driver.fs.state_of(node) != "dirty"


def test_versions_closed_after_a_conflict_follow_it_to_the_copy(driver: CoreDriver) -> None:
    """A shell's `echo final > s.txt` flushes the empty file first: when that version loses
    to another writer, the version closed next goes to the same copy (never an empty copy,
    never over the winner), and the file is the winner's again once nobody writes it."""
    driver.write_file("s.txt", b"the other writer's version")
    wait_for(lambda: in_s3(driver, "s.txt"), what="the first version")
    uploader = driver.fs.uploader
    driver.core.store.conflict_on("s.txt")  # the next write of s.txt loses
    fh = driver.open("s.txt", os.O_WRONLY | os.O_TRUNC)
    driver._run(driver.fs.flush, fh)  # the empty file, as the shell's dup2 and close leave it
    wait_for(lambda: uploader.conflicts == 1, what="the empty version to lose")
    node = driver._lookup("s.txt")
    assert node.w.diverted is not None  # still open for writing: the lineage goes on
    driver.write_at(fh, 0, b"final")
    driver.close(fh)
    wait_for(lambda: not uploader.pending, what="the follower")
    copies = [k.removeprefix("vol/") for k in keys_in_s3(driver) if ".conflict-" in k]
    assert len(copies) == 1, copies
    assert driver.read_file(copies[0]) == b"final"
    assert uploader.conflicts == 1  # one conflict, one copy: the follower is no new conflict
    assert node.w.diverted is None
    assert driver.read_file("s.txt") == b"the other writer's version"


def test_a_file_rewritten_while_its_conflict_settles_keeps_what_was_closed(
    driver: CoreDriver,
) -> None:
    """A version lost to another machine, which deleted the file; once nobody writes it here,
    the mount asks S3 what the name holds now. A shell writing the file again meanwhile (open
    with O_TRUNC, flush of the empty file, write, close) starts a new version from its own open:
    the late answer about the old one must not unlink the file under it (the closed content
    would go nowhere, and the empty flush be uploaded alone)."""
    store = driver.core.store
    driver.write_file("d.txt", b"first")
    wait_for(lambda: in_s3(driver, "d.txt"), what="the first version")
    node = driver._lookup("d.txt")
    copy_gate = store.hold("put", "d.txt.conflict-")
    fh = driver.open("d.txt", os.O_WRONLY | os.O_TRUNC)
    driver.write_at(fh, 0, b"ours, which loses")
    store.delete("vol/d.txt")  # another machine deletes it
    driver.close(fh)
    wait_for(lambda: any("conflict-" in c for c in store.arrived), what="the conflict copy")
    head_gate = store.hold("head", "vol/d.txt", times=1)  # the mount's look at the name after
    copy_gate.set()
    wait_for(lambda: "head vol/d.txt" in store.arrived, what="the look at the name")
    # The shell, while that answer is on its way:
    fh = driver.open("d.txt", os.O_WRONLY | os.O_TRUNC)
    driver._run(driver.fs.flush, fh)
    head_gate.set()
    wait_for(lambda: driver.fs.uploader.conflicts == 1 and not node.error, what="the answer")
    driver.write_at(fh, 0, b"written again")
    driver.close(fh)
    wait_for(lambda: not driver.fs.uploader.pending, what="the uploads")
    contents = {k.removeprefix("vol/"): driver.read_file(k.removeprefix("vol/"))
                for k in keys_in_s3(driver)}
    assert contents.get("d.txt") == b"written again", contents
    assert sorted(contents.values()) == [b"ours, which loses", b"written again"], contents


def _lose_and_hold_the_look(
    driver: CoreDriver, fh: int, name: str, server: tuple[Any, str, Any]
) -> threading.Event:
    """Write and close *name* through *fh* after another machine wrote it: this mount's
    version loses (its conflict copy is made), and the mount's look at what the name holds
    now is held at S3 until the returned gate is set."""
    store = driver.core.store
    driver.write_at(fh, 0, b"ours, which loses")
    another_machine_writes(*server, name, b"the winner")
    copy_gate = store.hold("put", f"{name}.conflict-")
    driver.close(fh)
    wait_for(lambda: any("conflict-" in c for c in store.arrived), what="the conflict copy")
    head_gate = store.hold("head", f"vol/{name}", times=1)
    copy_gate.set()
    wait_for(lambda: f"head vol/{name}" in store.arrived, what="the look at the name")
    return head_gate


@pytest.mark.parametrize("made_here", [False, True], ids=["in-s3-before", "made-here"])
def test_a_file_read_while_its_lost_version_settles_is_the_winner(
    core: CoreFs, driver: CoreDriver, seaweed, bucket, tmp_path, made_here: bool
) -> None:
    """An open for reading right after this mount's version lost to another machine's, while
    the mount is still asking S3 what the name holds: the open's own look finds the winner,
    and reads it (not EIO for the version that lost). *made_here*: the file was created on
    this mount and never in S3 (no version of it known), and another machine created the
    name first."""
    if made_here:
        root = driver._lookup("")
        fh = driver._run(driver.fs.create, root.ino, "w.txt", 0o100644, os.getuid(), 0).fh
    else:
        driver.write_file("w.txt", b"first")
        wait_for(lambda: in_s3(driver, "w.txt"), what="the first version")
        fh = driver.open("w.txt", os.O_WRONLY | os.O_TRUNC)
    head_gate = _lose_and_hold_the_look(driver, fh, "w.txt", (seaweed, bucket, tmp_path))
    try:
        assert driver.read_file("w.txt") == b"the winner"
    finally:
        head_gate.set()
    wait_for(lambda: not driver.fs.uploader.pending, what="the copy")
    assert driver.read_file("w.txt") == b"the winner"


def test_a_descriptor_opened_before_a_lost_version_reads_the_winner(
    driver: CoreDriver, seaweed, bucket, tmp_path
) -> None:
    """`tail -f`-style reader with the file open since before this mount's version lost to
    another machine's: a read while the mount asks S3 what the name holds waits for that
    answer and returns the winner, not EIO for the version that lost."""
    driver.write_file("r.txt", b"first")
    wait_for(lambda: in_s3(driver, "r.txt"), what="the first version")
    reader = driver.open("r.txt", os.O_RDONLY)
    assert driver.read_at(reader, 0, 100) == b"first"
    fh = driver.open("r.txt", os.O_WRONLY | os.O_TRUNC)
    head_gate = _lose_and_hold_the_look(driver, fh, "r.txt", (seaweed, bucket, tmp_path))
    got: list[bytes | BaseException] = []

    def read() -> None:
        try:
            got.append(driver.read_at(reader, 0, 100))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            got.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        thread.join(0.5)
        assert not got, got  # waits for the answer (EIO before it, with the old code)
    finally:
        head_gate.set()
        thread.join(30)
    assert got == [b"the winner"], got
    driver.close(reader)


def test_a_late_listing_head_does_not_move_the_base_of_a_file_being_written(
    core: CoreFs, driver: CoreDriver, seaweed, bucket, tmp_path
) -> None:
    """A listing's HEAD of a file answers after the file was opened for writing here, and
    tells of a version another machine stored since that open: what this mount closes next
    is still based on the version its open found, so it becomes a conflict copy instead of
    replacing the other machine's version unseen."""
    driver.write_file("h.txt", b"first")
    wait_for(lambda: in_s3(driver, "h.txt"), what="the first version")
    node = driver._lookup("h.txt")
    fh = driver.open("h.txt", os.O_WRONLY)
    another_machine_writes(seaweed, bucket, tmp_path, "h.txt", b"the other machine's")
    driver._run(driver.fs.listing.head_metadata, node)  # (as a HEAD begun before the open)
    driver.write_at(fh, 0, b"ours")
    driver.close(fh)
    wait_for(lambda: not driver.fs.uploader.pending, what="the upload")
    contents = {k.removeprefix("vol/"): driver.read_file(k.removeprefix("vol/"))
                for k in keys_in_s3(driver)}
    assert contents.pop("h.txt") == b"the other machine's"
    assert list(contents.values()) == [b"ourst"], contents  # (written over "first")


def test_a_rename_that_waited_for_an_upload_lost_to_a_delete_elsewhere_says_enoent(
    driver: CoreDriver,
) -> None:
    """A new file's rename waits for its first upload; another machine created the name and
    deleted it again meanwhile, so the upload loses and goes to a conflict copy. The rename
    must fail with ENOENT and leave no node under the new name: given that name, the deleted
    node made every later open of it fail with ESTALE, even open(O_CREAT|O_TRUNC) (seen with
    three mounts on one bucket)."""
    store = driver.core.store
    gate = store.hold("put", "vol/f1")
    driver.write_file("f1", b"our version")
    local = driver._lookup("f1").w.local
    assert local is not None
    wait_for(lambda: local.state is Upload.UPLOADING, what="its upload to wait at the gate")
    store.conflict_on("vol/f1")  # the other machine's version was there first (and is gone)
    failed: list[BaseException] = []

    def rename() -> None:
        try:
            driver.rename("f1", "f2")
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failed.append(exc)

    renaming = threading.Thread(target=rename)
    renaming.start()
    time.sleep(0.5)  # (the rename is waiting for that upload by now)
    gate.set()
    renaming.join(30)
    assert not renaming.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], OSError), failed
    assert failed[0].errno == errno.ENOENT
    copies = [k.removeprefix("vol/") for k in keys_in_s3(driver) if ".conflict-" in k]
    assert len(copies) == 1 and driver.read_file(copies[0]) == b"our version"
    assert not driver.exists("f2") and not driver.exists("f1")
    driver.write_file("f2", b"written after")  # the name is free, as on a local disk
    assert driver.read_file("f2") == b"written after"


def test_a_key_manager_away_at_close_keeps_the_file_closed(driver: CoreDriver) -> None:
    fs = driver.fs
    fs.codec.pool = None  # no keys wrapped ahead of time: the close needs the key manager
    real = fs.codec._wrap

    def unavailable(*args: object) -> object:
        raise ProviderUnavailable("the key manager does not answer (injected)")

    fs.codec._wrap = unavailable  # type: ignore[method-assign]
    driver.write_file("k.txt", b"closed while the KMS is away")  # close() succeeds
    node = driver._lookup("k.txt")
    assert node.w.state is Staged.CLOSED
    assert node.w.staging is not None
    marker = node.w.staging.path.removesuffix(".plain") + ".closed"
    assert os.path.exists(marker)
    assert [(k, kind) for k, kind, _ in fs.not_in_s3()] == [("vol/k.txt", "key manager")]
    fh = driver.open("k.txt", os.O_RDONLY)
    assert driver.read_at(fh, 0, 100) == b"closed while the KMS is away"
    driver.close(fh)
    fs.codec._wrap = real  # type: ignore[method-assign]
    wait_for(lambda: node.w.state is not Staged.CLOSED, 10, "the retry to seal it")
    wait_for(lambda: in_s3(driver, "k.txt"), 30, "the upload")
    assert not os.path.exists(marker)
    # In S3 a moment before the uploader has taken note of it.
    wait_for(lambda: fs.not_in_s3() == [], 10, "the uploader to note the upload")


def test_a_crash_with_a_file_kept_closed_loses_nothing(driver: CoreDriver) -> None:
    fs = driver.fs
    fs.codec.pool = None

    def unavailable(*args: object) -> object:
        raise ProviderUnavailable("the key manager does not answer (injected)")

    fs.codec._wrap = unavailable  # type: ignore[method-assign]
    driver.write_file("crash.txt", b"kept through a crash")
    assert driver._lookup("crash.txt").w.state is Staged.CLOSED
    driver.core.stop(drain=False)  # the crash: nothing more is done
    driver.core.start()  # a new process, the key manager back: it seals, then uploads
    assert in_s3(driver, "crash.txt")
    assert driver.read_file("crash.txt") == b"kept through a crash"


def test_a_small_file_sealed_at_close_on_the_event_loop_survives_a_crash(
    driver: CoreDriver,
) -> None:
    """With a key manager that wraps locally, a small file's close seals it into its journal
    slot without a trip to a worker thread; what that close acknowledged comes back after a
    crash and is uploaded. A file too large for a slot still goes through the thread."""
    fs = driver.fs
    fs.writes.settings.upload_delay = 60.0  # nothing leaves before the crash
    driver.write_file("small.txt", b"sealed on the event loop")
    assert fs.writes.counters["seals_on_event_loop"] == 1
    node = driver._lookup("small.txt")
    assert node.w.local is not None and node.w.local.slot is not None
    driver.write_file("large.bin", os.urandom(200 * 1024))
    assert fs.writes.counters["seals_on_event_loop"] == 1
    assert not in_s3(driver, "small.txt")
    driver.core.stop(drain=False)  # the crash: nothing more is done
    driver.core.start()  # the journal's slot is found and uploaded first
    assert in_s3(driver, "small.txt") and in_s3(driver, "large.bin")
    assert driver.read_file("small.txt") == b"sealed on the event loop"


def test_an_outage_at_unmount_names_what_is_left(driver: CoreDriver) -> None:
    driver.write_file("early.txt", b"in S3 before the outage")
    wait_for(lambda: in_s3(driver, "early.txt"))
    driver.core.store.fail("put", times=None)
    driver.write_file("late.txt", b"closed during the outage")
    left = driver.core.stop()  # drains, gives up after 5 s without progress
    assert [(k, kind) for k, kind, _ in left] == [("vol/late.txt", "S3")]
    driver.core.store.heal()
    driver.core.start()  # the next mount uploads the journal first
    assert in_s3(driver, "late.txt")
    assert driver.read_file("late.txt") == b"closed during the outage"


def test_attributes_changed_before_the_upload_ride_with_it(driver: CoreDriver) -> None:
    """chmod, chown and touch of a file whose upload has not started change the queued version:
    one PUT carries them, no CopyObject follows."""
    driver.core.stop()
    driver.core.start(upload_concurrency=1)  # one upload at a time: the file waits its turn
    fs, store = driver.fs, driver.core.store
    gate = store.hold("put", "blocker")
    # Should a change wait for the upload (a copy after it), it ends, and the test fails.
    safety = threading.Timer(15, gate.set)
    safety.start()
    driver.write_file("blocker", b"in flight, held back")
    wait_for(lambda: "vol/blocker" in fs.uploader.in_flight, what="the blocker in flight")
    driver.write_file("attrs.txt", b"attributes change while queued")
    node = driver._lookup("attrs.txt")
    local = node.w.local
    assert local is not None and local.state is Upload.QUEUED
    before = len(store.calls)
    mtime = 1_600_000_000_123_456_789
    driver.chmod("attrs.txt", 0o640)
    driver._run(functools.partial(fs.setattr, node.ino, None, uid=4321, gid=4322))
    driver.utime("attrs.txt", mtime)
    assert node.w.local is local and local.state is Upload.QUEUED  # still the one upload
    gate.set()
    safety.cancel()
    wait_for(lambda: not fs.uploader.pending, what="both uploads")
    sent = store.calls[before:]
    assert not [c for c in sent if c.startswith("copy ")], sent
    assert [c for c in sent if c == "put vol/attrs.txt"] == ["put vol/attrs.txt"]
    driver.remount()
    client = store._client
    head = client.head_object(Bucket=driver.core.url.bucket, Key="vol/attrs.txt")
    attrs = md.PosixAttrs.decode(head["Metadata"])
    assert attrs.mode is not None and stat.S_IMODE(attrs.mode) == 0o640
    assert (attrs.uid, attrs.gid, attrs.mtime_ns) == (4321, 4322, mtime)
    assert driver.read_file("attrs.txt") == b"attributes change while queued"


def test_fsync_makes_the_journal_durable_even_when_s3_fails(driver: CoreDriver) -> None:
    """A close leaves its flush to the group commit; fsync() flushes at once, before it waits
    for S3: when the upload fails and fsync says so, the version is on the disk anyway."""
    commits = driver.fs.journal.commits
    commits.interval = 3600.0
    time.sleep(0.7)  # the committer's current round ends: no more rounds
    driver.core.store.fail("put", "synced.txt", times=None)
    driver.write_file("closed.txt", b"closed, flushed later")
    assert commits.durable < commits.written  # the close did not flush
    fh = driver.core.call(driver.fs.create, 1, "synced.txt", 0o100644, os.getuid(), 0).fh
    driver.write_at(fh, 0, b"fsync'ed")
    with pytest.raises(OSError) as info:
        driver.fsync(fh)
    assert info.value.errno == errno.EIO
    assert commits.durable == commits.written  # both versions are on the disk
    driver.core.store.heal()
    driver.close(fh)
