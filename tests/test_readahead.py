"""Sequential reads through the mount: readahead fetches the file in few, large range GETs."""

from __future__ import annotations

import hashlib
import json
import os

MIB = 1024 * 1024


def gets(vol) -> int:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))["requests"].get("get", 0)


def test_cold_sequential_read_uses_span_sized_gets(mounted):
    size = 96 * MIB
    path = mounted.mountpoint / "big"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size // MIB):
            block = hashlib.sha256(b"%d" % i).digest() * (MIB // 32)
            digest.update(block)
            f.write(block)
    mounted.remount()
    before = gets(mounted)
    got = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(MIB):
            got.update(block)
    assert got.hexdigest() == digest.hexdigest()
    # 2 MiB groups, readahead topped up 16 MiB at a time: about 96 / 16 GETs plus the first
    # reads before the window has grown. Sliding the window by each read took one GET per group
    # (48 here).
    used = gets(mounted) - before
    assert used <= 16, used


def test_random_reads_after_a_sequential_run_read_the_right_bytes(mounted):
    size = 40 * MIB
    path = mounted.mountpoint / "mixed"
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(size // 32))
    path.write_bytes(data)
    mounted.remount()
    with open(path, "rb", buffering=0) as f:
        assert f.read(5 * MIB) == data[: 5 * MIB]  # the window grows
        for offset in (33 * MIB + 17, 3 * MIB - 5, 39 * MIB, 12 * MIB + 4096):
            f.seek(offset)
            assert f.read(70000) == data[offset : offset + 70000]
        f.seek(20 * MIB)
        assert f.read() == data[20 * MIB :]  # sequential again, to the end
