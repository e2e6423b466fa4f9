"""The peer of bench/run.py ``--peers``: ``rclone mount`` of a crypt remote over an s3 remote on
the same SeaweedFS, with the same interface as bench/mounts.py's S3cryptfs.

rclone is run as its users run it for a writable mount (``--vfs-cache-mode writes``), with one
change: uploads start 1 s after a file is closed instead of 5 s (``--vfs-write-back``), so that
"until in S3" measures rclone's uploads rather than its waiting. 0 s is not used: with it
``vfs/stats`` reported an empty upload queue while uploads were still pending (files were lost
at the unmount), so there would be no way to know when the data is in S3.

An empty queue right after the writer's close() is not yet proof: the kernel sends the release
that queues the upload after close() has returned, and a poll made in between was measured to
see an empty queue (12 ms before the upload appeared in it). So the queue must stay empty for a
second; that second is not counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from common import free_port
from mounts import Watcher

WRITE_BACK = "1s"
# How long the upload queue must stay empty before it is believed (not counted in the time).
CONFIRM = 1.0


class Rclone:
    name = "rclone crypt"

    def __init__(self, work: Path, endpoint: str, key: str, secret: str, bucket: str) -> None:
        self.work = work
        self.mnt = work / "mnt-rclone"
        self.mnt.mkdir()
        self.config = work / "rclone.conf"
        obscured = subprocess.run(
            ["rclone", "obscure", "benchmark password, not secret"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.config.write_text(
            "[s3]\ntype = s3\nprovider = SeaweedFS\n"
            f"access_key_id = {key}\nsecret_access_key = {secret}\n"
            f"endpoint = {endpoint}\nregion = us-east-1\n\n"
            f"[crypt]\ntype = crypt\nremote = s3:{bucket}/rclone\npassword = {obscured}\n"
        )
        self.config.chmod(0o600)
        # rclone's AWS SDK refuses a CA bundle with a plain-http endpoint.
        self.env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        self.log = open(work / "rclone.log", "ab")  # noqa: SIM115 (open as long as the peer)
        self.proc: subprocess.Popen[bytes] | None = None
        self.watcher: Watcher | None = None
        self.mounts = 0
        self.port = 0

    def mount(self) -> Watcher:
        # A new cache directory each time: a fresh mount must not find the last one's files.
        self.mounts += 1
        cache = self.work / f"cache-rclone-{self.mounts}"
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["rclone", "--config", str(self.config), "mount", "crypt:", str(self.mnt),
             "--vfs-cache-mode", "writes", "--vfs-write-back", WRITE_BACK,
             "--cache-dir", str(cache), "--rc", "--rc-addr", f"127.0.0.1:{self.port}",
             "--rc-no-auth"],
            env=self.env, stdin=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone mount failed\n{self.log_tail()}")
            time.sleep(0.05)
        self.watcher = Watcher(self.proc.pid)
        return self.watcher

    def _queued(self) -> tuple[int, int]:
        """Uploads queued or running, and files whose upload failed."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/vfs/stats",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            cache = json.load(response)["diskCache"]
        queued = int(cache["uploadsInProgress"]) + int(cache["uploadsQueued"])
        return queued, int(cache["erroredFiles"])

    def settle_unmount(self) -> float:
        """rclone's unmount does not wait for queued uploads: wait for its queue to empty, then
        unmount. Returns the seconds spent confirming that it stays empty (not to be counted)."""
        empty_since = None
        while True:
            queued, errored = self._queued()
            if errored:
                raise RuntimeError(f"rclone: {errored} upload(s) failed\n{self.log_tail()}")
            now = time.monotonic()
            if queued:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since >= CONFIRM:
                break
            time.sleep(0.05)
        uncounted = time.monotonic() - empty_since
        if self.watcher is not None:
            self.watcher.sample()
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True)
        assert self.proc is not None
        self.proc.wait(60)
        if self.watcher is not None:
            self.watcher.stop()
        shutil.rmtree(self.work / f"cache-rclone-{self.mounts}", ignore_errors=True)
        return uncounted

    def log_tail(self) -> str:
        self.log.flush()
        return "\n".join((self.work / "rclone.log").read_text(errors="replace").splitlines()[-20:])

    def cleanup(self) -> None:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mnt)], check=False, stderr=subprocess.DEVNULL
        )
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()
