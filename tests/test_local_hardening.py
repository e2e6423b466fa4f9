"""Protections against other local users and planted local files: the status attributes answer
only root and the mounting user (and ask the key managers at most every HEALTH_TTL seconds);
`umount` signals only a process that is the mount's; logs never follow a symbolic link; the
password and key manager secrets leave the mount process's environment."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from s3cryptfs import fuse_ops
from s3cryptfs.errors import ConfigError
from s3cryptfs.mountcheck import check_mount_process, mount_owner
from tests.conftest import PASSWORD, fuse_mounts, is_mounted, lazy_unmount

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
HERE = Path(__file__).resolve().parent


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- the status attributes ----------------------------------------------------------------------


class StubFs:
    """What FuseOperations.getxattr asks of the core, counted."""

    def __init__(self) -> None:
        self.health_checks = 0
        self.pages = SimpleNamespace()  # (FuseOperations gives it its page dropper)

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


# --- umount ------------------------------------------------------------------------------------


@pytest.fixture
def pretender(tmp_path):
    """start(pid): mount a FUSE file system of subtype s3cryptfs that names *pid* as its mount
    process; unmounted and stopped at teardown."""
    started: list[tuple[subprocess.Popen, Path]] = []

    def start(pid: int) -> Path:
        mountpoint = tmp_path / f"fake{len(started)}"
        mountpoint.mkdir()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "fake_s3cryptfs.py"), mountpoint, str(pid)]
        )
        started.append((proc, mountpoint))
        wait_for(lambda: (str(mountpoint), "fuse.s3cryptfs") in fuse_mounts())
        return mountpoint

    yield start
    for proc, mountpoint in started:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
        proc.terminate()
        proc.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_umount_signals_only_the_mounts_own_process(mounted, pretender, cli):
    """A FUSE file system that claims to be s3cryptfs names, in turn: a root process, another
    user's process, and the process of a real s3cryptfs mount elsewhere. None is signalled."""
    victims = {
        "root": subprocess.Popen(["sleep", "300"]),
        "nobody": subprocess.Popen([*AS_NOBODY, "sleep", "300"]),
    }
    real_pid = int(os.getxattr(mounted.mountpoint, "user.s3cryptfs.pid"))
    try:
        cases = [
            (victims["root"].pid, "its command line is not an s3cryptfs mount of it"),
            (victims["nobody"].pid, "it does not run as uid 0, the owner of the mount"),
            (real_pid, "its command line is not an s3cryptfs mount of it"),
        ]
        for pid, reason in cases:
            fake = pretender(pid)
            proc = cli("umount", fake)
            assert proc.returncode == 2, proc
            assert proc.stderr.strip() == (
                f"s3cryptfs: {fake} names pid {pid} as its mount process, but {reason}: not "
                "signalled (a FUSE file system that only pretends to be s3cryptfs?)"
            )
            assert alive(pid)
        assert all(v.poll() is None for v in victims.values())
        assert mounted.is_mounted()
        # the real mount: its process passes, and only its owner (or root) may unmount it
        check_mount_process(str(mounted.mountpoint), real_pid, 0)
        with pytest.raises(ConfigError, match="belongs to uid 0: only that user or root"):
            mount_owner(str(mounted.mountpoint), NOBODY)
        assert mount_owner(str(mounted.mountpoint), 0) == 0
    finally:
        for victim in victims.values():
            victim.send_signal(signal.SIGKILL)
            victim.wait()
    mounted.umount()  # and the real umount still works
    assert not alive(real_pid)


# --- log files ---------------------------------------------------------------------------------


def test_log_and_audit_files_never_follow_symlinks(volume, tmp_path):
    volume.init()
    target = tmp_path / "precious"
    target.write_text("not a log\n")
    target.chmod(0o644)
    link = tmp_path / "log-link"
    link.symlink_to(target)
    common = volume.common_args()
    runs = {
        "log file": [
            volume.run(
                "mount",
                volume.url,
                volume.mountpoint,
                *common,
                "--cache-dir",
                volume.cache_dir,
                "--log-file",
                link,
                check=False,
            ),
            volume.run(
                "mount",
                volume.url,
                volume.mountpoint,
                *common,
                "--cache-dir",
                volume.cache_dir,
                "--log-file",
                link,
                "--foreground",
                check=False,
            ),
        ],
        "audit log": [
            volume.run("keys", "status", volume.url, *common, "--audit-log", link, check=False)
        ],
    }
    for what, procs in runs.items():
        for proc in procs:
            assert proc.returncode == 2, proc
            assert proc.stderr.strip().splitlines()[-1] == (
                f"s3cryptfs: the {what} {link} is a symbolic link: refused (give the path of the "
                "file itself)"
            )
    assert not volume.is_mounted()
    assert target.read_text() == "not a log\n" and (target.stat().st_mode & 0o777) == 0o644
    # a log that is a file is made private, created or not
    log = tmp_path / "mount.log"
    log.write_text("")
    log.chmod(0o644)
    volume.mount("--log-file", log)
    volume.umount()
    assert (log.stat().st_mode & 0o777) == 0o600 and "unmounted" in log.read_text()


# --- secrets in the environment -----------------------------------------------------------------


def environ_of(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def test_password_and_secrets_leave_the_mount_process_environment(volume):
    volume.init()
    env = {
        **volume.env,
        "S3CRYPTFS_PASSWORD": PASSWORD,
        "S3CRYPTFS_SECRET_CANARY": "canary-generic-secret",
        "VAULT_TOKEN": "canary-vault-token",
    }
    base = [
        "mount",
        volume.url,
        volume.mountpoint,
        "--endpoint-url",
        volume.endpoint_url,
        "--cache-dir",
        volume.cache_dir,
    ]
    secrets = (PASSWORD.encode(), b"canary-generic-secret", b"canary-vault-token")

    proc = subprocess.run(
        [sys.executable, "-m", "s3cryptfs", *map(str, base)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(os.getxattr(volume.mountpoint, "user.s3cryptfs.pid"))
    daemon = environ_of(pid)
    assert b"AWS_ACCESS_KEY_ID=" in daemon  # the rest of the environment is intact
    assert not [s for s in secrets if s in daemon]
    assert b"S3CRYPTFS_PASSWORD=" not in daemon and b"VAULT_TOKEN=" not in daemon
    volume.umount()

    foreground = subprocess.Popen(
        [sys.executable, "-m", "s3cryptfs", *map(str, base), "--foreground"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(volume.is_mounted, timeout=60)
        held = environ_of(foreground.pid)
        assert b"AWS_ACCESS_KEY_ID=" in held
        assert not [s for s in secrets if s in held]
    finally:
        volume.umount()
        assert foreground.wait(timeout=60) == 0
