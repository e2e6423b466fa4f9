"""A file replaced by a rename on the same mount stays what its open descriptors see.

This is how rsync, `sed -i`, `perl -pi` and editors' atomic saves replace a file: write a
temporary file, rename it over the old name. On a local disk the old file lives on, nameless,
for whoever still has it open; here too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

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


def test_cat_while_a_shell_rewrites_the_file_never_reads_zeros(mounted):
    """`cat f` in a loop while `echo ... > f` runs in another loop on the same mount: every
    read is a version the shell wrote, or empty (the truncated file), never zeros. The kernel
    zero-fills the rest of a page that a read answered short, and takes the truncated size
    only after the mount answered the truncation (vfs/pages.py)."""
    path = mounted.mountpoint / "f.txt"
    path.write_bytes(b"version 0\n")
    written = {b"", b"version 0\n"}
    done = threading.Event()
    seen: list[bytes] = []

    def shell() -> None:
        for i in range(1, 600):
            data = f"version {i}\n".encode()
            written.add(data)
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            fd2 = os.dup(fd)
            os.close(fd)  # the shell's flush of the empty file
            os.write(fd2, data)
            os.close(fd2)
        done.set()

    def cat() -> None:
        while not done.is_set():
            seen.append(path.read_bytes())  # through the kernel's page cache

    threads = [threading.Thread(target=shell), threading.Thread(target=cat)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(seen) > 100
    assert [s for s in seen if s not in written] == []
    assert path.read_bytes() == b"version 599\n"


def test_a_rewrite_through_the_page_cache_after_a_short_read_does_not_hang(mounted):
    """A read-write rewrite (`open(O_RDWR | O_TRUNC)`, as editors and sqlite do) reads to
    the end of the file, then writes into a page not loaded yet. Such a write goes through
    the kernel's page cache, which can keep that page locked until the mount answers the
    write: the mount must not wait for the kernel to drop that file's pages meanwhile."""
    path = mounted.mountpoint / "rw.bin"
    path.write_bytes(b"o" * 20_000)
    code = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_TRUNC)\n"
        "os.pwrite(fd, b'a' * 5000, 0)\n"
        "assert os.pread(fd, 8192, 0) == b'a' * 5000\n"  # short: the end of the file
        "os.pwrite(fd, b'x', 9000)\n"
        "os.close(fd)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert path.read_bytes() == b"a" * 5000 + b"\0" * 4000 + b"x"
