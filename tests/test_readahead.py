"""Sequential reads through the mount: readahead fetches the file in few, large range GETs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

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


def stats(vol) -> dict:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))


def test_cat_of_a_directory_reads_each_small_file_once(mounted):
    """`cat dir/*` on a fresh mount: one GET per file, fetched ahead of the opens when
    --file-cache-ttl lets an open use what was just fetched."""
    d = mounted.mountpoint / "many"
    d.mkdir()
    files = {f"f{i:04d}": os.urandom(3000 + i) for i in range(200)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    mounted.remount("--file-cache-ttl", "30")
    before = stats(mounted)
    out = subprocess.run(
        f"cat {d}/*", shell=True, check=True, capture_output=True, env={"LC_ALL": "C"}
    ).stdout
    assert out == b"".join(files[n] for n in sorted(files))
    after = stats(mounted)
    used = {
        op: n - before["requests"].get(op, 0) for op, n in after["requests"].items()
    }
    # 200 files: 200 GETs, plus the directory's LIST and index; no HEAD per file.
    assert 200 <= used.get("get", 0) <= 205, used
    assert used.get("head", 0) <= 2, used
    assert after["read_ahead"]["ahead_used"] >= 150, after["read_ahead"]


def test_opens_under_close_to_open_fetch_and_decrypt_on_the_event_loop(mounted):
    """Without --file-cache-ttl each open of a small file asks S3 (one GET, nothing fetched
    ahead); with the native client that GET is sent from the event loop and, the password
    manager wrapping locally, the body decrypted there: no worker thread per open."""
    d = mounted.mountpoint / "strict"
    d.mkdir()
    files = {f"f{i:03d}": os.urandom(2000 + i) for i in range(50)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    mounted.remount()
    before = stats(mounted)
    for name in sorted(files):
        assert (d / name).read_bytes() == files[name]
    after = stats(mounted)
    used = {op: n - before["requests"].get(op, 0) for op, n in after["requests"].items()}
    assert 50 <= used.get("get", 0) <= 52 and used.get("head", 0) <= 2, used
    ahead = after["read_ahead"]
    assert ahead["fetched_on_event_loop"] >= 45, ahead  # (a first one may have to connect)
    # (each but an open that finds a re-read of the descriptor due, which a thread makes)
    assert ahead["decrypted_on_event_loop"] >= ahead["fetched_on_event_loop"] - 2, ahead


def test_cold_random_small_read_fetches_only_its_chunk(mounted):
    size = 32 * MIB
    path = mounted.mountpoint / "rand"
    data = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(size // 32))
    path.write_bytes(data)
    mounted.remount()
    received = stats(mounted)["bytes"]["received"]
    offsets = (17 * MIB + 4096, 3 * MIB + 12288, 29 * MIB)
    with open(path, "rb", buffering=0) as f:
        for offset in offsets:
            f.seek(offset)
            assert f.read(4096) == data[offset : offset + 4096]
    moved = stats(mounted)["bytes"]["received"] - received
    # The kernel may ask for a little more than 4 KiB per read; a 2 MiB group per read would
    # move 6 MiB.
    assert moved < 1.5 * MIB, moved
