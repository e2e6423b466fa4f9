"""A file replaced by a rename on the same mount stays what its open descriptors see.

This is how rsync, `sed -i`, `perl -pi` and editors' atomic saves replace a file: write a
temporary file, rename it over the old name. On a local disk the old file lives on, nameless,
for whoever still has it open; here too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

MIB = 1024 * 1024


def _pattern(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * (MIB // 32)
    return (block * (size // len(block) + 1))[:size]


def test_a_reader_keeps_reading_the_file_a_rename_replaced(mounted):
    m = mounted.mountpoint
    old = _pattern(64 * MIB, b"old")
    (m / "big.bin").write_bytes(old)
    mounted.remount()  # cold: nothing of it cached, the reader fetches from S3 as it goes
    with open(m / "big.bin", "rb", buffering=0) as reader:
        head = reader.read(MIB)
        (m / "big.bin.tmp").write_bytes(b"the new version\n")
        os.rename(m / "big.bin.tmp", m / "big.bin")
        rest = b""
        while chunk := reader.read(4 * MIB):
            rest += chunk
        assert head + rest == old
        assert os.fstat(reader.fileno()).st_size == len(old)
    assert (m / "big.bin").read_bytes() == b"the new version\n"
    mounted.remount()
    assert (m / "big.bin").read_bytes() == b"the new version\n"
    assert sorted(os.listdir(m)) == ["big.bin"]


def test_an_appending_writer_keeps_writing_to_the_file_a_rename_replaced(mounted):
    m = mounted.mountpoint
    (m / "log").write_bytes(b"line 1\n")
    mounted.remount()
    fd = os.open(m / "log", os.O_WRONLY | os.O_APPEND)
    try:
        (m / "log.new").write_bytes(b"rotated\n")
        os.rename(m / "log.new", m / "log")
        assert os.write(fd, b"line 2\n") == 7  # to the old, nameless file, as on ext4
        assert os.fstat(fd).st_size == 14
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (m / "log").read_bytes() == b"rotated\n"
    mounted.remount()
    assert (m / "log").read_bytes() == b"rotated\n"
    assert sorted(os.listdir(m)) == ["log"]


def test_sed_in_place_while_a_reader_holds_the_file(mounted):
    m = mounted.mountpoint
    lines = b"".join(b"alpha %d\n" % i for i in range(200_000))
    (m / "text").write_bytes(lines)
    mounted.remount()
    with open(m / "text", "rb", buffering=0) as reader:
        first = reader.read(4096)
        subprocess.run(["sed", "-i", "s/alpha/beta/", str(m / "text")], check=True)
        assert first + reader.read() == lines
    assert (m / "text").read_bytes() == lines.replace(b"alpha", b"beta")
