"""Protections against other local users: the status attributes answer only root and the
mounting user (and ask the key managers at most every HEALTH_TTL seconds)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from s3cryptfs import fuse_ops
from tests.conftest import is_mounted, lazy_unmount

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


# --- the status attributes ----------------------------------------------------------------------


class StubFs:
    """What FuseOperations.getxattr asks of the core, counted."""

    def __init__(self) -> None:
        self.health_checks = 0

    def node(self, inode: int) -> SimpleNamespace:
        return SimpleNamespace(is_dir=True)

    def stats(self) -> dict:
        return {"requests": {}}

    def key_health(self) -> dict[str, str]:
        self.health_checks += 1
        return {"vault": "ok"}


def getxattr(ops, name: bytes, uid: int) -> bytes:
    ctx = SimpleNamespace(uid=uid, gid=uid, pid=1)
    return trio.run(ops.getxattr, pyfuse3.ROOT_INODE, name, ctx)


def test_status_answers_root_and_owner_only_and_caches_key_health(monkeypatch):
    fs = StubFs()
    ops = fuse_ops.FuseOperations(fs)  # type: ignore[arg-type]
    for name in (fuse_ops.XATTR_STATUS, fuse_ops.XATTR_STATS):
        with pytest.raises(pyfuse3.FUSEError) as info:
            getxattr(ops, name, os.getuid() + 1000)
        assert info.value.errno == errno.EACCES
    assert fs.health_checks == 0
    now = [1000.0]
    monkeypatch.setattr(fuse_ops.time, "monotonic", lambda: now[0])
    for uid in (0, os.getuid(), 0):
        status = json.loads(getxattr(ops, fuse_ops.XATTR_STATUS, uid))
        assert status["key_managers"] == {"vault": "ok"}
    assert fs.health_checks == 1  # three reads, one round of checks
    now[0] += fuse_ops.HEALTH_TTL
    getxattr(ops, fuse_ops.XATTR_STATUS, 0)
    assert fs.health_checks == 2
    assert getxattr(ops, fuse_ops.XATTR_PID, os.getuid() + 1000) == str(os.getpid()).encode()


@pytest.fixture
def open_mountpoint():
    """A mount point other users can reach (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="s3cryptfs-open-"))
    path.chmod(0o755)
    yield path
    if is_mounted(path):
        lazy_unmount(path)
    path.rmdir()


def test_other_users_cannot_read_the_status(make_volume, open_mountpoint):
    vol = make_volume()
    vol.mountpoint = open_mountpoint
    vol.init()
    vol.mount("--allow-other")
    try:
        listing = subprocess.run(
            [*AS_NOBODY, "ls", str(vol.mountpoint)], capture_output=True, text=True, timeout=30
        )
        assert listing.returncode == 0, listing.stderr  # the mount itself is open to them
        status = subprocess.run(
            [*AS_NOBODY, sys.executable, "-m", "s3cryptfs", "status", str(vol.mountpoint)],
            env=vol.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 2, status
        assert status.stderr.strip() == (
            f"s3cryptfs: {vol.mountpoint}: only root and the user who mounted it may read its "
            "status"
        )
        assert "key manager:" in vol.run("status", vol.mountpoint).stdout  # root still may
    finally:
        vol.umount()
