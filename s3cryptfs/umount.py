"""``s3cryptfs umount``: unmount only once every closed file is in S3, or say which are not.

The mount itself is asked, through attributes of its root (fuse_ops: drain, pending, stop), so
the answer is the mount's own: it seals what is closed, waits for the uploads while they make
progress, and either reports success (then it is stopped with SIGTERM, as systemd would) or
lists what is not in S3 and why. Then the mount stays up, unless --force: it stops, and what
is left stays in its cache directory for the next mount, which uploads it first.

A mount that processes still use (working directory, open or mapped file: holders.py) is
refused before anything is done, as umount(8) refuses it ("target is busy"): stopping the mount
process would leave them with ENOTCONN. --lazy detaches it instead, as `umount -l` does: they
keep it until they let go, the mount process serving them, and it exits after that.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from s3cryptfs import holders, mountcheck
from s3cryptfs.errors import ConfigError, S3CryptFSError
from s3cryptfs.exitcodes import (
    EXIT_BUSY,
    EXIT_INCOMPLETE,
    EXIT_KEYS,
    EXIT_OK,
    EXIT_S3,
    EXIT_VOLUME,
)

DRAIN = "user.s3cryptfs.drain"
PENDING = "user.s3cryptfs.pending"
STOP = "user.s3cryptfs.stop"
STATS = "user.s3cryptfs.stats"
PID = "user.s3cryptfs.pid"
UMOUNT_NOFOLLOW = 8  # <sys/mount.h>


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
    _wait_exit(pid)


def _wait_exit(pid: int) -> None:
    while pid_alive(pid):
        time.sleep(0.1)


def _fusermount(mountpoint: str, *, lazy: bool) -> subprocess.CompletedProcess[str]:
    fusermount = shutil.which("fusermount3") or "fusermount"
    return subprocess.run(
        [fusermount, "-u", *(["-z"] if lazy else []), mountpoint],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},  # its strerror() text is what tells "busy"
        check=False,
    )


def _busy(mountpoint: str, found: holders.Scan) -> int:
    """The mount stays up and usable: say who holds it."""
    if found.holders:
        who = f"in use by {found.describe()}"
    elif found.hidden:
        who = "in use by processes this user may not inspect (root can name them)"
    else:
        who = "in use (the kernel refused to unmount it)"
    print(
        f"s3cryptfs: {mountpoint} is busy, {who}; it stays mounted. Let them finish (or leave "
        f"the directory), or detach it now with: s3cryptfs umount --lazy {mountpoint}",
        file=sys.stderr,
    )
    return EXIT_BUSY


def _detach(mountpoint: str, found: holders.Scan) -> None:
    """`umount -l`: gone from the file tree now; the processes that use it keep it until they
    let go, served by the mount process, which then uploads what they wrote and exits."""
    done = _fusermount(mountpoint, lazy=True)
    if done.returncode != 0:
        raise S3CryptFSError(f"{mountpoint}: detaching failed: {done.stderr.strip()}")
    who = found.describe() if found.holders else "processes this user may not inspect"
    print(
        f"s3cryptfs: {mountpoint} detached; {who} still use it: the mount process serves them "
        "until they let go, then uploads what they wrote and exits",
        file=sys.stderr,
    )


def _kernel_unmount(mountpoint: str) -> tuple[bool, bool]:
    """(unmounted, refused as busy), as umount(8) would: the kernel refuses while a process
    uses the mount. Root asks the kernel itself: fusermount looks at the mount point first,
    a request to the mount that fails when S3 is away."""
    if os.geteuid() != 0:
        done = _fusermount(mountpoint, lazy=False)
        return done.returncode == 0, "busy" in done.stderr.lower()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), UMOUNT_NOFOLLOW) == 0:
        return True, False
    return False, ctypes.get_errno() == errno.EBUSY


def _unmount(mountpoint: str, pid: int, *, lazy: bool) -> int:
    """Everything closed is in S3: unmount as umount(8) does, which the kernel refuses while
    a process uses the mount (one may have come since we looked); with *lazy*, detach then."""
    unmounted, busy = _kernel_unmount(mountpoint)
    if busy:
        found = holders.scan(mountpoint)
        if not lazy:
            return _busy(mountpoint, found)
        _detach(mountpoint, found)
        return EXIT_OK
    if not unmounted:
        _stop(mountpoint, pid)  # the mount unmounts itself on SIGTERM
    else:
        _wait_exit(pid)  # unmounted: the mount process has one last look at its uploads
    if is_mounted(mountpoint):
        raise S3CryptFSError(f"{mountpoint} is still mounted after the mount process ended")
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    os.chdir("/")  # `s3cryptfs umount .`: our own working directory must not hold it
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
        _fusermount(mountpoint, lazy=True)
        return EXIT_OK
    # Whatever we signal or ask must be the mount's own process, not one a fake mount names.
    mountcheck.check_mount_process(mountpoint, pid, owner)
    if not args.lazy:
        found = holders.scan(mountpoint)
        if found.holders:
            return _busy(mountpoint, found)
    failed = _drain(mountpoint, args.timeout)
    if failed is not None and failed.errno != errno.EBUSY:
        raise ConfigError(
            f"{mountpoint}: the mount did not answer the unmount request ({failed.strerror})"
        )
    if failed is None:
        return _unmount(mountpoint, pid, lazy=args.lazy)
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
    found = holders.scan(mountpoint) if args.lazy else holders.Scan()
    if found.holders:
        # Stopping now would take the mount from under them: detach, and the mount process
        # stops as on SIGTERM once they let go (--stop-timeout), leaving the rest behind.
        _detach(mountpoint, found)
        print(
            f"s3cryptfs: what is not in S3 then stays in {where}, and the next mount of this "
            "volume uploads it first",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    os.setxattr(mountpoint, STOP, b"force")
    _wait_exit(pid)
    print(
        f"s3cryptfs: {mountpoint} unmounted; those versions are kept in {where} and the next "
        "mount of this volume uploads them first",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE
