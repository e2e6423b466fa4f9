"""The file systems under test in bench/run.py, behind one small interface: ``mount()`` (a new
mount process, returning its Watcher), ``settle_unmount()`` (wait until everything written is
in S3, then unmount; returns the seconds of that wait not to be counted) and ``cleanup()``.
This module has s3cryptfs; bench/peers.py has rclone crypt.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from common import cli

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu(pid: int, reaped: bool) -> float:
    """utime + stime of *pid*, with its waited-for children's (cutime + cstime) if *reaped*."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


class Watcher(threading.Thread):
    """Samples a mount process every 50 ms: peak resident memory of the process alone and with
    its children (s3cryptfs's upload helper), and CPU seconds of the process and its children,
    live or reaped. The last sample stands for the process once it has exited (an unmount that
    waits for uploads ends with the process), so up to 50 ms of CPU may be missed."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.peak_all, self.cpu = pid, 0, 0, 0.0
        self.running = True
        self.sample()
        self.start()

    def _children(self) -> list[int]:
        children = []
        for task in os.listdir(f"/proc/{self.pid}/task"):
            # A child belongs to whichever thread started it.
            try:
                with open(f"/proc/{self.pid}/task/{task}/children") as f:
                    children += [int(c) for c in f.read().split()]
            except OSError:  # the thread or the process is gone
                pass
        return children

    def sample(self) -> float:
        """Take a sample now (while the process lives); returns the CPU seconds so far."""
        try:
            own = _rss(self.pid)
            cpu = _cpu(self.pid, reaped=True)
            total = own
            for child in self._children():
                try:
                    total += _rss(child)
                    cpu += _cpu(child, reaped=True)
                except OSError:  # exited meanwhile
                    pass
        except OSError:  # the process has exited: ENOENT, or ESRCH while it is being reaped
            self.running = False
            return self.cpu
        self.peak, self.peak_all = max(self.peak, own), max(self.peak_all, total)
        # A child that exited but is not reaped yet is briefly in neither sum.
        self.cpu = max(self.cpu, cpu)
        return self.cpu

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(0.05)

    def stop(self) -> None:
        self.running = False
        self.join()


class S3cryptfs:
    name = "s3cryptfs"

    def __init__(
        self,
        work: Path,
        env: dict[str, str],
        endpoint: str,
        pwfile: Path,
        bucket: str,
        s3_client: str | None,
    ) -> None:
        self.env, self.work = env, work
        self.mnt = work / "mnt-s3cryptfs"
        self.mnt.mkdir()
        self.url = f"s3://{bucket}/vol"
        self.options = ["--endpoint-url", endpoint, "--password-file", str(pwfile)]
        cli(env, "init", self.url, *self.options)  # init has no --s3-client: it moves no data
        if s3_client:  # else the CLI's default, whatever it is
            self.options += ["--s3-client", s3_client]
        self.watcher: Watcher | None = None

    def mount(self) -> Watcher:
        # The cache directory holds the journal (no disk cache unless asked): a new process on
        # it starts cold.
        cache = str(self.work / "cache-s3cryptfs")
        cli(self.env, "mount", self.url, str(self.mnt), *self.options, "--cache-dir", cache)
        self.watcher = Watcher(int(os.getxattr(self.mnt, "user.s3cryptfs.pid")))
        return self.watcher

    def settle_unmount(self) -> float:
        """`s3cryptfs umount` returns once every upload is done: nothing to leave uncounted."""
        cli(self.env, "umount", str(self.mnt))
        if self.watcher is not None:
            self.watcher.stop()
        return 0.0

    def cleanup(self) -> None:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mnt)], check=False, stderr=subprocess.DEVNULL
        )
