"""A directory's mtime follows the names added to and removed from it, and survives a remount."""

from __future__ import annotations

import os
import time

OLD = 1_500_000_000  # 2017: any change to the directory moves its mtime past this


def _mtime(path) -> int:
    return os.stat(path).st_mtime_ns


def test_directory_mtimes_move_with_their_entries_and_survive_a_remount(mounted):
    m = mounted.mountpoint
    for d in ("created", "removed", "linked", "renamed_from", "renamed_to", "dir_made"):
        (m / d).mkdir()
    (m / "removed" / "f").write_bytes(b"x")
    (m / "renamed_from" / "f").write_bytes(b"x")
    for d in ("created", "removed", "linked", "renamed_from", "renamed_to", "dir_made"):
        os.utime(m / d, (OLD, OLD))
    os.utime(m, (OLD, OLD))
    before = time.time_ns()
    (m / "created" / "new").write_bytes(b"new")
    os.unlink(m / "removed" / "f")
    os.symlink("target", m / "linked" / "l")
    os.rename(m / "renamed_from" / "f", m / "renamed_to" / "f")
    (m / "dir_made" / "sub").mkdir()
    (m / "top").write_bytes(b"in the root")
    names = ["created", "removed", "linked", "renamed_from", "renamed_to", "dir_made"]
    seen = {d: _mtime(m / d) for d in names}
    seen[""] = _mtime(m)
    for d, mtime in seen.items():
        assert mtime >= before - 2 * 10**9, d  # moved (coarse clocks allowed)
    mounted.remount()
    after = {d: _mtime(m / d) for d in names}
    after[""] = _mtime(m)
    assert after == seen


def test_touching_a_directory_after_changing_it_wins_over_the_change(mounted):
    m = mounted.mountpoint
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"x")
    os.utime(m / "d", (OLD, OLD))
    mounted.remount()
    assert _mtime(m / "d") == OLD * 10**9
