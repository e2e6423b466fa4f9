"""FIFOs, sockets and device nodes: stored as empty objects, kept across a remount."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest


def _kinds(root) -> dict[str, tuple[int, int]]:
    out = {}
    for name in sorted(os.listdir(root)):
        st = os.lstat(root / name)
        out[name] = (stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode), st.st_rdev)
    return out


def test_fifos_sockets_and_devices_are_kept(mounted):
    m = mounted.mountpoint
    os.mkfifo(m / "fifo", 0o640)
    os.mknod(m / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(m / "loop", stat.S_IFBLK | 0o640, os.makedev(7, 0))
    os.mknod(m / "empty", stat.S_IFREG | 0o644)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(m / "sock"))
    want = {
        "empty": (stat.S_IFREG | 0o644, 0),
        "fifo": (stat.S_IFIFO | 0o640, 0),
        "loop": (stat.S_IFBLK | 0o640, os.makedev(7, 0)),
        "null": (stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    }
    got = _kinds(m)
    sock_mode = got.pop("sock")[0]
    assert stat.S_ISSOCK(sock_mode)
    assert got == want
    with pytest.raises(FileExistsError):
        os.mkfifo(m / "fifo")
    # A FIFO in the mount works as one (the kernel serves it; nothing goes to S3).
    reader = subprocess.Popen(["cat", str(m / "fifo")], stdout=subprocess.PIPE)
    with open(m / "fifo", "wb") as w:
        w.write(b"through the pipe\n")
    assert reader.communicate(timeout=30)[0] == b"through the pipe\n"
    # The mount is nodev: a device node cannot be opened through it.
    with pytest.raises(PermissionError), open(m / "null", "rb"):
        pass
    os.rename(m / "fifo", m / "fifo2")
    os.chmod(m / "null", 0o644)
    mounted.remount()
    after = _kinds(m)
    assert stat.S_ISSOCK(after.pop("sock")[0])
    want["fifo2"] = want.pop("fifo")
    want["null"] = (stat.S_IFCHR | 0o644, os.makedev(1, 3))
    assert after == want
    os.unlink(m / "fifo2")
    os.unlink(m / "null")
    assert sorted(os.listdir(m)) == ["empty", "loop", "sock"]


def test_metadata_cannot_turn_a_file_with_content_into_a_fifo(mounted, s3client):
    """The mode in an object's metadata is not authenticated: a bucket writer who sets a FIFO
    type on a file with content gets a file (an open would otherwise block forever)."""
    m = mounted.mountpoint
    (m / "data.txt").write_bytes(b"content\n")
    mounted.umount()
    key = mounted.prefix + "data.txt"
    meta = s3client.head_object(Bucket=mounted.bucket, Key=key)["Metadata"]
    meta["s3cryptfs-mode"] = f"{stat.S_IFIFO | 0o644:o}"
    s3client.copy_object(
        Bucket=mounted.bucket,
        Key=key,
        CopySource={"Bucket": mounted.bucket, "Key": key},
        Metadata=meta,
        MetadataDirective="REPLACE",
    )
    # The directory index (sealed) still describes the old ETag: it is not used for this one.
    mounted.mount()
    assert stat.S_ISREG(os.stat(m / "data.txt").st_mode)
    assert (m / "data.txt").read_bytes() == b"content\n"
