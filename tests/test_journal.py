"""The journal's slot pool (upload/slots.py): small versions committed with one flush survive a
crash, torn or freed slots do not come back, and a rewritten record wins over the old one."""

from __future__ import annotations

import os

import pytest

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
