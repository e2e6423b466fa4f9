"""What an operator meets where a mount differs from a local disk: `umount` of a mount in use,
`status | head`, `df`, fallocate and O_TMPFILE, the warning about a file open at a crash.

Through a real mount (SeaweedFS, FUSE), driven by the command line as a user would.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import wait_until

from s3cryptfs import holders
from s3cryptfs.exitcodes import EXIT_BUSY, EXIT_OK


def _spawn(cmd: list[str], cwd: str | os.PathLike) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _fd_holder(path: os.PathLike) -> subprocess.Popen:
    """A python child that holds *path* open (for reading) until told to go."""
    code = (
        "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); "
        "sys.stdin.readline()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    return proc


def test_a_mount_in_use_is_refused_and_stays_usable_until_its_holders_let_go(mounted):
    vol = mounted
    (vol.mountpoint / "sub").mkdir()
    (vol.mountpoint / "sub" / "kept.txt").write_bytes(b"still here")
    sleeper = _spawn(["sleep", "300"], cwd=vol.mountpoint / "sub")
    reader = _fd_holder(vol.mountpoint / "sub" / "kept.txt")
    try:
        found = holders.scan(str(vol.mountpoint))
        by_pid = {h.pid: h for h in found.holders}
        assert by_pid[sleeper.pid].what == "working directory"
        assert by_pid[reader.pid].what == "open file"

        refused = vol.run("umount", vol.mountpoint, check=False)
        assert refused.returncode == EXIT_BUSY == 2, refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and "is busy" in line and "--lazy" in line
        assert f"pid {sleeper.pid} (sleep)" in line
        assert f"pid {reader.pid} (python" in line
        # untouched: mounted, served, and the holders' view is intact
        assert vol.is_mounted() and sleeper.poll() is None
        assert (vol.mountpoint / "sub" / "kept.txt").read_bytes() == b"still here"
        (vol.mountpoint / "after.txt").write_bytes(b"written after the refusal")

        _end(sleeper)
        refused = vol.run("umount", vol.mountpoint, check=False)
        assert refused.returncode == EXIT_BUSY and f"pid {reader.pid} (python" in refused.stderr
        assert f"pid {sleeper.pid}" not in refused.stderr
    finally:
        _end(sleeper)
        reader.communicate("\n", timeout=10)
    done = vol.umount()
    assert done.returncode == EXIT_OK, done.stderr
    vol.mount()
    assert (vol.mountpoint / "after.txt").read_bytes() == b"written after the refusal"
    assert (vol.mountpoint / "sub" / "kept.txt").read_bytes() == b"still here"


def test_lazy_detaches_a_mount_in_use_and_the_holder_keeps_writing(mounted):
    vol = mounted
    (vol.mountpoint / "dir").mkdir()
    code = (
        "import os, sys\n"
        "f = open('log.txt', 'w'); f.write('before\\n'); f.flush(); print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "f.write('after the detach\\n'); f.close()\n"
        "print(sorted(os.listdir('.')), flush=True)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=vol.mountpoint / "dir",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        pid = int(os.getxattr(vol.mountpoint, "user.s3cryptfs.pid"))
        lazy = vol.run("umount", "--lazy", vol.mountpoint, check=False)
        assert lazy.returncode == EXIT_OK, lazy.stderr
        assert "detached" in lazy.stderr and f"pid {writer.pid} (python" in lazy.stderr
        assert not vol.is_mounted()  # gone from the tree at once
        # ... but not from under the writer: it goes on, and what it writes reaches S3
        out, _ = writer.communicate("\n", timeout=60)
        assert writer.returncode == 0 and "log.txt" in out
        wait_until(lambda: not _alive(pid), 60, "the mount process to exit after its last user")
    finally:
        _end(writer)
    vol.mount()
    assert (vol.mountpoint / "dir" / "log.txt").read_text() == "before\nafter the detach\n"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_status_into_head_ends_quietly(mounted):
    """`s3cryptfs status MNT | head -2`: the reader goes away while status still writes. Each
    line is its own write here (python -u), so most runs meet the closed pipe mid-output."""
    vol = mounted
    codes = set()
    for _ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "s3cryptfs", "status", str(vol.mountpoint)],
            env=vol.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"mount:")
        proc.stdout.close()
        err = proc.stderr.read().decode()
        codes.add(proc.wait(60))
        assert err == "", err
    assert codes <= {0, 141}, codes


def test_df_shows_what_the_volume_holds(mounted):
    vol = mounted
    before = os.statvfs(vol.mountpoint)
    (vol.mountpoint / "big").write_bytes(os.urandom(3 * 2**20))
    (vol.mountpoint / "d").mkdir()
    (vol.mountpoint / "d" / "small").write_bytes(b"x" * 100_000)
    after = os.statvfs(vol.mountpoint)
    used = (after.f_blocks - after.f_bfree) * after.f_frsize
    assert used >= 3 * 2**20 + 100_000
    assert used - (before.f_blocks - before.f_bfree) * before.f_frsize < 4 * 2**20
    assert after.f_bavail == after.f_bfree and after.f_bfree * after.f_frsize >= 2**40
    df = subprocess.run(
        ["df", "-B1", "--output=used", str(vol.mountpoint)], capture_output=True, text=True
    )
    assert int(df.stdout.split()[-1]) == used
    # another mount of the volume knows it once it has listed it
    vol.remount()
    fresh = os.statvfs(vol.mountpoint)
    assert (fresh.f_blocks - fresh.f_bfree) * fresh.f_frsize < 3 * 2**20  # nothing listed yet
    os.listdir(vol.mountpoint)
    os.listdir(vol.mountpoint / "d")
    again = os.statvfs(vol.mountpoint)
    assert (again.f_blocks - again.f_bfree) * again.f_frsize >= 3 * 2**20 + 100_000
    (vol.mountpoint / "big").unlink()
    gone = os.statvfs(vol.mountpoint)
    assert (gone.f_blocks - gone.f_bfree) * gone.f_frsize < 2**20
    vol.umount()


def test_fallocate_and_o_tmpfile_say_not_supported(mounted):
    vol = mounted
    target = vol.mountpoint / "f"
    cmd = subprocess.run(["fallocate", "-l", "1M", str(target)], capture_output=True, text=True)
    assert cmd.returncode != 0 and "Operation not supported" in cmd.stderr, cmd.stderr
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # glibc's posix_fallocate writes the blocks itself when the file system says EOPNOTSUPP
        os.posix_fallocate(fd, 0, 200_000)
        assert os.fstat(fd).st_size == 200_000
    finally:
        os.close(fd)
    assert target.read_bytes() == bytes(200_000)
    with pytest.raises(OSError) as raised:
        os.open(vol.mountpoint, os.O_TMPFILE | os.O_RDWR, 0o600)
    assert raised.value.errno == errno.EOPNOTSUPP


def test_the_warning_about_a_file_open_at_a_crash_names_it(mounted):
    from test_no_file_lost import kill_mount

    vol = mounted
    (vol.mountpoint / "docs").mkdir()
    fd = os.open(vol.mountpoint / "docs" / "draft.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"secret words ")
    os.rename(vol.mountpoint / "docs" / "draft.txt", vol.mountpoint / "docs" / "final.txt")
    os.write(fd, b"never closed")
    time.sleep(0.2)
    kill_mount(vol)
    try:
        os.close(fd)
    except OSError:
        pass
    again = vol.mount()
    assert "of docs/final.txt, which was still open" in again.stderr, again.stderr
    assert "secret" not in again.stderr and "never closed\n" not in again.stderr
    assert not (vol.mountpoint / "docs" / "final.txt").exists()
    vol.umount()
