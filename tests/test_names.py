"""Names the bucket cannot hold, through a real mount (issue 18): names that are not UTF-8
(S3 keys are), names with a backslash on servers that turn it into a "/" (SeaweedFS), and
names or keys longer than POSIX or S3 allow. Each is refused with its own errno
(docs/SEMANTICS.md, "Names"), never EIO, and leaves no error or traceback in the mount log."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tarfile

import pytest

BAD = b"caf\xe9.txt"  # Latin-1 "café.txt": not UTF-8


def expect(errnum: int, fn, *args, **kwargs) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == errnum, (
        f"{fn.__name__}{args}: {errno.errorcode.get(info.value.errno)}, "
        f"expected {errno.errorcode[errnum]}"
    )


def mount_log(vol) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(vol.cache_dir.glob("*/mount.log")))


def assert_quiet_log(vol) -> None:
    """No traceback at all (ERROR lines are checked by the fixture at teardown)."""
    text = mount_log(vol)
    assert "Traceback" not in text, text
    assert " ERROR " not in text, text


def objects_under(s3client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


# --- names that are not UTF-8 ----------------------------------------------------------


def test_non_utf8_names_are_refused_with_eilseq(mounted):
    root = os.fsencode(mounted.mountpoint)
    bad = root + b"/" + BAD
    good = root + b"/good.txt"
    with open(good, "wb") as f:
        f.write(b"good\n")
    os.mkdir(root + b"/sub")
    for where in (root, root + b"/sub"):
        path = where + b"/" + BAD
        expect(errno.EILSEQ, os.open, path, os.O_WRONLY | os.O_CREAT, 0o644)
        expect(errno.EILSEQ, os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        expect(errno.EILSEQ, os.mkdir, path)
        expect(errno.EILSEQ, os.symlink, b"good.txt", path)
        expect(errno.EILSEQ, os.mknod, path, stat.S_IFIFO | 0o644)
        expect(errno.EILSEQ, os.link, good, path)
        expect(errno.EILSEQ, os.rename, good, path)
        # Lookups: no such name can exist in the bucket.
        expect(errno.ENOENT, os.stat, path)
        expect(errno.ENOENT, os.lstat, path)
        expect(errno.ENOENT, os.open, path, os.O_RDONLY)
        expect(errno.ENOENT, os.unlink, path)
        expect(errno.ENOENT, os.rmdir, path)
        expect(errno.ENOENT, os.rename, path, good + b".2")
        expect(errno.ENOENT, os.stat, path + b"/below")
    # A directory of such a name, or a name with the byte in the middle of a path.
    expect(errno.ENOENT, os.open, bad + b"/x", os.O_WRONLY | os.O_CREAT, 0o644)
    assert sorted(os.listdir(root)) == [b"good.txt", b"sub"]
    with open(good, "rb") as f:
        assert f.read() == b"good\n"
    assert_quiet_log(mounted)
    mounted.remount()
    assert sorted(os.listdir(root)) == [b"good.txt", b"sub"]
    expect(errno.ENOENT, os.stat, bad)
    assert_quiet_log(mounted)


def test_tar_extracts_everything_but_a_non_utf8_name(mounted, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a\n")
    (src / "sub" / "b.txt").write_bytes(b"b\n")
    with open(os.fsencode(src) + b"/" + BAD, "wb") as f:
        f.write(b"latin-1\n")
    archive = tmp_path / "names.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for name in ("a.txt", os.fsdecode(BAD), "sub", "sub/b.txt"):
            tar.add(src / name, arcname=name, recursive=False)
    proc = subprocess.run(
        ["tar", "xf", str(archive), "-C", str(mounted.mountpoint)],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.returncode != 0
    message = os.strerror(errno.EILSEQ).encode()  # "Invalid or incomplete multibyte or wide..."
    assert message in proc.stderr, proc.stderr
    assert b"Cannot open" in proc.stderr, proc.stderr
    assert proc.stderr.count(b"\n") == 2, proc.stderr  # that one line, and "Exiting with ..."
    assert (mounted.mountpoint / "a.txt").read_bytes() == b"a\n"
    assert (mounted.mountpoint / "sub" / "b.txt").read_bytes() == b"b\n"
    assert sorted(os.listdir(mounted.mountpoint)) == ["a.txt", "sub"]
    assert_quiet_log(mounted)


# --- backslashes -------------------------------------------------------------------------


def test_backslash_names_are_refused_where_the_server_rewrites_them(mounted, s3client):
    """SeaweedFS stores "back\\slash" as "back/slash": after a remount the file would be a
    directory "back" holding "slash". The mount finds this out at mount time and refuses."""
    root = mounted.mountpoint
    (root / "dir").mkdir()
    (root / "file").write_bytes(b"x")
    for where in (root, root / "dir"):
        path = where / "back\\slash"
        expect(errno.EINVAL, os.open, path, os.O_WRONLY | os.O_CREAT, 0o644)
        expect(errno.EINVAL, os.mkdir, path)
        expect(errno.EINVAL, os.symlink, "file", path)
        expect(errno.EINVAL, os.rename, root / "file", path)
        expect(errno.ENOENT, os.stat, path)
    # A file "back/slash" is not reachable as "back\slash", with or without a listing.
    (root / "back").mkdir()
    (root / "back" / "slash").write_bytes(b"under a directory\n")
    expect(errno.ENOENT, os.stat, root / "back\\slash")
    mounted.remount()
    expect(errno.ENOENT, os.stat, root / "back\\slash")
    assert sorted(os.listdir(root)) == ["back", "dir", "file"]
    assert os.listdir(root / "dir") == []
    assert (root / "file").read_bytes() == b"x"
    assert stat.S_ISREG(os.stat(root / "file").st_mode)
    keys = objects_under(s3client, mounted.bucket, mounted.prefix)
    assert not [k for k in keys if "slash" in k and k != f"{mounted.prefix}back/slash"], keys
    assert not [k for k in keys if "probe" in k], keys  # the mount's probe cleans up
    text = mount_log(mounted)
    # Said once per mount (two mounts here), at info level.
    assert text.count("names with a backslash are refused") == 2, text
    assert_quiet_log(mounted)


# --- lengths -----------------------------------------------------------------------------


def test_name_of_255_bytes_works_and_256_is_too_long(mounted):
    root = mounted.mountpoint
    name255 = "é" * 127 + "x"  # 255 bytes, 128 characters
    assert len(name255.encode()) == 255
    (root / name255).write_bytes(b"255\n")
    (root / ("d" * 255)).mkdir()
    (root / ("d" * 255) / name255).write_bytes(b"deep\n")
    mounted.remount()
    assert (root / name255).read_bytes() == b"255\n"
    assert (root / ("d" * 255) / name255).read_bytes() == b"deep\n"
    assert sorted(os.listdir(root)) == sorted([name255, "d" * 255])
    long = root / ("n" * 256)
    expect(errno.ENAMETOOLONG, os.open, long, os.O_WRONLY | os.O_CREAT, 0o644)
    expect(errno.ENAMETOOLONG, os.mkdir, long)
    expect(errno.ENAMETOOLONG, os.symlink, "x", long)
    expect(errno.ENAMETOOLONG, os.rename, root / name255, long)
    expect(errno.ENAMETOOLONG, os.stat, long)
    expect(errno.ENAMETOOLONG, os.open, long, os.O_RDONLY)
    expect(errno.ENAMETOOLONG, os.unlink, long)
    assert (root / name255).read_bytes() == b"255\n"
    assert_quiet_log(mounted)


def test_keys_over_1024_bytes_are_too_long(mounted, s3client):
    root = mounted.mountpoint
    prefix = len(mounted.prefix.encode())  # "vol/"
    deep = root
    for level in range(4):
        deep = deep / (str(level) * 200)
        deep.mkdir()
    base = prefix + 4 * 201  # the key of a name in `deep` is base + len(name)
    fits = "f" * (1024 - base)  # a 1024-byte key
    over = "o" * (1025 - base)  # a 1025-byte key
    with open(deep / fits, "wb") as f:
        f.write(b"1024\n")
        os.fsync(f.fileno())  # in S3 now, not a moment into what is compared below
    for make in (
        lambda p: p.write_bytes(b"x"),
        lambda p: os.symlink("x", p),
        lambda p: os.rename(deep / fits, p),
        lambda p: os.mkdir(p),
    ):
        expect(errno.ENAMETOOLONG, make, deep / over)
    # A directory's marker key ends in "/": one byte less for its name.
    expect(errno.ENAMETOOLONG, os.mkdir, deep / ("m" * (1024 - base)))
    (deep / ("m" * (1023 - base))).mkdir()
    # Lookups: a key over 1024 bytes cannot exist; one of 1024 may (another tool's file).
    expect(errno.ENAMETOOLONG, os.stat, deep / over)
    expect(errno.ENOENT, os.stat, deep / ("g" * (1024 - base)))
    # A directory rename that would push a descendant's key over the limit: refused before
    # anything is copied.
    top = root / ("0" * 200)
    before = sorted(objects_under(s3client, mounted.bucket, mounted.prefix))
    expect(errno.ENAMETOOLONG, os.rename, top, root / ("0" * 201))
    assert sorted(objects_under(s3client, mounted.bucket, mounted.prefix)) == before
    os.rename(top, root / ("0" * 199))  # one byte shorter: fine
    deep = root / ("0" * 199) / ("1" * 200) / ("2" * 200) / ("3" * 200)
    mounted.remount()
    assert (deep / fits).read_bytes() == b"1024\n"
    assert f"{mounted.prefix}{'0' * 199}/{'1' * 200}" in "".join(
        objects_under(s3client, mounted.bucket, mounted.prefix)
    )
    assert_quiet_log(mounted)
