"""Progress of rewrap, migrate and fsck: a bar on a terminal, lines for logs, nothing in scripts."""

from __future__ import annotations

import io
import re
import time

from s3cryptfs.ops import progress as progress_mod
from s3cryptfs.ops.progress import Progress


def test_plain_lines_carry_count_total_rate_and_time_left(monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 0.0)
    out = io.StringIO()
    shown = Progress("rewrap", "plain", out, describe=lambda: "3 re-wrapped")
    shown.count_in_background(lambda: 10)
    deadline = time.monotonic() + 10
    while shown.total is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(4):
        shown.advance()
    shown.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one per object, one at the end
    assert re.fullmatch(
        r"rewrap: 4 of 10 objects, [0-9.]+/s, 0:0\d so far, about 0:0\d left; 3 re-wrapped",
        lines[-1],
    ), lines[-1]


def test_auto_shows_nothing_off_a_terminal_and_a_failed_count_only_loses_the_total():
    out = io.StringIO()
    shown = Progress("fsck", "auto", out)
    shown.count_in_background(lambda: 1 // 0)
    shown.advance(3)
    shown.close()
    assert out.getvalue() == "" and shown.total is None and shown.done == 3


def test_the_bar_counts_objects():
    out = io.StringIO()
    shown = Progress("fsck", "bar", out, describe=lambda: "0 bad")
    shown.advance(7)
    time.sleep(0.2)  # the bar redraws at most every 0.1 s
    shown.advance(1)
    shown.close()
    assert "fsck: 8 objects" in out.getvalue() and "0 bad" in out.getvalue()


def test_commands_show_progress_only_when_asked(mounted):
    m = mounted.mountpoint
    for i in range(5):
        (m / f"f{i}").write_bytes(b"x" * 100)
    mounted.umount()
    quiet = mounted.run("fsck", mounted.url, *mounted.common_args())
    assert quiet.returncode == 0 and "objects/s" not in quiet.stderr and "\r" not in quiet.stderr
    bar = mounted.run("fsck", mounted.url, *mounted.common_args(), "--progress", "bar")
    assert bar.returncode == 0 and "fsck" in bar.stderr and "objects" in bar.stderr
    assert "5 objects" in bar.stdout or "objects in" in bar.stdout
    plain = mounted.run("rewrap", mounted.url, *mounted.common_args(), "--progress", "plain")
    assert plain.returncode == 0
    assert re.search(r"^rewrap: \d+( of \d+)? objects, ", plain.stderr, re.M), plain.stderr
