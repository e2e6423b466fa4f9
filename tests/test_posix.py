"""POSIX semantics through a real s3cryptfs mount."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import time

import pytest

STATE_XATTR = "user.s3cryptfs.state"


def objects_under(s3client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def test_create_write_read_back(mounted):
    path = mounted.mountpoint / "hello.txt"
    path.write_bytes(b"hello world\n")
    assert path.read_bytes() == b"hello world\n"
    assert os.stat(path).st_size == 12
    assert stat.S_ISREG(os.stat(path).st_mode)


def test_write_at_offsets_and_sparse_extension(mounted):
    path = mounted.mountpoint / "offsets"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"ab", 3)
        os.pwrite(fd, b"XYZ", 20)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data == b"012ab56789" + b"\0" * 10 + b"XYZ"
    assert os.stat(path).st_size == 23
    mounted.remount()
    assert path.read_bytes() == data


def test_truncate_shrink_grow_and_o_trunc(mounted):
    path = mounted.mountpoint / "trunc"
    path.write_bytes(b"abcdefghij")
    os.truncate(path, 4)
    assert path.read_bytes() == b"abcd"
    os.truncate(path, 8)
    assert path.read_bytes() == b"abcd" + b"\0" * 4
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"new"
    mounted.remount()
    assert path.read_bytes() == b"new"


def test_truncate_by_path_racing_the_previous_upload(mounted):
    """truncate(2) without an open file while the previous version is still uploading: the
    upload finishing must not take the write-back file away from under the truncate (the
    truncate was lost, or failed with EBADF, and a grow read back short)."""
    path = mounted.mountpoint / "trunc-race"
    for i in range(40):
        path.write_bytes(b"abcdefghij")  # its upload starts on close
        time.sleep((i % 4) * 0.002)
        os.truncate(path, 4)
        assert path.read_bytes() == b"abcd", f"round {i}"
        time.sleep((i % 10) * 0.002)  # sweep the moment the truncate-to-4 upload lands
        os.truncate(path, 8)
        assert path.read_bytes() == b"abcd" + b"\0" * 4, f"round {i}"
    mounted.remount()
    assert path.read_bytes() == b"abcd" + b"\0" * 4


def test_append(mounted):
    path = mounted.mountpoint / "log"
    path.write_bytes(b"one\n")
    with open(path, "ab") as f:
        f.write(b"two\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"three\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"one\ntwo\nthree\n"


def test_unlink(mounted):
    path = mounted.mountpoint / "gone"
    path.write_bytes(b"x")
    os.unlink(path)
    assert not path.exists()
    with pytest.raises(FileNotFoundError):
        os.unlink(path)


def test_mkdir_rmdir(mounted):
    d = mounted.mountpoint / "dir"
    os.mkdir(d)
    assert stat.S_ISDIR(os.stat(d).st_mode)
    with pytest.raises(FileExistsError):
        os.mkdir(d)
    os.rmdir(d)
    assert not d.exists()


def test_rmdir_non_empty(mounted):
    d = mounted.mountpoint / "full"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        os.rmdir(d)
    assert exc.value.errno == errno.ENOTEMPTY
    assert (d / "f").read_bytes() == b"x"


def test_rename_file_and_over_existing(mounted):
    m = mounted.mountpoint
    (m / "a").write_bytes(b"AAA")
    (m / "b").write_bytes(b"BBBBB")
    os.rename(m / "a", m / "c")
    assert not (m / "a").exists()
    assert (m / "c").read_bytes() == b"AAA"
    os.rename(m / "c", m / "b")
    assert not (m / "c").exists()
    assert (m / "b").read_bytes() == b"AAA"
    mounted.remount()
    assert sorted(os.listdir(m)) == ["b"]
    assert (m / "b").read_bytes() == b"AAA"


def test_rename_directory_with_contents(mounted):
    m = mounted.mountpoint
    (m / "src" / "sub").mkdir(parents=True)
    (m / "src" / "f1").write_bytes(b"one")
    (m / "src" / "sub" / "f2").write_bytes(b"two" * 1000)
    os.rename(m / "src", m / "dst")

    def check():
        assert not (m / "src").exists()
        assert sorted(os.listdir(m)) == ["dst"]
        assert sorted(os.listdir(m / "dst")) == ["f1", "sub"]
        assert (m / "dst" / "f1").read_bytes() == b"one"
        assert (m / "dst" / "sub" / "f2").read_bytes() == b"two" * 1000

    check()
    mounted.remount()
    check()


def test_symlink_readlink(mounted):
    m = mounted.mountpoint
    (m / "target").write_bytes(b"data")
    os.symlink("target", m / "link")
    assert os.readlink(m / "link") == "target"
    assert stat.S_ISLNK(os.lstat(m / "link").st_mode)
    assert (m / "link").read_bytes() == b"data"
    mounted.remount()
    assert os.readlink(m / "link") == "target"


def test_chmod_utime_persist(mounted):
    path = mounted.mountpoint / "meta"
    path.write_bytes(b"x")
    os.chmod(path, 0o640)
    mtime_ns = 1_600_000_000_123_456_789
    os.utime(path, ns=(mtime_ns, mtime_ns))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    mounted.remount()
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert abs(st.st_mtime_ns - mtime_ns) < 1_000_000_000
    assert int(st.st_mtime) == mtime_ns // 1_000_000_000


def test_hard_link_refused(mounted):
    m = mounted.mountpoint
    (m / "orig").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        os.link(m / "orig", m / "hard")
    assert exc.value.errno in (errno.EPERM, errno.ENOTSUP)
    assert not (m / "hard").exists()


def test_write_only_handles_keep_readers_coherent(mounted):
    """Write-only handles bypass the kernel's page cache (direct I/O: one copy less per byte
    on the way to the write-back file); readers that cached the file, through read() or a
    shared mapping, must still see every write."""
    import mmap

    path = mounted.mountpoint / "coherent"
    path.write_bytes(b"A" * 100_000)
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, 4, 0) == b"AAAA"
        mapped = mmap.mmap(reader, 0, prot=mmap.PROT_READ)
        assert mapped[:4] == b"AAAA"
        writer = os.open(path, os.O_WRONLY)
        try:
            assert os.pwrite(writer, b"BBBB", 0) == 4
            assert os.pread(reader, 4, 0) == b"BBBB"  # before the writer closes
        finally:
            os.close(writer)
        assert mapped[:4] == b"BBBB"
        writer = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(writer, b"tail")
        finally:
            os.close(writer)
        assert os.fstat(reader).st_size == 100_004
        assert os.pread(reader, 6, 99_998) == b"AAtail"
        mapped.close()
    finally:
        os.close(reader)
    mounted.remount()
    assert path.read_bytes() == b"BBBB" + b"A" * 99_996 + b"tail"


def test_unlinked_while_open(mounted):
    path = mounted.mountpoint / "ghost"
    path.write_bytes(b"still here")
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"!!", 10)
        assert os.pread(fd, 100, 0) == b"still here!!"
        assert os.fstat(fd).st_size == 12
    finally:
        os.close(fd)
    assert os.listdir(mounted.mountpoint) == []


def test_fsync_uploads_and_state_clean(mounted, s3client):
    before = set(objects_under(s3client, mounted.bucket, "vol/"))
    path = mounted.mountpoint / "synced"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"payload" * 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    after = set(objects_under(s3client, mounted.bucket, "vol/"))
    assert after - before, "fsync returned but no new object appeared under vol/"
    assert os.getxattr(path, STATE_XATTR) == b"clean"


def test_xattrs_outside_the_user_namespace_are_unsupported(mounted):
    """security.* and ACLs are refused as unsupported (not "no such attribute"), so that `ls -l`
    asks once per mount instead of twice per file; user.* names are looked up as usual."""
    path = mounted.mountpoint / "x"
    path.write_bytes(b"x")
    for name in ("security.selinux", "system.posix_acl_access", "trusted.anything"):
        with pytest.raises(OSError) as err:
            os.getxattr(path, name)
        assert err.value.errno == errno.EOPNOTSUPP, name
    with pytest.raises(OSError) as err:
        os.getxattr(path, "user.not-ours")
    assert err.value.errno == errno.ENODATA
    assert os.getxattr(path, STATE_XATTR) in (b"clean", b"dirty", b"uploading")
    listing = subprocess.run(
        ["ls", "-l", str(mounted.mountpoint)], capture_output=True, text=True, check=True
    )
    assert " x\n" in listing.stdout and listing.stderr == ""


def test_persistence_across_remount(mounted):
    m = mounted.mountpoint
    (m / "d" / "e").mkdir(parents=True)
    (m / "d" / "e" / "f").write_bytes(b"z" * 70000)
    (m / "top").write_bytes(b"top")
    mounted.remount()
    assert (m / "d" / "e" / "f").read_bytes() == b"z" * 70000
    assert (m / "top").read_bytes() == b"top"


def test_readdir(mounted):
    m = mounted.mountpoint
    (m / "file1").write_bytes(b"1")
    (m / "file2").write_bytes(b"2")
    (m / "subdir").mkdir()
    (m / "subdir" / "inner").write_bytes(b"i")
    names = sorted(os.listdir(m))
    assert names == ["file1", "file2", "subdir"]
    assert ".s3cryptfs" not in names
    entries = {e.name: e.is_dir() for e in os.scandir(m)}
    assert entries == {"file1": False, "file2": False, "subdir": True}
    assert os.listdir(m / "subdir") == ["inner"]


def test_unlink_while_open_for_reading_races_the_upload(mounted):
    """The copy kept for an open reader of an unlinked file survives its upload landing."""
    bad = []
    for i in range(30):
        path = mounted.mountpoint / f"u{i}"
        data = bytes([i]) * 1000
        path.write_bytes(data)
        time.sleep((i % 5) * 0.002)  # the upload of the new file lands at varying moments
        fd = os.open(path, os.O_RDONLY)
        try:
            os.unlink(path)
            try:
                got = os.pread(fd, 2000, 0)
            except OSError as exc:
                got = repr(exc).encode()
            if got != data:
                bad.append((i, got[:40]))
        finally:
            os.close(fd)
    assert not bad
    assert not [n for n in os.listdir(mounted.mountpoint) if n.startswith("u")]


def test_link_counts(mounted):
    """A directory counts "." and each subdirectory's ".."; a file unlinked while open has no
    name left (st_nlink 0), as fstat on a local disk says."""
    m = mounted.mountpoint
    (m / "d").mkdir()
    assert os.stat(m / "d").st_nlink == 2
    for sub in ("a", "b", "c"):
        (m / "d" / sub).mkdir()
    (m / "d" / "file").write_bytes(b"x")
    os.listdir(m / "d")
    assert os.stat(m / "d").st_nlink == 5
    os.rmdir(m / "d" / "c")
    assert os.stat(m / "d").st_nlink == 4
    mounted.remount()
    os.listdir(m / "d")
    assert os.stat(m / "d").st_nlink == 4
    # Counted once, then kept up to date by each change (not recounted at each stat).
    os.rename(m / "d" / "a", m / "d" / "a2")
    (m / "d" / "e").mkdir()
    (m / "d" / "other").write_bytes(b"y")
    assert os.stat(m / "d").st_nlink == 5
    os.rmdir(m / "d" / "e")
    os.unlink(m / "d" / "other")
    assert os.stat(m / "d").st_nlink == 4
    assert os.stat(m / "d" / "file").st_nlink == 1
    fd = os.open(m / "d" / "file", os.O_RDONLY)
    try:
        os.unlink(m / "d" / "file")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_the_mount_source_is_the_volume(mounted):
    """`mount` and `df` name the volume (s3://BUCKET/PREFIX), not a path."""
    target = os.path.realpath(mounted.mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                sep = fields.index("-")
                assert fields[sep + 1] == "fuse.s3cryptfs"
                assert fields[sep + 2] == f"s3://{mounted.bucket}/vol"
                break
        else:
            raise AssertionError(f"{target} is not in /proc/self/mountinfo")


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["python3", "-c", code], user=65534, group=65534, capture_output=True, text=True
    )


@contextlib.contextmanager
def _shared_mount(volume):
    """A new volume mounted with --allow-other, its root 0755 and reachable by other users."""
    volume.init()
    volume.mount("--allow-other")
    m = volume.mountpoint
    with _traversable(m):
        os.chmod(m, 0o755)
        yield m


@contextlib.contextmanager
def _traversable(path):
    """Let other users walk down to *path* (pytest's temporary directories are 0700)."""
    changed = []
    for parent in reversed(path.parents):
        mode = stat.S_IMODE(os.stat(parent).st_mode)
        if mode & 0o011 != 0o011:
            os.chmod(parent, mode | 0o011)
            changed.append((parent, mode))
    # pytest-of-USER is shared by every pytest run of the user: a run restoring it while
    # another one's test walks through it made that test see EACCES. It stays search-only.
    shared = [p for p in path.parents if p.name.startswith("pytest-of-")]
    keep = {shared[0], *shared[0].parents} if shared else set()
    try:
        yield
    finally:
        for parent, mode in reversed(changed):
            if parent not in keep:
                os.chmod(parent, mode)


def test_ownership_and_mode_of_a_directory_steer_the_kernels_permission_checks(volume):
    """What pjdfstest does as root before it checks a user's rights in a directory: chown and
    chmod it, then act as that user. Shared mounts need --allow-other (else the kernel lets
    no other user in at all)."""
    volume.init()
    volume.mount("--allow-other")
    m = volume.mountpoint
    with _traversable(m):
        _check_permissions_as_nobody(volume, m)


def _check_permissions_as_nobody(volume, m) -> None:
    os.chmod(m, 0o755)
    (m / "mine").mkdir()
    os.chown(m / "mine", 65534, 65534)
    (m / "theirs").mkdir(mode=0o755)
    made = _as_nobody(f"open({str(m / 'mine' / 'f')!r}, 'w').write('x')")
    assert made.returncode == 0, made.stderr
    refused = _as_nobody(f"open({str(m / 'theirs' / 'f')!r}, 'w').write('x')")
    assert "PermissionError" in refused.stderr
    os.chmod(m / "theirs", 0o777)
    made = _as_nobody(f"open({str(m / 'theirs' / 'f')!r}, 'w').write('x')")
    assert made.returncode == 0, made.stderr
    assert os.stat(m / "theirs" / "f").st_uid == 65534
    volume.remount("--allow-other")
    assert os.stat(m / "mine").st_uid == 65534
    assert stat.S_IMODE(os.stat(m / "theirs").st_mode) == 0o777
    made = _as_nobody(f"import os; os.mkdir({str(m / 'mine' / 'sub')!r})")
    assert made.returncode == 0, made.stderr


def test_an_atime_set_explicitly_is_kept_and_reads_do_not_move_it(mounted):
    m = mounted.mountpoint
    f = m / "f"
    f.write_bytes(b"data")
    os.utime(f, ns=(1_900_000_000 * 10**9, 1_950_000_000 * 10**9))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_900_000_000 * 10**9, 1_950_000_000 * 10**9)
    subprocess.run(["touch", "-a", "-d", "@1800000000", str(m / "g")], check=True)
    mounted.remount()
    assert f.read_bytes() == b"data"  # a read does not move it (noatime)
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_900_000_000 * 10**9, 1_950_000_000 * 10**9)
    assert os.stat(m / "g").st_atime == 1_800_000_000
    with open(f, "ab") as out:  # a new version keeps it too
        out.write(b"!")
    mounted.remount()
    assert os.stat(f).st_atime_ns == 1_900_000_000 * 10**9
    # Without an explicit one, the atime shown is the mtime.
    (m / "h").write_bytes(b"x")
    assert os.stat(m / "h").st_atime_ns == os.stat(m / "h").st_mtime_ns
    # A directory's too (pjdfstest utimensat/00): kept in its parent's index.
    (m / "d").mkdir()
    os.utime(m / "d", ns=(1_900_000_000 * 10**9, 1_950_000_000 * 10**9))
    assert os.stat(m / "d").st_atime_ns == 1_900_000_000 * 10**9
    os.listdir(m / "d")
    mounted.remount()
    st = os.stat(m / "d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_900_000_000 * 10**9, 1_950_000_000 * 10**9)


def _errno_as_nobody(code: str) -> str:
    """Run *code* as uid 65534; the name of the OSError errno it raised, or "ok"."""
    wrapped = (
        "import errno, os\ntry:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    done = _as_nobody(wrapped)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_sticky_directories_search_permission_and_ownership_errnos(volume):
    """The errnos POSIX gives another user (uid 65534) in a sticky directory, without search
    permission, and on files it does not own: the kernel decides them from the owner and mode
    this mount reports, so they must be the stored ones, also after a remount."""
    with _shared_mount(volume) as m:
        tmp = m / "tmp"
        tmp.mkdir()
        os.chmod(tmp, 0o1777)
        (tmp / "roots").write_text("r")
        os.chmod(tmp / "roots", 0o666)
        closed = m / "closed"
        closed.mkdir(mode=0o700)
        (closed / "f").write_text("x")
        ro = m / "ro"
        ro.write_text("data")
        os.chmod(ro, 0o644)
        for attempt in range(2):
            t, c, r = str(tmp), str(closed), str(ro)
            # sticky: another user's file can be written but not removed or renamed away
            assert _errno_as_nobody(f"open({t!r} + '/roots', 'a').write('x')") == "ok"
            assert _errno_as_nobody(f"os.unlink({t!r} + '/roots')") == "EPERM"
            assert _errno_as_nobody(f"os.rename({t!r} + '/roots', {t!r} + '/x')") == "EPERM"
            own = f"{t}/mine{attempt}"
            assert _errno_as_nobody(f"open({own!r}, 'w').write('m')") == "ok"
            assert _errno_as_nobody(f"os.rename({own!r}, {own!r} + '.moved')") == "ok"
            assert _errno_as_nobody(f"os.unlink({own!r} + '.moved')") == "ok"
            # no search permission: nothing below is reachable
            assert _errno_as_nobody(f"os.stat({c!r} + '/f')") == "EACCES"
            assert _errno_as_nobody(f"open({c!r} + '/new', 'w')") == "EACCES"
            assert _errno_as_nobody(f"os.listdir({c!r})") == "EACCES"
            # someone else's file: no chmod, chown, explicit times; no write, no truncate
            assert _errno_as_nobody(f"os.chmod({r!r}, 0o777)") == "EPERM"
            assert _errno_as_nobody(f"os.chown({r!r}, 65534, 65534)") == "EPERM"
            assert _errno_as_nobody(f"os.utime({r!r}, (1, 1))") == "EPERM"
            assert _errno_as_nobody(f"os.utime({r!r})") == "EACCES"
            assert _errno_as_nobody(f"os.truncate({r!r}, 0)") == "EACCES"
            assert _errno_as_nobody(f"open({r!r}, 'w')") == "EACCES"
            assert _errno_as_nobody(f"os.mkdir({str(m)!r} + '/d')") == "EACCES"
            assert ro.read_text() == "data"
            if attempt == 0:
                volume.remount("--allow-other")  # the same, from what S3 holds


def test_chown_and_a_write_by_another_user_clear_setuid(volume):
    with _shared_mount(volume) as m:
        f = m / "prog"
        f.write_bytes(b"#!/bin/sh\n")
        os.chmod(f, 0o4755)
        assert os.stat(f).st_mode & 0o7777 == 0o4755
        os.chown(f, 65534, 65534)
        assert os.stat(f).st_mode & stat.S_ISUID == 0
        os.chmod(f, 0o6777)
        # (a writer without CAP_FSETID, even the owner, drops both)
        assert _errno_as_nobody(f"open({str(f)!r}, 'a').write('echo')") == "ok"
        assert os.stat(f).st_mode & 0o7777 == 0o0777
        volume.remount("--allow-other")
        assert os.stat(f).st_mode & 0o7777 == 0o0777
        assert f.read_bytes() == b"#!/bin/sh\necho"


def test_a_set_group_id_directory_gives_new_entries_its_group(volume):
    """Shared project directories: in a directory with the set-group-ID bit, what anyone
    creates takes the directory's group, and new directories keep the bit; kept in S3."""
    with _shared_mount(volume) as m:
        shared = m / "shared"
        shared.mkdir()
        os.chown(shared, 0, 4242)
        os.chmod(shared, 0o2777)
        s = str(shared)
        (shared / "f").write_text("root's")
        os.mkdir(shared / "d", 0o755)
        os.symlink("f", shared / "l")
        os.mkfifo(shared / "p")
        made = _errno_as_nobody(
            f"open({s!r} + '/theirs', 'w').write('x')\n"
            f"os.mkdir({s!r} + '/theirdir')\n"
            # not a member of 4242: the kernel drops the bit of a new file's mode
            f"os.close(os.open({s!r} + '/sgid', os.O_CREAT | os.O_WRONLY, 0o2775))"
        )
        assert made == "ok"
        (m / "plain").write_text("x")  # outside it, the creator's group
        for attempt in range(2):
            for name in ("f", "d", "l", "p", "theirs", "theirdir", "sgid"):
                assert os.lstat(shared / name).st_gid == 4242, name
            assert os.stat(shared / "theirs").st_uid == 65534
            assert os.stat(shared / "d").st_mode & 0o7777 == 0o2755
            assert os.stat(shared / "theirdir").st_mode & stat.S_ISGID
            assert os.stat(shared / "f").st_mode & stat.S_ISGID == 0
            assert os.stat(shared / "sgid").st_mode & 0o7777 == 0o0755
            assert os.stat(m / "plain").st_gid == 0
            if attempt == 0:
                volume.remount("--allow-other")
