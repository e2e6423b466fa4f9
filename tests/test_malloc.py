"""s3cryptfs/malloc.py: freed transfer buffers go back to the system, at most once a second."""

from __future__ import annotations

import ctypes
import platform
import threading

import pytest

from s3cryptfs import malloc

glibc = platform.libc_ver()[0] == "glibc"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


@pytest.mark.skipif(not glibc, reason="glibc only: elsewhere the module does nothing")
def test_a_trim_returns_freed_heap_memory_and_is_rate_limited(monkeypatch):
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 64 * 1024 * 1024)  # M_MMAP_THRESHOLD: these come from the heap
    blocks, pins = [], []
    for _ in range(64):
        blocks.append(libc.malloc(1024 * 1024))
        ctypes.memset(blocks[-1], 1, 1024 * 1024)  # touched: resident
        pins.append(libc.malloc(4096))  # kept: each freed block is a hole, not the heap's top
    before = _rss()
    for b in blocks:
        libc.free(b)
    trimmer = malloc.Trimmer()
    trimmer.soon()
    trimmer.soon()  # within the interval: not again
    assert trimmer.trims == 1
    for t in threading.enumerate():
        if t.name == "trim":
            t.join(5)
    assert _rss() < before - 32 * 1024 * 1024
    for p in pins:
        libc.free(p)
    monkeypatch.setattr(malloc, "TRIM_INTERVAL", 0.0)
    trimmer.soon()
    assert trimmer.trims == 2
