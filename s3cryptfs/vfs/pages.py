"""What the kernel's page cache keeps of a file this mount rewrites while it is read.

The kernel takes a read that comes back shorter than it asked for as the end of the file: it
zero-fills the rest of the page and keeps the page. A truncating rewrite on this mount (`cat f`
while `echo x > f` runs) makes such short reads, and the kernel can keep their zeros where
the new content goes:

- a read the mount answered from the truncated file while the reader still went by the old
  size (the truncating thread sets the new size only once the mount has answered it): for a
  moment after the truncation (TRUNCATED_FOR), such a read is answered from the version before
  it, which is what that old size describes, as long as the file is still as truncated;
- a read that a write or truncation overtook (it began before, and ends after), or that ends
  short of the size the file has by the time it is answered: answered again, with what the
  file holds now;
- a short read, or one answered from the version before, during the rewrite: the next direct
  write, or the last writer's close, drops the file's pages from the kernel. (Not a write
  through the page cache: it writes the page itself, and the kernel may hold that page locked
  until the write is answered, so dropping it then would wait forever.)

Only files truncated through one of their descriptors on this mount are tracked, until their
last writer closes; `tail -f` of a log written here pays nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from s3cryptfs.cache.reader import Reader, Version
from s3cryptfs.errors import S3CryptFSError
from s3cryptfs.vfs.nodes import Node

# A read answered again this many times at most: each try raced a write of the same file.
READ_TRIES = 3
# How long after a truncation a read may still come from a reader that went by the size
# before it. The kernel takes the new size as soon as the truncating open or ftruncate gets
# its answer; this is for a thread that has yet to be scheduled.
TRUNCATED_FOR = 1.0


async def _no_kernel(ino: int) -> None:
    """No kernel keeps pages of these files (the core driven directly, as tests do)."""


@dataclass(slots=True)
class _Before:
    version: Version  # what the file held before its truncation
    size: int  # its size once truncated: served only while it is still that
    until: float  # time.monotonic() deadline


class KernelPages:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        # Drops the kernel's pages of an inode: set by the FUSE adapter.
        self.drop: Callable[[int], Awaitable[None]] = _no_kernel
        self._rewritten: set[Node] = set()  # truncated through a descriptor, writers open
        self._short: set[Node] = set()  # a read that may have left zeros, since the drop
        self._before: dict[Node, _Before] = {}

    def resized(self, node: Node, before: Version | None) -> None:
        """A descriptor of *node* changed its size (now node.size); *before*: what it held,
        when it shrank and that can be read again (not a write-back file)."""
        if not node.writers:
            return
        self._rewritten.add(node)
        self._before.pop(node, None)
        if before is not None:
            self._before[node] = _Before(before, node.size, time.monotonic() + TRUNCATED_FOR)

    async def read(
        self, node: Node, offset: int, size: int, answer: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """*answer*'s reply to the kernel's read of *node*, made safe for its page cache."""
        for _ in range(READ_TRIES):
            seen = self._mark(node)
            data = await answer()
            if len(data) >= size or not (
                self._mark(node) != seen or offset + len(data) < node.size
            ):
                break
        if len(data) < size and node in self._rewritten:
            self._short.add(node)  # (before the await below: a write meanwhile drops it)
            before = self._before.get(node)
            if before is not None and before.size == node.size:
                if time.monotonic() < before.until:
                    with contextlib.suppress(S3CryptFSError):  # (gone: what it holds now)
                        older = await self.reader.read(before.version, offset, size)
                        data = older if len(older) > len(data) else data
                else:
                    del self._before[node]
        return data

    @staticmethod
    def _mark(node: Node) -> tuple[int, int]:
        # Every write and truncation here sets the mtime; a size change found in S3 shows too.
        return node.mtime_ns, node.size

    async def written(self, node: Node, direct: bool) -> None:
        """*node* was written through one of its descriptors (*direct*: with direct I/O)."""
        self._before.pop(node, None)
        if direct and node in self._short:
            self._short.discard(node)
            await self.drop(node.ino)

    async def closed(self, node: Node) -> None:
        """A writer of *node* let it go."""
        if node.writers or node not in self._rewritten:
            return
        self._rewritten.discard(node)
        self._before.pop(node, None)
        if node in self._short:
            self._short.discard(node)
            await self.drop(node.ino)  # (a release holds no page: the kernel does not wait)
