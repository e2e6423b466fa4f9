"""The optional on-disk ciphertext cache (--disk-cache), through the mount."""

from __future__ import annotations

import json
import os

PLAIN = b"".join(
    b"line %06d of a file that must never be on disk in clear\n" % i for i in range(60000)
)


def stats(vol) -> dict:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))


def cache_files(vol) -> list:
    return [p for p in vol.cache_dir.glob("*/ciphertext/*/*") if p.is_file()]


def test_reads_come_from_disk_after_remount(mounted):
    m = mounted.mountpoint
    (m / "f").write_bytes(PLAIN)
    mounted.remount("--disk-cache", "64M")
    assert (m / "f").read_bytes() == PLAIN
    files = cache_files(mounted)
    assert files, "nothing was cached"
    for p in files:
        assert b"must never be on disk" not in p.read_bytes()  # ciphertext only
        assert p.stat().st_mode & 0o077 == 0
    mounted.remount("--disk-cache", "64M")
    gets_before = stats(mounted)["requests"].get("get", 0)
    assert (m / "f").read_bytes() == PLAIN
    s = stats(mounted)
    assert s["disk_cache"]["hits"] >= len(files) - 1
    assert s["requests"].get("get", 0) - gets_before <= 1, s  # at most the directory index


def test_corrupt_cache_file_is_refetched(mounted):
    m = mounted.mountpoint
    (m / "f").write_bytes(PLAIN)
    mounted.remount("--disk-cache", "64M")
    assert (m / "f").read_bytes() == PLAIN
    mounted.umount()
    for p in cache_files(mounted):
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x40
        p.write_bytes(bytes(data))
    mounted.mount("--disk-cache", "64M")
    assert (m / "f").read_bytes() == PLAIN


def test_cache_stays_within_budget(mounted):
    m = mounted.mountpoint
    (m / "f").write_bytes(PLAIN * 3)  # about 10 MiB
    mounted.remount("--disk-cache", "3M")
    assert (m / "f").read_bytes() == PLAIN * 3
    total = sum(p.stat().st_size for p in cache_files(mounted))
    assert 0 < total <= 3 * 1024 * 1024
