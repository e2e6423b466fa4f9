"""Extended attributes through a real mount: user.* kept as on a local disk (sealed, persistent,
copied by rsync -X and cp -a), the mount's own control attributes never listed."""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import stat
import subprocess
import time

import pytest

from s3cryptfs.format import xattrs as xa

INTERNAL = b"user.s3cryptfs."


def xattrs_of(path, follow=True) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=follow)
    return {n: os.getxattr(path, n, follow_symlinks=follow) for n in names}


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as err:
        fn(*args, **kwargs)
    return err.value.errno


def requests(vol) -> dict[str, int]:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))["requests"]


def head_metadata(s3client, vol, rel: str) -> dict[str, str]:
    return s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + rel)["Metadata"]


def test_round_trip_on_files_and_directories_survives_a_remount(mounted, s3client):
    m = mounted.mountpoint
    (m / "d").mkdir()
    f = m / "d" / "f"
    f.write_bytes(b"content")
    binary = bytes(range(256))
    os.setxattr(f, "user.comment", b"a file")
    os.setxattr(f, "user.binary", binary)
    os.setxattr(f, "user.empty", b"")
    os.setxattr(m / "d", "user.dir", b"a directory")
    os.setxattr(m, "user.root", b"the root")
    assert os.getxattr(f, "user.comment") == b"a file"
    assert sorted(os.listxattr(f)) == ["user.binary", "user.comment", "user.empty"]
    mounted.remount()
    assert xattrs_of(f) == {"user.comment": b"a file", "user.binary": binary, "user.empty": b""}
    assert xattrs_of(m / "d") == {"user.dir": b"a directory"}
    assert xattrs_of(m) == {"user.root": b"the root"}
    assert f.read_bytes() == b"content"
    getfattr = ["getfattr", "-d", "-m", "-", "--absolute-names", str(f)]
    dump = subprocess.run(getfattr, capture_output=True, text=True, check=True).stdout
    assert 'user.comment="a file"' in dump and "s3cryptfs" not in dump
    # Sealed: the object's metadata holds the set encrypted, not the value.
    meta = head_metadata(s3client, mounted, "d/f")
    assert xa.META_NAME in meta and "a file" not in json.dumps(meta)
    assert mounted.run("fsck", mounted.url, *mounted.common_args()).returncode == 0


def test_internal_attributes_are_never_listed_but_still_answer(mounted):
    m = mounted.mountpoint
    f = m / "f"
    f.write_bytes(b"x")
    (m / "d").mkdir()
    for path in (f, m / "d", m):
        assert not [n for n in os.listxattr(path) if n.encode().startswith(INTERNAL)], path
    assert os.getxattr(f, "user.s3cryptfs.state") in (b"clean", b"dirty", b"uploading")
    assert int(os.getxattr(m, "user.s3cryptfs.pid")) > 0
    # Not ordinary attributes: they cannot be set or removed as such.
    assert errno_of(os.setxattr, f, "user.s3cryptfs.state", b"clean") == errno.ENOTSUP
    assert errno_of(os.setxattr, f, "user.s3cryptfs.mine", b"1") == errno.ENOTSUP
    assert errno_of(os.removexattr, f, "user.s3cryptfs.state") == errno.ENOTSUP
    assert errno_of(os.getxattr, f, "user.s3cryptfs.mine") == errno.ENODATA
    for name in ("trusted.x", "security.x", "system.x", "other.x"):
        assert errno_of(os.setxattr, f, name, b"1") == errno.ENOTSUP, name


def test_symlinks_refuse_user_attributes_as_linux_does(mounted, tmp_path):
    m = mounted.mountpoint
    (m / "target").write_bytes(b"t")
    os.symlink("target", m / "link")
    local = tmp_path / "link"
    os.symlink("target", local)
    for link in (local, m / "link"):  # a local disk says the same
        assert errno_of(os.setxattr, link, "user.a", b"1", follow_symlinks=False) == errno.EPERM
        assert errno_of(os.getxattr, link, "user.a", follow_symlinks=False) == errno.ENODATA
        assert os.listxattr(link, follow_symlinks=False) == []


def test_create_replace_remove_and_missing_names(mounted):
    f = mounted.mountpoint / "f"
    f.write_bytes(b"x")
    assert errno_of(os.getxattr, f, "user.none") == errno.ENODATA
    assert errno_of(os.setxattr, f, "user.none", b"v", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(f, "user.a", b"1", os.XATTR_CREATE)
    assert errno_of(os.setxattr, f, "user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    os.setxattr(f, "user.a", b"3", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.a") == b"3"
    os.setxattr(f, "user.b", b"4")
    os.removexattr(f, "user.a")
    assert errno_of(os.removexattr, f, "user.a") == errno.ENODATA
    assert os.listxattr(f) == ["user.b"]
    mounted.remount()
    assert xattrs_of(f) == {"user.b": b"4"}
    os.removexattr(f, "user.b")
    mounted.remount()
    assert os.listxattr(f) == []


def test_sizes_are_bounded_with_linux_errnos(mounted):
    f = mounted.mountpoint / "f"
    f.write_bytes(b"x")
    d = mounted.mountpoint / "d"
    d.mkdir()
    assert errno_of(os.setxattr, f, "user." + "n" * 251, b"v") == errno.ERANGE
    os.setxattr(f, "user." + "n" * 250, b"v")  # 255 bytes: the longest name
    assert errno_of(os.setxattr, f, "user.", b"v") == errno.EINVAL
    assert errno_of(os.setxattr, f, "user.big", b"x" * (64 * 1024 + 1)) == errno.E2BIG
    for path in (f, d):
        assert errno_of(os.setxattr, path, "user.big", b"x" * 2000) == errno.ENOSPC
        assert errno_of(os.getxattr, path, "user.big") == errno.ENODATA
    # Up to the limit (1 KiB of names, values and 3 bytes each) fits, one byte more does not.
    room = xa.SET_MAX - xa.entry_size(b"user." + b"n" * 250, b"v")
    fill = b"y" * (room - xa.entry_size(b"user.fill", b""))
    os.setxattr(f, "user.fill", fill)
    assert errno_of(os.setxattr, f, "user.z", b"") == errno.ENOSPC
    mounted.remount()
    assert os.getxattr(f, "user.fill") == fill


def test_a_change_on_a_closed_file_is_metadata_only(mounted, s3client):
    f = mounted.mountpoint / "f"
    f.write_bytes(b"data" * 1000)
    mounted.remount()  # uploaded; the mount knows it from S3 only
    before = requests(mounted)
    os.chmod(f, 0o600)
    os.setxattr(f, "user.tag", b"blue")
    after = requests(mounted)
    assert after.get("put", 0) == before.get("put", 0)
    assert after.get("create_multipart", 0) == before.get("create_multipart", 0)
    assert after.get("copy", 0) >= before.get("copy", 0) + 2
    mounted.remount()
    assert os.getxattr(f, "user.tag") == b"blue"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


def test_set_while_written_or_queued_rides_with_the_upload(mounted):
    m = mounted.mountpoint
    with open(m / "open", "wb") as fh:
        fh.write(b"written")
        os.setxattr(m / "open", "user.while", b"open")
        fh.write(b" more")
    (m / "queued").write_bytes(b"q")
    os.setxattr(m / "queued", "user.after", b"close")  # queued or being sent
    mounted.remount()
    assert os.getxattr(m / "open", "user.while") == b"open"
    assert (m / "open").read_bytes() == b"written more"
    assert os.getxattr(m / "queued", "user.after") == b"close"


def test_rewrites_and_renames_keep_them(mounted):
    m = mounted.mountpoint
    (m / "d").mkdir()
    f = m / "d" / "f"
    f.write_bytes(b"one")
    os.setxattr(f, "user.k", b"kept")
    os.setxattr(m / "d", "user.dk", b"dir kept")
    mounted.remount()
    f.write_bytes(b"two, a new version under a new data key")
    with open(f, "ab") as fh:
        fh.write(b"!")
    os.rename(f, m / "d" / "g")
    os.rename(m / "d", m / "e")
    mounted.remount()
    assert (m / "e" / "g").read_bytes() == b"two, a new version under a new data key!"
    assert os.getxattr(m / "e" / "g", "user.k") == b"kept"
    assert os.getxattr(m / "e", "user.dk") == b"dir kept"


def local_tree(root) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"alpha")
    (root / "sub" / "b").write_bytes(b"beta" * 5000)
    os.symlink("a", root / "link")
    os.setxattr(root / "a", "user.origin", b"https://example.invalid/a")
    os.setxattr(root / "a", "user.bin", b"\x00\x01\xff")
    os.setxattr(root / "sub" / "b", "user.checksum", b"0" * 64)
    os.setxattr(root / "sub", "user.dir", b"yes")


def tree_xattrs(root) -> dict[str, dict[str, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            out[rel] = xattrs_of(path, follow=False)
    return out


def test_rsync_x_into_the_mount_and_back_out(mounted, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    local_tree(src)
    into = subprocess.run(
        ["rsync", "-aX", f"{src}/", f"{mounted.mountpoint}/copy/"], capture_output=True, text=True
    )
    assert into.returncode == 0, into.stderr
    mounted.remount()
    out = subprocess.run(
        ["rsync", "-aX", f"{mounted.mountpoint}/copy/", f"{back}/"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    expected = tree_xattrs(src)
    assert tree_xattrs(back) == expected
    assert expected["a"] == {
        "user.origin": b"https://example.invalid/a",
        "user.bin": b"\x00\x01\xff",
    }
    assert (back / "sub" / "b").read_bytes() == b"beta" * 5000


def test_cp_a_out_copies_user_attributes_and_no_internal_one(mounted, tmp_path):
    f = mounted.mountpoint / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.mine", b"v")
    copy = subprocess.run(["cp", "-a", str(f), str(tmp_path / "f")], capture_output=True, text=True)
    assert copy.returncode == 0 and copy.stderr == "", copy.stderr
    assert xattrs_of(tmp_path / "f") == {"user.mine": b"v"}
    archive = tmp_path / "t.tar"
    tar = ["tar", "--xattrs", "--xattrs-include=*", "-cf", str(archive)]
    subprocess.run([*tar, "-C", str(mounted.mountpoint), "f"], check=True, capture_output=True)
    listing = subprocess.run(
        ["tar", "--xattrs", "-tvvf", str(archive)], capture_output=True, text=True, check=True
    ).stdout
    assert "user.mine" in listing and "s3cryptfs" not in listing


def test_cp_preserve_xattr_into_the_mount(mounted, tmp_path):
    local = tmp_path / "f"
    local.write_bytes(b"x")
    os.setxattr(local, "user.from", b"local")
    cp = ["cp", "--preserve=xattr", str(local), str(mounted.mountpoint / "f")]
    copy = subprocess.run(cp, capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    mounted.remount()
    assert xattrs_of(mounted.mountpoint / "f") == {"user.from": b"local"}


@pytest.mark.expect_log_errors(
    r"extended attributes failed authentication",
    r"its extended attributes are dropped from its new version",
)
def test_tampered_attributes_are_refused(mounted, s3client):
    f = mounted.mountpoint / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.secret", b"v")
    mounted.umount()
    key = mounted.prefix + "f"
    head = s3client.head_object(Bucket=mounted.bucket, Key=key)
    meta = dict(head["Metadata"])
    blob = bytearray(base64.b64decode(meta[xa.META_NAME]))
    blob[-1] ^= 1  # one bit of the tag
    meta[xa.META_NAME] = base64.b64encode(bytes(blob)).decode()
    source = {"Bucket": mounted.bucket, "Key": key}
    s3client.copy_object(
        Bucket=mounted.bucket,
        Key=key,
        CopySource=source,
        Metadata=meta,
        MetadataDirective="REPLACE",
    )
    mounted.mount()
    assert errno_of(os.listxattr, f) == errno.EIO
    assert f.read_bytes() == b"x"
    # Writing it again stores the new version without them (never stuck as closed).
    f.write_bytes(b"again")
    mounted.remount()
    assert f.read_bytes() == b"again"
    assert os.listxattr(f) == []


def test_chmod_of_a_file_listed_from_the_index_is_kept(mounted):
    """A metadata change of a file whose attributes came from the directory index (no HEAD yet)
    must not be undone by the HEAD that fetches its metadata before the copy."""
    d = mounted.mountpoint / "d"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    mounted.remount()
    os.listdir(d)  # attributes from the index, no HEAD
    time.sleep(1.2)  # past the kernel's attribute lifetime
    os.chmod(f, 0o640)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    mounted.remount()
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


def test_gateway_format_volume_keeps_them_within_its_smaller_room(volume):
    volume.init("--format", "gateway")
    volume.mount()
    f = volume.mountpoint / "f"
    f.write_bytes(b"gateway content")
    os.setxattr(f, "user.g", b"v" * 500)
    assert errno_of(os.setxattr, f, "user.h", b"v" * 300) == errno.ENOSPC  # 768 bytes here
    volume.remount()
    assert xattrs_of(f) == {"user.g": b"v" * 500}
    assert f.read_bytes() == b"gateway content"
    shutil.copy(f, volume.mountpoint / "g")  # a new version of another file: none
    assert os.listxattr(volume.mountpoint / "g") == []


def test_a_streamed_upload_carries_them_and_keeps_its_head_start(mounted, s3client):
    from tests.test_crash import wait_state
    from tests.test_stream import PART, stats, wait_sent, write_in_steps

    m = mounted.mountpoint
    data = os.urandom(3 * PART + 4321)
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    os.setxattr(fd, "user.set", b"before the first part")
    write_in_steps(fd, data[: 2 * PART + 1024])
    wait_sent(m, PART)
    write_in_steps(fd, data[2 * PART + 1024 :])
    os.close(fd)
    assert wait_state(m / "big", {"clean"}) == "clean"
    assert stats(m)["fuse"]["stream_bytes_sent_before_close"] >= PART
    reqs = stats(m)["requests"]
    assert reqs["create_multipart"] == 1 and reqs["upload_part"] == 4  # not sent again whole
    assert xa.META_NAME in head_metadata(s3client, mounted, "big")
    mounted.remount()
    assert os.getxattr(m / "big", "user.set") == b"before the first part"
    assert (m / "big").read_bytes() == data
