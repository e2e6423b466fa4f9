"""The journal's slot pool (upload/slots.py): small versions committed with one write survive a
crash, torn or freed slots do not come back, and a rewritten record wins over the old one. The
group commit (upload/commits.py) flushes many writes at once, and frees nothing a newer write
replaces before that write is flushed."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio

from s3cryptfs.upload.journal import ABSENT, Entry, Journal
from s3cryptfs.upload.slots import HEAD_LEN, SlotPool


def small_entry(journal: Journal, body: bytes, key: str = "vol/a") -> Entry:
    seq = journal.next_seq()
    slot = journal.slots.take()
    assert slot is not None
    entry = Entry(
        seq=seq,
        key=key,
        body_path=journal.slots.path,
        metadata={"s3cryptfs-format": "1", "encryption-wrapped-key": "QUJD"},
        base=ABSENT,
        plain_size=len(body) - 44,
        body_size=len(body),
        slot=slot,
        body_offset=journal.slots.offset(slot),
    )
    assert journal.write_slot(entry, body)
    return entry


def reopen(path) -> Journal:
    return Journal(str(path))


def test_committed_slots_come_back_after_a_restart(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    bodies = [os.urandom(100 + i) for i in range(5)]
    entries = [small_entry(journal, b, key=f"vol/{i}") for i, b in enumerate(bodies)]
    journal.remove(entries[1])  # uploaded: never comes back
    journal.slots.close()

    again = reopen(tmp_path / "journal")
    loaded = again.load()
    assert [e.key for e in loaded] == ["vol/0", "vol/2", "vol/3", "vol/4"]
    for e in loaded:
        with open(e.body_path, "rb") as f:
            body = os.pread(f.fileno(), e.body_size, e.body_offset)
        assert body == bodies[int(e.key.split("/")[1])]
    assert again.next_seq() > max(e.seq for e in entries)  # no seq is reused
    # the freed slot is available again, the loaded ones are not
    taken = {again.slots.take() for _ in range(again.slots.count - 4)}
    assert None not in taken and not taken & {e.slot for e in loaded}
    assert again.slots.take() is None


def test_a_torn_slot_is_ignored(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    entry = small_entry(journal, os.urandom(500))
    # a crash in the middle of the write: the body on disk differs from its digest
    os.pwrite(journal.slots.fd, b"\xff" * 16, journal.slots.offset(entry.slot) + 10)
    journal.slots.close()
    assert reopen(tmp_path / "journal").load() == []


def test_rewrite_moves_the_entry_and_the_newest_record_wins(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    body = os.urandom(300)
    entry = small_entry(journal, body)
    old_slot = entry.slot
    entry.metadata = {**entry.metadata, "s3cryptfs-mode": "100600"}
    journal.rewrite(entry)
    assert entry.slot != old_slot and entry.moves == 1 and entry.generation == 1
    # the old slot was freed without a flush; pretend the crash came before that reached
    # the disk: both copies are there, the newer generation must win
    start = journal.slots.offset(entry.slot) - HEAD_LEN
    raw = os.pread(journal.slots.fd, HEAD_LEN + 300 + 500, start)
    os.pwrite(journal.slots.fd, raw, journal.slots.offset(old_slot) - HEAD_LEN)
    os.pwrite(
        journal.slots.fd,
        (0).to_bytes(8, "big"),  # generation 0 for the stale copy
        journal.slots.offset(old_slot) - HEAD_LEN + 16,
    )
    journal.slots.close()
    loaded = reopen(tmp_path / "journal").load()
    # the stale copy is intact but of an older generation: one entry, with the new metadata
    assert len(loaded) == 1
    assert loaded[0].metadata["s3cryptfs-mode"] == "100600"
    with open(loaded[0].body_path, "rb") as f:
        assert os.pread(f.fileno(), 300, loaded[0].body_offset) == body


def test_without_a_free_slot_a_rewrite_becomes_files(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    entry = small_entry(journal, os.urandom(200))
    while journal.slots.take() is not None:
        pass
    entry.metadata = {**entry.metadata, "s3cryptfs-uid": "7"}
    journal.rewrite(entry)
    assert entry.slot is None and entry.body_path == journal.body_path(entry.seq)
    journal.slots.close()
    loaded = reopen(tmp_path / "journal").load()
    assert [e.metadata.get("s3cryptfs-uid") for e in loaded] == ["7"]
    assert loaded[0].slot is None


def test_an_entry_too_big_for_a_slot_is_refused(tmp_path):
    pool = SlotPool(str(tmp_path / "pool"), count=2, size=4096)
    pool.scan()
    with pytest.raises(ValueError):
        pool.write(0, 1, 0, bytes(4000), b"{}" * 100)


def test_an_uploaded_body_goes_to_the_trash_and_not_back(tmp_path):
    """remove() drops the record at once and moves the body aside (deleting a large file can
    take most of a second); neither comes back after a restart, and empty_trash deletes it."""
    journal = Journal(str(tmp_path / "journal"))
    seq = journal.next_seq()
    body = os.urandom(200_000)
    with journal.open_body(seq) as f:
        f.write(body)
    entry = Entry(
        seq=seq,
        key="vol/big",
        body_path=journal.body_path(seq),
        metadata={"s3cryptfs-format": "1"},
        base=ABSENT,
        plain_size=len(body) - 100,
        body_size=len(body),
    )
    journal.write_record(entry)
    assert [e.seq for e in Journal(str(tmp_path / "journal")).load()] == [seq]
    journal.remove(entry)
    assert os.listdir(journal.dir) == []
    assert [os.path.getsize(p) for p in journal.trash_paths()] == [len(body)]
    assert Journal(str(tmp_path / "journal")).load() == []  # not a version any more
    journal.empty_trash()
    assert journal.trash_paths() == []


# --- group commit (upload/commits.py) ---------------------------------------------------------


def count_flushes(journal: Journal, monkeypatch) -> list[int]:
    """The pool's fdatasyncs, counted where they happen (the os call itself)."""
    calls: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        if fd == journal.slots.fd:
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    return calls


def test_many_slot_writes_share_one_flush(tmp_path, monkeypatch):
    journal = Journal(str(tmp_path / "journal"))
    flushes = count_flushes(journal, monkeypatch)

    def closes(i: int) -> None:
        for n in range(10):
            small_entry(journal, os.urandom(200), f"vol/{i}-{n}")

    threads = [threading.Thread(target=closes, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert flushes == []  # 50 closes, no flush yet: each one was a write
    assert journal.commits.pending and journal.commits.written == 50
    journal.commits.flush()
    assert len(flushes) == 1 and not journal.commits.pending
    journal.commits.flush()  # nothing new: no flush at all
    assert len(flushes) == 1
    # what was written before the flush is on the disk
    journal.slots.close()
    assert len(reopen(tmp_path / "journal").load()) == 50


def test_concurrent_syncs_share_a_flush_and_the_timer_flushes_soon(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    commits = journal.commits
    real = commits._flush
    started: list[float] = []

    def slow_flush() -> None:
        started.append(time.monotonic())
        time.sleep(0.2)  # a busy disk: closers arriving meanwhile wait for this one
        real()

    commits._flush = slow_flush
    commits.interval = 0.05

    async def main() -> None:
        for n in range(20):
            small_entry(journal, os.urandom(100), f"vol/{n}")
        async with trio.open_nursery() as nursery:
            for _ in range(8):  # eight fsync() callers at once
                nursery.start_soon(commits.sync)
        assert len(started) == 1 and commits.durable == 20
        small_entry(journal, os.urandom(100), "vol/late")
        written_at = time.monotonic()
        with trio.move_on_after(1.0):
            await commits.run()  # (never returns)
        assert len(started) == 2 and not commits.pending  # not left lying around
        assert started[1] - written_at < 0.5  # an interval of 0.05 s, and a busy machine

    trio.run(main)


def test_a_replaced_version_stays_on_disk_until_its_replacement_is_flushed(tmp_path):
    """A crash (of the mount or of the machine) between the write of a new version and its
    flush finds the old one still there: never neither."""
    journal = Journal(str(tmp_path / "journal"))
    old = small_entry(journal, os.urandom(300), key="vol/f")
    journal.commits.flush()
    new = small_entry(journal, os.urandom(310), key="vol/f")
    journal.remove(old, replaced=True)
    assert not old.released
    raw = os.pread(journal.slots.fd, 8, journal.slots.offset(old.slot) - HEAD_LEN)
    assert raw == b"S3CFSLT1"  # still valid on the disk
    assert {e.seq for e in Journal(str(tmp_path / "journal")).load()} == {old.seq, new.seq}
    uploaded = small_entry(journal, os.urandom(100), key="vol/g")
    journal.remove(uploaded)  # in S3 already: it needs no flush, but goes after `old`
    assert not uploaded.released
    journal.commits.flush()
    assert old.released and uploaded.released
    assert [e.seq for e in Journal(str(tmp_path / "journal")).load()] == [new.seq]


def test_a_rewritten_slot_is_freed_only_after_the_flush(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    entry = small_entry(journal, os.urandom(300))
    journal.commits.flush()
    old_slot = entry.slot
    entry.metadata = {**entry.metadata, "s3cryptfs-mode": "100640"}
    journal.rewrite(entry)
    assert entry.slot != old_slot and entry.moves == 1
    # before the flush both copies are there (the new one may not survive a power loss)
    assert os.pread(journal.slots.fd, 8, journal.slots.offset(old_slot) - HEAD_LEN) == b"S3CFSLT1"
    assert old_slot not in journal.slots._free  # not to be taken by another close yet
    journal.commits.flush()
    assert os.pread(journal.slots.fd, 8, journal.slots.offset(old_slot) - HEAD_LEN) == bytes(8)
    [loaded] = Journal(str(tmp_path / "journal")).load()
    assert loaded.metadata["s3cryptfs-mode"] == "100640"


def test_a_pool_of_another_slot_count_keeps_its_versions(tmp_path):
    """A pool made by a version with fewer slots grows in place; one with more never shrinks
    (its last slots may hold versions waiting for upload)."""
    path = str(tmp_path / "pool")
    small = SlotPool(path, count=4, size=4096)
    small.scan()
    small.write(3, 7, 0, b"body", b'{"k": 1}')
    small.flush()
    small.close()
    grown = SlotPool(path, count=8, size=4096)
    assert os.path.getsize(path) == 8 * 4096
    assert [(e.slot, e.seq) for e in grown.scan()] == [(3, 7)]
    grown.write(6, 9, 0, b"more", b'{"k": 2}')
    grown.flush()
    grown.close()
    fewer = SlotPool(path, count=2, size=4096)
    assert fewer.count == 8 and os.path.getsize(path) == 8 * 4096
    assert sorted((e.slot, e.seq) for e in fewer.scan()) == [(3, 7), (6, 9)]


def test_an_entry_that_does_not_fit_its_slot_leaves_the_slot_to_its_taker(tmp_path):
    """write_slot refuses what does not fit, and the slot stays taken until the caller, once
    the version is committed as files, gives it back: given back at once, another version
    could take it and a failure of those files would then give it back a second time."""
    journal = Journal(str(tmp_path / "journal"))
    slot = journal.slots.take()
    assert slot is not None
    entry = Entry(
        seq=journal.next_seq(),
        key="vol/big-record",
        body_path=journal.slots.path,
        metadata={"s3cryptfs-format": "1"},
        base=ABSENT,
        plain_size=0,
        body_size=journal.slots.capacity,
        slot=slot,
        body_offset=journal.slots.offset(slot),
    )
    assert not journal.write_slot(entry, bytes(journal.slots.capacity))
    assert entry.slot is None
    others = {journal.slots.take() for _ in range(journal.slots.count - 1)}
    assert slot not in others  # still the caller's
    journal.slots.give_back(slot)
    assert journal.slots.take() == slot


def test_a_full_pool_grows_in_the_background_and_keeps_its_size(tmp_path):
    path = str(tmp_path / "pool")
    pool = SlotPool(path, count=2, size=4096, max_count=4, grow_by=2)
    pool.scan()
    assert pool.take() is not None and pool.take() is not None
    assert pool.take() is None  # full: this close takes the other path; the pool grows
    for _ in range(200):
        slot = pool.take()
        if slot is not None:
            break
        time.sleep(0.01)
    assert slot in (2, 3)
    assert os.path.getsize(path) == 4 * 4096
    pool.write(slot, 5, 0, b"b", b"{}")
    pool.flush()
    pool.close()
    again = SlotPool(path, count=2, size=4096, max_count=4, grow_by=2)
    assert again.count == 4
    assert [(e.slot, e.seq) for e in again.scan()] == [(slot, 5)]
