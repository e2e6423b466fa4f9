"""``s3cryptfs umount``: unmount only once every closed file is in S3, or say which are not.

The mount itself is asked, through attributes of its root (fuse_ops: drain, pending, stop), so
the answer is the mount's own: it seals what is closed, waits for the uploads while they make
progress, and either reports success (then it is stopped with SIGTERM, as systemd would) or
lists what is not in S3 and why. Then the mount stays up, unless --force: it stops, and what
is left stays in its cache directory for the next mount, which uploads it first.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from s3cryptfs import mountcheck
from s3cryptfs.errors import ConfigError, S3CryptFSError
from s3cryptfs.exitcodes import EXIT_INCOMPLETE, EXIT_KEYS, EXIT_OK, EXIT_S3, EXIT_VOLUME

DRAIN = "user.s3cryptfs.drain"
PENDING = "user.s3cryptfs.pending"
STOP = "user.s3cryptfs.stop"
STATS = "user.s3cryptfs.stats"
PID = "user.s3cryptfs.pid"


def mount_pid(mountpoint: str) -> int | None:
    try:
        raw = os.getxattr(mountpoint, PID)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return None
        raise
    return int(raw)


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == real for line in f if len(line.split()) > 1)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _stats(mountpoint: str) -> dict[str, Any]:
    try:
        found = json.loads(os.getxattr(mountpoint, STATS))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _waiting(mountpoint: str) -> int | None:
    stats = _stats(mountpoint)
    if not stats:
        return None
    uploads = stats.get("uploads", {})
    return int(
        uploads.get("queued", 0)
        + uploads.get("in_flight", 0)
        + stats.get("closed_not_sealed", 0)
    )


def _drain(mountpoint: str, stall: float) -> OSError | None:
    """Ask the mount to put everything in S3 (in a thread: it may take a while); say how many
    versions are still on their way every half minute. None when all of it is in S3."""
    result: list[OSError | None] = []

    def ask() -> None:
        try:
            os.setxattr(mountpoint, DRAIN, str(stall).encode())
            result.append(None)
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    announce = time.monotonic() + 5
    while worker.is_alive():
        worker.join(0.2)
        if worker.is_alive() and time.monotonic() >= announce:
            count = _waiting(mountpoint)
            what = f"{count} file version(s)" if count is not None else "pending uploads"
            print(f"s3cryptfs: waiting for {what} of {mountpoint} to reach S3...", file=sys.stderr)
            announce = time.monotonic() + 30
    return result[0]


def _exit_code(pending: list[dict[str, str]]) -> int:
    kinds = {p.get("kind") for p in pending}
    if "key manager" in kinds:
        return EXIT_KEYS
    if "S3" in kinds:
        return EXIT_S3
    if "volume" in kinds:
        return EXIT_VOLUME
    return EXIT_INCOMPLETE


def _stop(mountpoint: str, pid: int) -> None:
    os.kill(pid, 15)
    while pid_alive(pid):
        time.sleep(0.1)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if not is_mounted(mountpoint):
        raise ConfigError(f"{mountpoint} is not mounted")
    owner = mountcheck.mount_owner(mountpoint, os.getuid())
    try:
        pid = mount_pid(mountpoint)
    except OSError as exc:
        raise ConfigError(f"{mountpoint} is not an s3cryptfs mount ({exc.strerror})") from None
    if pid is None:
        if not args.lazy:
            raise ConfigError(
                f"the s3cryptfs process behind {mountpoint} is gone (transport endpoint is not "
                "connected). Versions it had not uploaded are kept in its journal and are "
                "uploaded by the next mount. Detach the dead mount with: "
                f"s3cryptfs umount --lazy {mountpoint}"
            )
        fusermount = shutil.which("fusermount3") or "fusermount"
        subprocess.run([fusermount, "-u", "-z", mountpoint], check=False)
        return EXIT_OK
    # Whatever we signal or ask must be the mount's own process, not one a fake mount names.
    mountcheck.check_mount_process(mountpoint, pid, owner)
    failed = _drain(mountpoint, args.timeout)
    if failed is not None and failed.errno != errno.EBUSY:
        raise ConfigError(
            f"{mountpoint}: the mount did not answer the unmount request ({failed.strerror})"
        )
    if failed is None:
        _stop(mountpoint, pid)
        if is_mounted(mountpoint):
            raise S3CryptFSError(f"{mountpoint} is still mounted after the mount process ended")
        return EXIT_OK
    pending = json.loads(os.getxattr(mountpoint, PENDING) or b"[]")
    print(
        f"s3cryptfs: {len(pending)} closed file version(s) are not in S3 (nothing moved for "
        f"{args.timeout:.0f} s)",
        file=sys.stderr,
    )
    for item in pending:
        print(f"  not in S3: {item['key']} ({item['why']})", file=sys.stderr)
    if not args.force:
        print(
            f"s3cryptfs: {mountpoint} stays mounted; run umount again once S3 and the key "
            "manager answer, or umount --force to stop now and leave them to the next mount",
            file=sys.stderr,
        )
        return _exit_code(pending)
    where = _stats(mountpoint).get("cache_dir") or "the mount's cache directory"
    os.setxattr(mountpoint, STOP, b"force")
    while pid_alive(pid):
        time.sleep(0.1)
    print(
        f"s3cryptfs: {mountpoint} unmounted; those versions are kept in {where} and the next "
        "mount of this volume uploads them first",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE
