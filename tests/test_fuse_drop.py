"""fuse_drop.EntryDropper without a kernel: a sweep's names go out in one batch once no
request that makes inodes is in flight, never wait unbounded for one, and the main loop never
waits unbounded for the kernel (pyfuse3.invalidate_entry is replaced by a recorder). The
kernel's side is tests/test_inode_bound.py."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pyfuse3
import pytest
import trio
import trio.testing

from s3cryptfs import fuse_drop
from s3cryptfs.fuse_drop import EntryDropper, Names


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes]]:
    calls: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda p, n: calls.append((p, n)))
    return calls


@pytest.fixture
def blocking(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[bytes]]:
    """A kernel whose invalidations block until the event is set (the names they sent)."""
    release = threading.Event()
    calls: list[bytes] = []

    def invalidate(parent: int, name: bytes) -> None:
        release.wait(5)
        calls.append(name)

    monkeypatch.setattr(pyfuse3, "invalidate_entry", invalidate)
    monkeypatch.setattr(fuse_drop, "STALL", 0.05)
    return release, calls


async def until(condition: Callable[[], object], seconds: float = 2.0) -> None:
    """Polls: what is awaited happens on another thread or in the dropper's own task."""
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await trio.sleep(0.005)
    raise AssertionError("timed out")


def dropper(pending: Names) -> EntryDropper:
    def take() -> Names:
        names = pending.copy()
        pending.clear()
        return names

    return EntryDropper(take)


def test_names_go_out_together_between_requests(sent: list[tuple[int, bytes]]) -> None:
    pending: Names = []
    drop = dropper(pending)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with drop.request():  # a readdir whose reply is still to go out
                pending.extend([(1, b"a"), (1, b"b")])
                drop.wake(nursery)
                await trio.sleep(0.05)
                assert sent == []
            # Another request begins during the pause after the first: the names wait.
            await trio.sleep(fuse_drop.QUIET / 4)
            with drop.request():
                await trio.sleep(0.02)
                assert sent == []
            # And one that begins and ends within a pause: the pause starts again after it.
            await trio.sleep(fuse_drop.QUIET / 4)
            with drop.request():
                await trio.sleep(fuse_drop.QUIET / 4)
            await trio.sleep(fuse_drop.QUIET)  # past the end of the pause it came in
            assert sent == []
            await until(lambda: sent, 1)
            assert sent == [(1, b"a"), (1, b"b")]
            assert drop.sent == 2 and drop.stalls == 0
            nursery.cancel_scope.cancel()

    # Virtual time: the pauses are milliseconds, which a loaded machine's scheduler would
    # stretch past QUIET on a real clock.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_busy_mount_still_sends_its_names(sent: list[tuple[int, bytes]]) -> None:
    pending: Names = [(7, b"x")]
    drop = dropper(pending)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with drop.request():  # never done while the names wait
                drop.wake(nursery)
                await until(lambda: sent, fuse_drop.QUIET_WAIT + 1)
            assert sent == [(7, b"x")]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_loop_stops_waiting_for_a_kernel_that_blocks(
    blocking: tuple[threading.Event, list[bytes]],
) -> None:
    """An invalidation waits for requests in flight on its directory, which the loop that
    waits for it answers: it must give up waiting, and the names still go out after."""
    release, calls = blocking
    drop = dropper([(1, b"f"), (1, b"g")])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            drop.wake(nursery)
            await until(lambda: drop.stalls, 2)
            assert calls == []
            release.set()
            await until(lambda: len(calls) >= 2, 2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert calls == [b"f", b"g"]


def test_a_vanished_entry_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def gone(parent: int, name: bytes) -> None:
        raise FileNotFoundError(2, "no such entry")

    monkeypatch.setattr(pyfuse3, "invalidate_entry", gone)
    drop = dropper([(1, b"f")])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            drop.wake(nursery)
            await until(lambda: drop.sent, 2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert drop.stalls == 0


def test_after_stop_no_name_goes_out_and_the_thread_ends(
    blocking: tuple[threading.Event, list[bytes]],
) -> None:
    """At stop (before pyfuse3.terminate) the batch under way ends after the name being sent,
    while the loop still serves; nothing is sent after: an invalidation waiting for a request
    nobody reads any more would never return."""
    release, calls = blocking
    pending: Names = [(1, b"f"), (1, b"g"), (1, b"h")]
    drop = dropper(pending)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            drop.wake(nursery)
            await until(lambda: drop.stalls, 2)  # the kernel holds the first name
            served = []

            async def stopping() -> None:
                await drop.stop(wait=5)
                served.append("stopped")

            nursery.start_soon(stopping)
            await trio.sleep(0.05)
            served.append("a request answered meanwhile")
            release.set()
            await until(lambda: served[-1:] == ["stopped"], 5)
            assert served == ["a request answered meanwhile", "stopped"]
            pending.append((1, b"late"))
            drop.wake(nursery)
            await trio.sleep(0.1)
            thread = drop._thread
            assert thread is not None
            await trio.to_thread.run_sync(thread.join, 2)
            assert not thread.is_alive()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert calls == [b"f"]


def test_a_name_the_kernel_refuses_does_not_stop_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[bytes] = []

    def refusing(parent: int, name: bytes) -> None:
        if name == b"bad":
            raise RuntimeError("session gone")
        calls.append(name)

    monkeypatch.setattr(pyfuse3, "invalidate_entry", refusing)
    drop = dropper([(1, b"bad"), (1, b"ok")])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            drop.wake(nursery)
            await until(lambda: calls, 2)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert calls == [b"ok"] and drop.stalls == 0
    assert "could not ask the kernel to drop an entry: session gone" in caplog.text
