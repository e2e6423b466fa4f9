"""The uploader's retries (upload/uploader.py), without a mount or S3: a failed upload and a
conflict copy that could not be stored both put the version back at the head of the queue,
tell its waiters, and wake the uploader. Many small uploads go out at once, up to its bound."""

from __future__ import annotations

import threading
import time

import trio

from s3cryptfs.errors import PreconditionFailed, StoreError, TransientStoreError
from s3cryptfs.upload.journal import ABSENT, Entry, Journal, Upload
from s3cryptfs.upload.uploader import CONFLICT_RETRY, Uploader, copy_names


class FailingStore:
    """upload_file fails as told (per key); head fails, so no earlier attempt is found."""

    def __init__(self, failures: dict[str, Exception]) -> None:
        self.failures = failures
        self.uploads: list[str] = []

    def upload_file(self, key: str, *args, **kwargs) -> str:
        self.uploads.append(key)
        for prefix, exc in self.failures.items():
            if key.startswith(prefix):
                raise exc
        return '"etag"'

    def head(self, key: str):
        raise StoreError(f"head {key}: unavailable")


def queued_entry(journal: Journal, key: str) -> Entry:
    seq = journal.next_seq()
    with journal.open_body(seq) as f:
        f.write(b"x" * 64)
    entry = Entry(
        seq=seq,
        key=key,
        body_path=journal.body_path(seq),
        metadata={"encryption-wrapped-key": "QUJD"},
        base=ABSENT,
        plain_size=20,
        body_size=64,
    )
    journal.write_record(entry)
    return entry


def attempt(tmp_path, failures: dict[str, Exception]) -> tuple[Uploader, Entry, FailingStore]:
    """One upload attempt of a new file, as the uploader's run loop starts it."""
    store = FailingStore(failures)
    journal = Journal(str(tmp_path / "journal"))
    uploader = Uploader(store, journal, trio.CapacityLimiter(2))
    entry = queued_entry(journal, "vol/a")

    async def main() -> None:
        uploader.submit(entry)
        uploader._wakeup = trio.Event()  # as the run loop leaves it before it sleeps
        uploader._dequeue(entry)
        uploader.in_flight[entry.key] = entry
        entry.to(Upload.UPLOADING)
        await uploader._upload(entry)

    trio.run(main)
    return uploader, entry, store


def assert_requeued(uploader: Uploader, entry: Entry, error: type, delay: float) -> None:
    assert entry.state is Upload.QUEUED
    assert isinstance(entry.error, error)
    assert uploader.queue[0] is entry and not uploader.in_flight
    assert entry.attempts == 1
    assert 0 < entry.not_before - time.monotonic() <= delay
    assert uploader._wakeup.is_set()  # the freed slot is used at once, not at the next poll


def test_a_failed_upload_is_queued_again(tmp_path):
    uploader, entry, store = attempt(tmp_path, {"vol/a": TransientStoreError("503")})
    assert store.uploads == ["vol/a"]
    assert_requeued(uploader, entry, TransientStoreError, 2.0)


def test_a_conflict_copy_that_failed_is_queued_again(tmp_path):
    failures: dict[str, Exception] = {
        "vol/a.conflict-": StoreError("put: 500"),
        "vol/a": PreconditionFailed("someone else wrote it"),
    }
    uploader, entry, store = attempt(tmp_path, failures)
    assert store.uploads[0] == "vol/a" and store.uploads[1].startswith("vol/a.conflict-")
    assert_requeued(uploader, entry, StoreError, CONFLICT_RETRY)


def test_conflict_copy_names_stay_within_the_name_and_key_limits():
    """A conflict copy goes next to its file even when the file's name or key is as long as
    they may be: the name is shortened (never cut inside a character), the folder kept."""
    first = copy_names("vol/a.txt", 3)[0]
    assert first.startswith("vol/a.txt.conflict-") and first.endswith("-3")
    long_name = "é" * 127 + "x"  # 255 bytes
    deep = "vol/" + "/".join(["d" * 200] * 4) + "/"
    for key in (f"vol/{long_name}", deep + "f" * (1024 - len(deep)), deep + long_name[:100]):
        folder = key.rsplit("/", 1)[0] + "/"
        for copy in copy_names(key, 12345):
            assert copy.startswith(folder) and "/" not in copy[len(folder) :]
            assert len(copy.rsplit("/", 1)[1].encode()) <= 255, copy
            assert len(copy.encode()) <= 1024, copy
            assert ".conflict-" in copy


class SlowStore:
    """upload_file takes a while (a round trip to a far server); counts how many at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.uploaded: list[str] = []

    def upload_file(self, key: str, *args, **kwargs) -> str:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(0.05)
        with self.lock:
            self.now -= 1
            self.uploaded.append(key)
        return '"etag"'


def test_many_small_uploads_go_out_together_but_no_more_than_the_bound(tmp_path):
    store = SlowStore()
    journal = Journal(str(tmp_path / "journal"))
    uploader = Uploader(store, journal, trio.CapacityLimiter(64), concurrency=16)
    entries = [queued_entry(journal, f"vol/f{i:03d}") for i in range(100)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uploader.run)
            for entry in entries:
                uploader.submit(entry)
            started = time.monotonic()
            await uploader.drain()
            elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()
        # one at a time would take 100 x 0.05 s = 5 s
        assert elapsed < 2.5, elapsed

    trio.run(main)
    assert sorted(store.uploaded) == [e.key for e in entries]
    assert store.peak == 16  # as many as allowed, never more


def test_the_versions_of_each_key_stay_in_queue_order_through_every_change(tmp_path):
    """The per-key index of the queue (what closes and upload ends ask instead of a scan of
    the whole queue) follows every way an entry enters, leaves or moves."""
    journal = Journal(str(tmp_path / "journal"))
    uploader = Uploader(FailingStore({}), journal, trio.CapacityLimiter(2))

    def grouped() -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for e in uploader.queue:
            out.setdefault(e.key, []).append(e)
        return out

    async def main() -> None:
        a1, b1, c1 = (queued_entry(journal, k) for k in ("vol/a", "vol/b", "vol/c"))
        for e in (a1, b1, c1):
            uploader.submit(e, delay=60)
        a2 = queued_entry(journal, "vol/a")
        uploader.submit(a2, delay=60)  # coalesces a1 away
        assert a1.superseded_by is a2 and uploader.pending_for("vol/a") == [a2]
        assert uploader._by_key == grouped()
        uploader._dequeue(b1)  # the run loop takes b1 and sends it...
        uploader.in_flight[b1.key] = b1
        b1.to(Upload.UPLOADING)
        b2 = queued_entry(journal, "vol/b")
        uploader.submit(b2, delay=60)
        uploader._retry_later(b1, TransientStoreError("down"), 1.0)  # fails: back at the head
        assert uploader.queue[0] is b1 and uploader.pending_for("vol/b") == [b1, b2]
        assert uploader._by_key == grouped()
        uploader.hold(c1)  # a rename moves c1 to vol/d
        uploader.rekey(c1, "vol/d", ABSENT)
        assert uploader.pending_for("vol/c") == [] and uploader.pending_for("vol/d") == [c1]
        assert uploader._by_key == grouped()
        uploader.cancel("vol/b")  # deleted
        assert uploader.pending_for("vol/b") == []
        assert uploader._by_key == grouped() == {"vol/a": [a2], "vol/d": [c1]}

    trio.run(main)
