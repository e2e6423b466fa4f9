"""--max-inodes through the kernel: past the bound the mount asks the kernel to drop the
least recently used files, the kernel's FORGETs free them, and every file stays as it was
to every tool (the choice of files is tests/vfs/test_node_bound.py)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess

from tests.conftest import wait_until

FILES = 600
LIMIT = 200


def stats(volume) -> dict:
    return json.loads(os.getxattr(volume.mountpoint, "user.s3cryptfs.stats"))


def copies(volume, s3client, seed: str, names: list[str]) -> None:
    """Server-side copies of *seed* at *names* (paths in the volume), as a restore would
    leave them: objects no directory index describes."""
    source = {"Bucket": volume.bucket, "Key": volume.prefix + seed}

    def copy(name: str) -> None:
        s3client.copy_object(Bucket=volume.bucket, Key=volume.prefix + name, CopySource=source)

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(copy, names))  # (list: a failed copy raises here)


def test_a_wide_listing_stays_within_max_inodes(volume, s3client):
    volume.init()
    volume.mount()
    wide = volume.mountpoint / "wide"
    wide.mkdir()
    seed = os.urandom(3000)
    (wide / "seed").write_bytes(seed)
    volume.umount()
    copies(volume, s3client, "wide/seed", [f"wide/f{i:04d}" for i in range(FILES)])
    # A listing trusted for the whole test: a dropped file is looked up again from it.
    volume.mount("--max-inodes", LIMIT, "--dir-cache-ttl", 300)
    out = subprocess.run(["ls", "-l", str(wide)], capture_output=True, text=True, check=True)
    lines = [line for line in out.stdout.splitlines() if not line.startswith("total")]
    assert len(lines) == FILES + 1
    assert all(line.split()[4] == str(len(seed)) for line in lines), lines[:3]

    def known() -> int:
        return int(stats(volume)["inodes"]["known"])

    # The kernel was asked to drop files as the listing went past the bound, and forgot them.
    wait_until(lambda: known() <= LIMIT, what=f"at most {LIMIT} inodes known: {known()}")
    assert stats(volume)["inodes"]["dropped"] >= FILES - LIMIT
    heads = stats(volume)["requests"].get("head", 0)

    # A file kept open is not dropped, and reads and stats as before while others go.
    with open(wide / "f0000", "rb") as held:
        for name in sorted(os.listdir(wide)):
            st = os.stat(wide / name)
            assert st.st_size == len(seed) and st.st_nlink == 1, name
        for i in range(0, FILES, 37):
            assert (wide / f"f{i:04d}").read_bytes() == seed
        assert os.fstat(held.fileno()).st_nlink == 1
        assert held.read() == seed
    # Files looked up again after being dropped came from the listing: no HEAD each (the
    # opens above validate their version: a HEAD or a conditional GET per open, no more).
    opened = len(range(0, FILES, 37)) + 1
    assert stats(volume)["requests"].get("head", 0) - heads <= opened
    wait_until(lambda: known() <= LIMIT, what=f"at most {LIMIT} inodes known: {known()}")


def test_a_walk_past_the_bound_keeps_the_listed_attributes(volume, s3client):
    """The kernel takes a listing's attributes only if no inode was evicted while the
    listing was in flight (fuse_drop.py): names dropped while `ls -lR` walks on must not
    make it ask for each file's attributes again."""
    volume.init()
    volume.mount()
    (volume.mountpoint / "seed").write_bytes(b"s" * 100)
    volume.umount()
    copies(volume, s3client, "seed", [f"tree/d{i % 12:02d}/f{i:04d}" for i in range(1200)])
    volume.mount("--max-inodes", LIMIT, "--dir-cache-ttl", 300)
    out = subprocess.run(
        ["ls", "-lR", str(volume.mountpoint / "tree")], capture_output=True, text=True, check=True
    )
    assert sum(1 for line in out.stdout.splitlines() if line.startswith("-")) == 1200
    assert stats(volume)["inodes"]["dropped"] >= 1000
    # Names sent one at a time from pyfuse3's thread made the kernel ask again for 300 to
    # all 1,200 files' attributes here; sent together between requests, for 0 to 200 (a
    # directory whose listing came during a batch).
    getattrs = stats(volume)["kernel"]["requests"].get("getattr", 0)
    assert getattrs <= 400, getattrs
