"""How long closing many small new files takes through the mount, and what each close costs.

    python3 bench/small_closes.py [--files 2000] [--strace]

Times writing N x 4 KiB files one after another (each open, write, close: what `cp` of a
tree of small files does) until the last close returned, then the unmount that uploads them.
With --strace, a second run counts the fsync and fdatasync calls the mount makes meanwhile.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import cli, start, timed  # noqa: E402

PASSWORD = b"benchmark password, not secret"


def write_files(folder: Path, count: int, data: bytes) -> None:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:05d}").write_bytes(data)


def count_syncs(pid: int, run: object) -> dict[str, int]:
    """Syscall counts of the mount process (all its threads) while *run* runs."""
    fd, out = tempfile.mkstemp(suffix=".strace")
    os.close(fd)
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", out, "-p", str(pid)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached to every thread before the first close
    run()  # type: ignore[operator]
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    counts: dict[str, int] = {}
    with open(out) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m and m.group(2) != "total":
                counts[m.group(2)] = int(m.group(1))
    os.unlink(out)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--strace", action="store_true", help="also count fsyncs (slower run)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s3cryptfs-closes-"))
    server, env, pwfile = start(work, "bench", PASSWORD)
    data = os.urandom(4096)
    url = "s3://bench/vol"
    mnt = work / "mnt"
    mnt.mkdir()
    common = ["--endpoint-url", server.endpoint_url, "--password-file", str(pwfile)]
    try:
        cli(env, "init", url, *common)

        def mount() -> int:
            cli(env, "mount", url, str(mnt), *common, "--cache-dir", str(work / "cache"))
            return int(os.getxattr(mnt, "user.s3cryptfs.pid"))

        mount()
        os.sync()
        closes = timed(lambda: write_files(mnt / "a", args.files, data))
        drain = timed(lambda: cli(env, "umount", str(mnt)))
        print(f"{args.files} x 4 KiB: last close returned after {closes:.2f} s "
              f"({closes / args.files * 1000:.2f} ms per file); unmount (uploads) {drain:.2f} s")
        if args.strace and shutil.which("strace"):
            pid = mount()
            os.sync()
            counts = count_syncs(pid, lambda: write_files(mnt / "b", args.files, data))
            cli(env, "umount", str(mnt))
            total = sum(counts.values())
            print(f"  flushes by the mount while closing: {counts} "
                  f"({total / args.files:.2f} per file)")
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
