"""The C allocator in the mount process: glibc's arenas and giving freed memory back.

Only glibc is tuned; elsewhere every call here does nothing.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

TRIM_INTERVAL = 1.0  # seconds: at most one trim this often

_M_ARENA_MAX = -8

_libc: Any = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False  # not glibc: nothing to tune
    return _libc


def limit_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena; with a dozen worker threads
    moving multi-MiB buffers, freed memory stays spread over them and RSS creeps up. Two
    arenas keep the mount's footprint close to what it actually holds."""
    libc = _glibc()
    if libc:
        libc.mallopt(_M_ARENA_MAX, 2)


class Trimmer:
    """Gives the heap's free memory back to the system after a transfer ends.

    A large read or write frees its multi-MiB buffers into glibc's heap, which keeps them for
    the next ones (reused pages cost no faults, so transfers stay cheap) but rarely returns
    them: a 1 GiB read left the mount at about 250 MiB, and a copy right after it peaked at
    330. Trimming when a file is closed returns them between transfers. Not only once the
    last open file is closed: the kernel sends the release of a file after close() has
    returned, so the next program's open often comes first. It runs on a thread of its own
    (it walks the heap) and at most once per TRIM_INTERVAL, which bounds what it can cost a
    transfer that is still going on (the pages it returns are faulted in again)."""

    def __init__(self) -> None:
        self._last = 0.0
        self.trims = 0

    def soon(self) -> None:
        libc = _glibc()
        now = time.monotonic()
        if not libc or now - self._last < TRIM_INTERVAL:
            return
        self._last = now
        self.trims += 1
        trim = threading.Thread(target=libc.malloc_trim, args=(0,), name="trim", daemon=True)
        trim.start()
