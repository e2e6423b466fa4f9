"""What the kernel's page cache keeps of a file this mount rewrites while it is read.

The kernel takes a read that comes back shorter than it asked for as the end of the file: it
zero-fills the rest of the page and keeps the page. When the reply was short because a
rewrite on this mount had just truncated the file (`cat f` while `echo x > f` runs), and the
new content then arrives by direct I/O (which bypasses that page), the page shows zeros where
the new content is. Two cases, by when the read was answered:

- during a write or truncation of the file (the read began before it, and ends after), or
  short of the size the file has once it is answered (another version found meanwhile): the
  read is answered again, with what the file holds now (Filesystem.read);
- after the truncation: the kernel may not have taken the new size yet when the reader
  copies the page (the truncating thread sets it once the mount has answered it), so a read
  that would come back short while the rewrite has written nothing is answered with the
  version before the truncation, which is what the kernel's size still describes;
- before the write that follows: that write drops the file's pages from the kernel.

Only files with a writer on this mount are tracked; a short read at the end of a file nobody
writes here is the end of the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from s3cryptfs.cache.reader import Reader, Version
from s3cryptfs.errors import S3CryptFSError
from s3cryptfs.vfs.nodes import Node

# A read answered again this many times at most: each try raced a write of the same file.
READ_TRIES = 3


async def _no_kernel(ino: int) -> None:
    """No kernel keeps pages of these files (the core driven directly, as tests do)."""


class KernelPages:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        # Drops the kernel's pages of an inode: set by the FUSE adapter.
        self.drop: Callable[[int], Awaitable[None]] = _no_kernel
        self._changes: dict[Node, int] = {}  # writes and truncations, while written here
        self._short: set[Node] = set()  # read short since the last write
        # Files truncated by a rewrite that has written nothing since: the version before.
        self._before: dict[Node, Version] = {}

    def truncating(self, node: Node, version: Version | None) -> None:
        """A descriptor of *node* truncates it; *version*: what it held (None: nothing
        that can be read again, such as a write-back file)."""
        if version is not None and node.writers:
            self._before[node] = version

    async def read(
        self, node: Node, offset: int, size: int, answer: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """*answer*'s reply to the kernel's read of *node*, made safe for its page cache."""
        for _ in range(READ_TRIES):
            seen = self.seen(node)
            data = await answer()
            # One that a write or truncation here overtook, or that ends before the size the
            # file has now (a new version found meanwhile): what the file holds now.
            if len(data) >= size or not (
                self.raced(node, seen) or offset + len(data) < node.size
            ):
                break
        before = self._before.get(node)
        if len(data) < size and before is not None:
            with contextlib.suppress(S3CryptFSError):  # (gone: what the file holds now)
                older = await self.reader.read(before, offset, size)
                data = older if len(older) > len(data) else data
        self.answered(node, len(data) < size or before is not None)
        return data

    def seen(self, node: Node) -> int | None:
        """A mark to give raced() once the read it starts is answered."""
        return self._changes.get(node)

    def raced(self, node: Node, seen: int | None) -> bool:
        """Whether *node* was written or truncated here since *seen*."""
        return self._changes.get(node) != seen

    def answered(self, node: Node, short: bool) -> None:
        """A read of *node* was answered: *short*, or from the version before."""
        if short and node.writers:
            self._short.add(node)

    async def changed(self, node: Node, written: bool) -> None:
        """*node* was written (*written*) or truncated through one of its descriptors."""
        if not node.writers:
            return
        self._changes[node] = self._changes.get(node, 0) + 1
        if written:
            self._before.pop(node, None)
        if node in self._short:
            self._short.discard(node)
            await self.drop(node.ino)

    def closed(self, node: Node) -> None:
        """A writer of *node* let it go."""
        if not node.writers:
            self._short.discard(node)
            self._changes.pop(node, None)
            self._before.pop(node, None)
