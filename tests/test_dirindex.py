"""The directory attribute index, through the mount: `ls -l` on a fresh mount without a HEAD per
file, attributes of directories kept across remounts, and stale entries never trusted."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from tests.conftest import wait_until
from tests.test_robustness import get_body, objects


def stats(volume) -> dict:
    return json.loads(os.getxattr(volume.mountpoint, "user.s3cryptfs.stats"))


def wait_index_write(volume, after: int) -> None:
    """Until *volume*'s mount has written a directory index since its count was *after*."""
    wait_until(lambda: stats(volume)["index_writes"] > after, what="a directory index write")


def heads(volume) -> int:
    return stats(volume)["requests"].get("head", 0)


def index_keys(s3client, volume) -> list[str]:
    return [k for k in objects(s3client, volume.bucket) if "/.s3cryptfs/dirs/" in f"/{k}"]


def make_tree(m) -> dict[str, tuple[int, int]]:
    """Files and directories with distinctive modes and mtimes; returns name -> (mode, mtime)."""
    want = {}
    (m / "sub").mkdir()
    for i in range(40):
        p = m / "sub" / f"file-{i:03d}.txt"
        p.write_bytes(b"x" * i)
        mode = 0o600 if i % 2 else 0o640
        os.chmod(p, mode)
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i * 1000))
        want[f"sub/{p.name}"] = (stat.S_IFREG | mode, 1_600_000_000_000_000_000 + i * 1000)
    (m / "sub" / "inner").mkdir()
    os.chmod(m / "sub" / "inner", 0o700)
    os.utime(m / "sub" / "inner", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    want["sub/inner"] = (stat.S_IFDIR | 0o700, 1_500_000_000_000_000_000)
    os.symlink("file-001.txt", m / "sub" / "link")
    return want


def check_tree(m, want) -> None:
    for rel, (mode, mtime) in want.items():
        st = os.lstat(m / rel)
        assert st.st_mode == mode, rel
        assert st.st_mtime_ns == mtime, rel
    assert os.readlink(m / "sub" / "link") == "file-001.txt"


def test_ls_l_on_fresh_mount_needs_no_head_per_file(mounted, s3client):
    m = mounted.mountpoint
    want = make_tree(m)
    mounted.remount()  # umount flushes the indexes with everything else
    keys = index_keys(s3client, mounted)
    assert keys, "no directory index was written"
    for key in keys:  # sealed: no file name readable in the bucket
        assert b"file-0" not in get_body(s3client, mounted.bucket, key)
    before = heads(mounted)
    out = subprocess.run(["ls", "-l", str(m / "sub")], capture_output=True, text=True, check=True)
    assert "file-039.txt" in out.stdout and "inner" in out.stdout
    check_tree(m, want)
    # Without the index this is one HEAD per file (41); a few are allowed for races.
    assert heads(mounted) - before <= 3, stats(mounted)


def test_directory_attributes_survive_remount(mounted):
    m = mounted.mountpoint
    (m / "d1" / "d2").mkdir(parents=True)
    os.chmod(m / "d1", 0o750)
    os.chmod(m / "d1" / "d2", 0o711)
    os.chown(m / "d1" / "d2", 1234, 5678)
    os.chmod(m, 0o770)
    mounted.remount()
    assert stat.S_IMODE(os.stat(m / "d1").st_mode) == 0o750
    st = os.stat(m / "d1" / "d2")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 1234, 5678)
    assert stat.S_IMODE(os.stat(m).st_mode) == 0o770


def test_renamed_directory_keeps_attributes_and_index(mounted):
    m = mounted.mountpoint
    want = make_tree(m)
    os.rename(m / "sub", m / "moved")
    mounted.remount()
    before = heads(mounted)
    assert len(os.listdir(m / "moved")) == 42  # as `ls -l` does: list, then stat each
    moved = {k.replace("sub/", "moved/", 1): v for k, v in want.items()}
    for rel, (mode, mtime) in moved.items():
        st = os.lstat(m / rel)
        assert (st.st_mode, st.st_mtime_ns) == (mode, mtime), rel
    assert heads(mounted) - before <= 3, stats(mounted)
    assert not (m / "sub").exists()


def test_stale_entry_is_not_trusted(mounted, s3client):
    """Another client replaces a file (new ETag): its attributes win over the index entry."""
    m = mounted.mountpoint
    (m / "f").write_bytes(b"one")
    os.chmod(m / "f", 0o600)
    (m / "g").write_bytes(b"other content")
    os.chmod(m / "g", 0o604)
    mounted.umount()
    bucket, prefix = mounted.bucket, mounted.prefix
    s3client.copy_object(
        Bucket=bucket, Key=prefix + "f", CopySource={"Bucket": bucket, "Key": prefix + "g"}
    )
    mounted.mount()
    assert stat.S_IMODE(os.stat(m / "f").st_mode) == 0o604
    assert (m / "f").read_bytes() == b"other content"


def test_corrupt_index_is_ignored(mounted, s3client):
    m = mounted.mountpoint
    want = make_tree(m)
    mounted.umount()
    for key in index_keys(s3client, mounted):
        body = bytearray(get_body(s3client, mounted.bucket, key))
        body[-1] ^= 1
        head = s3client.head_object(Bucket=mounted.bucket, Key=key)
        s3client.put_object(
            Bucket=mounted.bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"]
        )
    mounted.mount()
    check_tree(m, {k: v for k, v in want.items() if not k.endswith("inner")})


def test_listing_taken_during_a_create_keeps_the_new_name(volume, s3client):
    """A LIST that started before a file was created and uploaded must not hide it afterwards
    (the listing is cached for a long time, so a stale one would hide the file for minutes)."""
    import concurrent.futures

    volume.init()
    volume.mount("--dir-cache-ttl", "600")
    m = volume.mountpoint
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for round_ in range(2):
            d = f"many{round_}"
            # Written behind the mount's back so that it has no listing of the directory yet;
            # enough names for the LIST to take more than one page.
            list(
                pool.map(
                    lambda i, d=d: s3client.put_object(
                        Bucket=volume.bucket, Key=f"{volume.prefix}{d}/n{i:05d}", Body=b""
                    ),
                    range(1100),
                )
            )
            (m / d).stat()
            lister = pool.submit(os.listdir, m / d)
            (m / d / "a-new-file").write_bytes(b"new\n")
            os.fsync(os.open(m / d / "a-new-file", os.O_RDONLY))
            lister.result()
            names = os.listdir(m / d)
            assert "a-new-file" in names, f"round {round_}: the new file vanished from the listing"
            assert len(names) == 1101


def test_two_mounts_writing_one_directory_merge_their_index_entries(make_volume, bucket, s3client):
    """Each mount writes the index from what it last wrote, conditionally: when the other mount
    wrote in between, the condition fails and the entries are merged, never dropped."""
    a = make_volume(bucket=bucket)
    a.init()
    b = make_volume(bucket=bucket)
    a.mount()
    b.mount()
    (a.mountpoint / "shared").mkdir()
    for round_ in range(3):
        for vol, tag in ((a, "a"), (b, "b")):
            written = stats(vol)["index_writes"]
            for i in range(5):
                p = vol.mountpoint / "shared" / f"{tag}-{round_}-{i}"
                p.write_bytes(tag.encode())
                os.chmod(p, 0o600 if tag == "a" else 0o640)
            wait_index_write(vol, written)  # about a second after the changes
    assert stats(a)["index_writes"] >= 3 and stats(b)["index_writes"] >= 3
    a.umount()
    b.umount()
    a.mount()
    m = a.mountpoint
    before = heads(a)
    listing = {e.name: e.stat().st_mode & 0o777 for e in os.scandir(m / "shared")}
    assert len(listing) == 30
    assert all(mode == (0o600 if name[0] == "a" else 0o640) for name, mode in listing.items())
    assert heads(a) - before <= 3, "every file should come from the merged index"


def test_listing_lifetime_zero_lists_once_per_readdir(volume, s3client):
    """--dir-cache-ttl 0 (always fresh) must not LIST the directory again for every entry."""
    volume.init()
    volume.mount("--dir-cache-ttl", "0")
    m = volume.mountpoint
    (m / "d").mkdir()
    for i in range(300):
        s3client.put_object(Bucket=volume.bucket, Key=f"{volume.prefix}d/f{i:03d}", Body=b"")
    before = stats(volume)["requests"].get("list", 0)
    assert len(os.listdir(m / "d")) == 300
    lists = stats(volume)["requests"].get("list", 0) - before
    assert lists <= 4, f"{lists} LIST requests for one readdir of 300 names"
