"""The state of one file being written: its write-back file and its sealed local version.

A file with local content has one FileWrite. It owns the plaintext write-back file
(``Staging``, 0600 in a 0700 directory), the streamed multipart upload of a file written
sequentially (stream.py), the newest sealed version in the journal not yet in S3 (``local``,
an Entry of journal.py) and the ``Version`` readers use for it. Its write-back file is in one
of the ``Staged`` states; every change of state goes through ``FileWrite._to``, which refuses a
transition that is not in ``TRANSITIONS``. files.py drives the transitions.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from s3cryptfs.cache.reader import Version
from s3cryptfs.format import metadata as md
from s3cryptfs.upload.journal import Entry
from s3cryptfs.upload.stream import Stream


class Staged(enum.Enum):
    """The write-back file of a file."""

    NONE = "none"  # no write-back file: the content is the sealed or the remote version
    CLEAN = "clean"  # a write-back file equal to the newest sealed (or remote) version
    DIRTY = "dirty"  # changes not sealed yet: open for writing, or closing
    CLOSED = "closed"  # closed, but could not be sealed: a durable marker; retried


TRANSITIONS: dict[Staged, set[Staged]] = {
    Staged.NONE: {Staged.CLEAN, Staged.DIRTY},  # materialized / created or truncated
    Staged.CLEAN: {Staged.DIRTY, Staged.NONE},  # written / released once idle
    Staged.DIRTY: {Staged.CLEAN, Staged.CLOSED, Staged.NONE},  # sealed / kept / discarded
    Staged.CLOSED: {Staged.CLEAN, Staged.NONE},  # sealed after all / deleted by its user
}


@dataclass(eq=False)
class Staging:
    """Plaintext write-back file of a file (0600, in a 0700 directory)."""

    path: str
    fd: int
    # After a streamed commit, plaintext [0, cut) is not in the file (stream.py cut it
    # out); cut_read(offset, size) reads it from the committed version until it is put back.
    cut: int = 0
    cut_read: Callable[[int, int], Awaitable[bytes]] | None = None
    # Reads in worker threads (WritePath.read) that still use fd: a file let go meanwhile
    # (released once idle, or discarded) is closed after the last of them, never under one,
    # whose pread would fail with EBADF or read whatever file got the descriptor number.
    readers: int = 0
    closing: bool = False

    def close(self) -> None:
        if self.readers:
            self.closing = True
            return
        try:
            os.close(self.fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1
            if self.closing and not self.readers:
                self.closing = False
                self.close()


@dataclass(eq=False, slots=True)  # every known file has one, most of them idle
class FileWrite:
    """What one file holds locally, and the state of its write-back file."""

    staging: Staging | None = None
    state: Staged = Staged.NONE
    writes: int = 0  # raised by every change of the write-back file (see WritePath.commit)
    local: Entry | None = None  # newest sealed version not yet in S3
    local_version: Version | None = None
    # A streamed upload of the version being written (stream.py), and whether one may start
    # (not after one was dropped, until the next commit).
    stream: Stream | None = None
    stream_ok: bool = True
    # unlinked while open: the write-back file is the only copy left for its readers
    keep: bool = False
    why: str | None = None  # CLOSED: why it could not be sealed
    # A version lost to another writer while the file was still being written: what its
    # writers close next goes to the same conflict copy (base "follow"), not over the winner,
    # until nobody writes the file and all of it is in S3 (WritePath.end_divergence).
    diverted: Entry | None = None

    def _to(self, new: Staged) -> None:
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise AssertionError(f"write-back file: no transition {self.state} -> {new}")
        self.state = new

    @property
    def unsealed(self) -> bool:
        """Changes in the write-back file that are in no sealed version."""
        return self.state in (Staged.DIRTY, Staged.CLOSED)

    @property
    def busy(self) -> bool:
        """Anything here that S3 does not have yet."""
        return self.unsealed or self.local is not None

    def attach(self, staging: Staging, dirty: bool) -> None:
        self.staging = staging
        self._to(Staged.DIRTY if dirty else Staged.CLEAN)

    def dirtied(self) -> None:
        self.writes += 1
        if self.state is not Staged.CLOSED:  # stays closed until a seal works
            self._to(Staged.DIRTY)

    def detach(self) -> None:
        if self.staging is not None:
            self.staging.close()
        self.staging = None
        self._to(Staged.NONE)


class Written(Protocol):
    """What the write path needs of a file (vfs/nodes.py Node is one)."""

    path: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int | None
    xattrs: dict[bytes, bytes] | None  # None: those of its current version, not read yet
    writers: int
    unlinked: bool

    @property
    def w(self) -> FileWrite: ...

    @property
    def lock(self) -> trio.Lock: ...

    @property
    def remote_etag(self) -> str | None: ...


def trouble_kind(why: str) -> str:
    """What kind of trouble keeps a closed file from being sealed (for umount's report)."""
    name = why.split(":", 1)[0]
    if name in ("ProviderUnavailable", "KeyAccessDenied", "KeyNotFound", "KeyRetired"):
        return "key manager"
    if name in ("UnknownProvider", "InvalidEnvelope", "UnwrapFailed", "KeyManagerError"):
        return "key manager"
    if name in ("ConfigError", "VolumeError", "DescriptorAuthError"):
        return "volume"
    return "local"


def posix_attrs(f: Written) -> md.PosixAttrs:
    return md.PosixAttrs(f.mode, f.uid, f.gid, f.mtime_ns, atime_ns=f.atime_ns)


class NameChanges:
    """Files being renamed or deleted. A commit takes the file's key when it begins: one
    begun while the name changes would seal its version under the old name, to be uploaded
    there after the rename or the delete removed it (the file back). So a commit under way
    ends before the name changes, and none begins until it has; the changing task's own
    commits (a rename seals what was written first) go through."""

    def __init__(self) -> None:
        self._by_file: dict[object, tuple[trio.Event, object]] = {}

    @contextlib.asynccontextmanager
    async def changing(self, f: object, lock: trio.Lock) -> AsyncIterator[None]:
        done = trio.Event()
        while f in self._by_file:  # (the kernel holds the name's lock: not in practice)
            await self._by_file[f][0].wait()
        self._by_file[f] = (done, trio.lowlevel.current_task())
        try:
            async with lock:  # (a commit holds the file's lock from its start to its end)
                pass
            yield
        finally:
            del self._by_file[f]
            done.set()

    async def wait(self, f: object) -> None:
        while (held := self._by_file.get(f)) is not None:
            done, changer = held
            if changer is trio.lowlevel.current_task():
                return
            await done.wait()
