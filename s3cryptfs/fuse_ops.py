"""The thin pyfuse3 adapter: translate requests to the core, and errors to errnos.

pyfuse3 only survives FUSEError; any other exception ends pyfuse3.main() and takes the mount
down. So every handler converts at this boundary, through errors.to_errno, and nowhere else:
the handlers here refuse with the named kinds of errors.FsError too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from s3cryptfs.asyncutil import run_abandonable
from s3cryptfs.errors import (
    Busy,
    InvalidRequest,
    NoAttribute,
    NotAllowed,
    NotDirectory,
    NotSupported,
    is_expected,
    to_errno,
)
from s3cryptfs.fuse_drop import EntryDropper, Names
from s3cryptfs.vfs.core import Attr, Filesystem
from s3cryptfs.vfs.names import from_kernel, to_kernel
from s3cryptfs.vfs.nodes import Node
from s3cryptfs.vfs.status import usage

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

XATTR_STATE = b"user.s3cryptfs.state"
XATTR_PID = b"user.s3cryptfs.pid"
# Root and the user who mounted only (others get EACCES): stats plus key manager health.
XATTR_STATUS = b"user.s3cryptfs.status"
# Root and the user who mounted only: request counters as JSON (for scripts, tests).
XATTR_STATS = b"user.s3cryptfs.stats"
# The unmount protocol of `s3cryptfs umount` (root and the mount's owner only): set DRAIN to
# the seconds uploads may stall; it returns once everything is in S3, or fails with EBUSY and
# PENDING lists what is not. Setting STOP ("force") stops the mount whatever is left.
XATTR_DRAIN = b"user.s3cryptfs.drain"
XATTR_PENDING = b"user.s3cryptfs.pending"
XATTR_STOP = b"user.s3cryptfs.stop"
# Those names are the mount's control protocol, answered here and never stored: listxattr
# does not show them (cp -a, tar --xattrs and rsync -X would copy them onto other files), and
# no other name under this prefix can be set or removed (ENOTSUP: copy tools pass over it).
XATTR_CONTROL = b"user.s3cryptfs."
ATTR_TIMEOUT = 1.0
# df: "used" is what the mount knows the volume holds (vfs/status.py, usage), summed at each
# statfs unless that took USAGE_SLOW, then at most every USAGE_TTL; "free" is a fixed figure,
# S3 having no size (docs/SEMANTICS.md).
USAGE_SLOW = 0.02
USAGE_TTL = 2.0
STATFS_BLOCK = 65536
STATFS_FREE = 2**50
# Key manager health is asked for at most this often, however often status is read: each
# check is a request to every KMS.
HEALTH_TTL = 10.0


# Requests whose replies make kernel inodes (fuse_drop.py sends its names between them), and
# those that hold their directory's lock in the kernel (an invalidation sent meanwhile would
# wait for the reply that the loop, waiting for the invalidation, cannot send).
MAKES_INODES = frozenset(
    {"lookup", "readdir", "mkdir", "symlink", "link", "mknod", "create"}
    | {"unlink", "rmdir", "rename"}
)


def _guard(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    name = fn.__name__
    makes_inodes = name in MAKES_INODES

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        ops = cast(FuseOperations, args[0])
        ops.requests[name] += 1
        try:
            if makes_inodes:
                with ops.dropper.request():
                    return await fn(*args, **kwargs)
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # the one place errors become errnos
            err = to_errno(exc)
            if is_expected(exc):
                log.debug("%s: %s", fn.__name__, exc)
            elif err == errno.EIO:
                log.error("%s failed: %s", fn.__name__, exc, exc_info=not _ours(exc))
            else:
                log.info("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(err) from None

    return wrapper


def _control_allowed(ctx: Any) -> None:
    """Only root and whoever runs the mount may drain it, stop it or see what is pending."""
    if ctx.uid not in (0, os.getuid()):
        raise NotAllowed()


def _ours(exc: BaseException) -> bool:
    from s3cryptfs.errors import S3CryptFSError

    return isinstance(exc, S3CryptFSError)


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = e.attr_timeout = max(ATTR_TIMEOUT, attr.ttl)
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = attr.rdev
    e.st_size = attr.size
    e.st_blksize = 1024 * 1024
    e.st_blocks = (attr.size + 511) // 512
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


async def _drop_pages(inode: int) -> None:
    """Drop the kernel's pages of *inode* (vfs/pages.py says when). From a thread, and
    awaited there: the kernel locks each page it drops, and a page being read stays locked
    until this loop answers that read. (Never while answering a write through the page
    cache: its page can stay locked until that answer.)"""

    def drop() -> None:
        with contextlib.suppress(OSError):  # (no such inode in the kernel any more)
            pyfuse3.invalidate_inode(inode, attr_only=False)

    await run_abandonable(drop)


def _write_only(flags: int) -> bool:
    # Such handles get direct I/O: the kernel passes the writer's pages straight to us instead
    # of copying them into its page cache first, a copy per byte that large copies feel. They
    # cannot be mmapped, and the kernel invalidates what readers cached when they write.
    return flags & os.O_ACCMODE == os.O_WRONLY


@dataclasses.dataclass
class _DirHandle:
    inode: int
    entries: list[tuple[str, Node]] | None = None
    # The listing is taken by a task of its own that appends to *entries* as LIST pages
    # come in (vfs/listing.py stream); readdir answers with what is there and waits for more.
    done: bool = True
    error: Exception | None = None
    more: trio.Event = dataclasses.field(default_factory=trio.Event)
    scope: trio.CancelScope | None = None

    def notify(self) -> None:
        more, self.more = self.more, trio.Event()
        more.set()


class FuseOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_fh = 1
        self._health: tuple[float, dict[str, str]] | None = None  # (when, result)
        self._health_lock = trio.Lock()
        self._usage: tuple[float, tuple[int, int]] | None = None  # (reuse until, result)
        self.requests: Counter[str] = Counter()  # kernel requests by kind, for the stats
        self.dropper = EntryDropper(self._names_to_drop)
        self._to_drop: list[Node] = []  # chosen by sweeps, not sent to the kernel yet
        fs.pages.drop = _drop_pages

    def _reply(self, node: Node) -> pyfuse3.EntryAttributes:
        node = self.fs.nodes.held(node)
        self._trim_if_over(node)
        return _entry(self.fs.attr(node))

    def _trim_if_over(self, keep: Node | None = None) -> None:
        """Ask the kernel to drop the files NodeTable picks when it is over --max-inodes; the
        kernel's FORGETs free them. The names go out later, between requests and off this
        loop (fuse_drop.py): never while this reply is in flight."""
        if not self.fs.nodes.over_limit():
            return
        self._to_drop += self.fs.nodes.to_forget(keep)
        if self._to_drop:
            self.dropper.wake(self.fs.reader.nursery)

    def _names_to_drop(self) -> Names:
        names: Names = []
        seen: set[int] = set()
        for node in self._to_drop:
            if node.ino in seen:
                # Looked up after one sweep chose it, then chosen again by the next before
                # its name went out: one name, one drop.
                self.fs.nodes.asked -= 1
                continue
            seen.add(node.ino)
            parent = self.fs.nodes.at(node.parent_path)
            if parent is None or not self.fs.nodes.is_asked(node):
                self.fs.nodes.withdraw(node)  # used, moved or freed since its sweep
                continue
            names.append((parent.ino, to_kernel(node.name)))
        self._to_drop = []
        return names

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._reply(await self.fs.lookup(parent_inode, from_kernel(name)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        try:
            self.fs.forget(inode_list)
        except Exception:  # forget cannot report errors
            log.exception("forget failed")

    @_guard
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return _entry(await self.fs.getattr(inode))

    @_guard
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        atime = attr.st_atime_ns if fields.update_atime else None
        result = await self.fs.setattr(
            inode,
            fh,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=mtime,
            atime_ns=atime,
        )
        return _entry(result)

    @_guard
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    @_guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.fs.node(inode)
        if not node.is_dir:
            raise NotDirectory()
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _DirHandle(inode)
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs[fh]
        # One listing per pass over the directory: the kernel asks again for every buffer
        # full of entries, and rebuilding the listing each time is quadratic in its size.
        if handle.entries is None or start_id == 0:
            await self._list(handle)
        while True:
            listing = handle.entries
            assert listing is not None
            sent = False
            for index in range(start_id, len(listing)):
                name, listed = listing[index]
                node = listed if index < 2 else self.fs.nodes.current(listed)
                if node is None:
                    continue  # removed since the listing was taken
                attrs = _entry(self.fs.attr(node))
                if not pyfuse3.readdir_reply(token, to_kernel(name), attrs, index + 1):
                    self._trim_if_over()
                    return
                sent = True
                if index >= 2:
                    self.fs.nodes.held(node)  # (the node current() just gave)
            self._trim_if_over()
            if handle.error is not None:
                error, handle.error = handle.error, None
                raise error
            # Nothing more to send now: the kernel asks again for the next entries, and an
            # answer without any means the end of the directory.
            if sent or handle.done:
                return
            start_id = len(listing)
            await handle.more.wait()

    async def _list(self, handle: _DirHandle) -> None:
        """Start taking the directory's listing for *handle* (entries arrive page by page)."""
        if handle.scope is not None:
            handle.scope.cancel()
        directory = self.fs.node(handle.inode)
        parent = self.fs.nodes.at(directory.parent_path) or directory
        # "." and ".." come first; the kernel does not count lookups for them.
        entries: list[tuple[str, Node]] = [(".", directory), ("..", parent)]
        handle.entries, handle.done, handle.error = entries, False, None
        nursery = self.fs.reader.nursery
        if nursery is None:  # (not serving yet)
            entries += await self.fs.readdir(handle.inode)
            handle.done = True
            return
        scope = handle.scope = trio.CancelScope()

        def emit(batch: list[tuple[str, Node]]) -> None:
            entries.extend(batch)
            handle.notify()

        async def produce() -> None:
            with scope:
                try:
                    await self.fs.readdir_stream(handle.inode, emit)
                except Exception as exc:  # noqa: BLE001 - answered by the waiting readdir
                    if handle.entries is entries:
                        handle.error = exc
                finally:
                    if handle.entries is entries:
                        handle.done = True
                        handle.notify()

        nursery.start_soon(produce)

    async def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh, None)
        if handle is not None and handle.scope is not None:
            handle.scope.cancel()  # a reader that stopped early (`ls | head`)

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        node = await self.fs.mkdir(parent_inode, from_kernel(name), mode, ctx.uid, ctx.gid)
        return self._reply(node)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, from_kernel(name))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, from_kernel(name))

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        node = await self.fs.symlink(parent_inode, from_kernel(name), target, ctx.uid, ctx.gid)
        return self._reply(node)

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(
            parent_inode_old,
            from_kernel(name_old),
            parent_inode_new,
            from_kernel(name_new),
            flags,
        )

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return self._reply(await self.fs.link(inode, new_parent_inode, from_kernel(new_name)))

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        node = await self.fs.mknod(parent_inode, from_kernel(name), mode, rdev, ctx.uid, ctx.gid)
        return self._reply(node)

    @_guard
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        handle, keep = await self.fs.open(inode, flags)
        handle.privileged = ctx.uid == 0
        handle.direct = _write_only(flags)
        if not keep:
            # Close-to-open: the object changed (another machine wrote it). keep_cache off
            # drops the kernel's pages; its size may be cached too (a getattr just before the
            # open answered from our old view), so its attributes go as well, or reads would
            # stop at the old size. Attributes only: that locks no page, safe in here.
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep, direct_io=handle.direct)

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        handle = await self.fs.create(
            parent_inode, from_kernel(name), mode, ctx.uid, ctx.gid, flags
        )
        handle.privileged = ctx.uid == 0
        handle.direct = _write_only(flags)
        info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=handle.keep_cache, direct_io=handle.direct)
        return info, self._reply(handle.node)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    async def release(self, fh: int) -> None:
        try:
            await self.fs.release(fh)
        except Exception:  # release cannot report errors to anyone
            log.exception("release failed")

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsyncdir()

    @_guard
    async def statfs(self, ctx: Any) -> Any:
        now = time.monotonic()
        if self._usage is None or now >= self._usage[0]:
            self._usage = (now, usage(self.fs))
            took = time.monotonic() - now
            if took >= USAGE_SLOW:  # a large volume: a program calling statfs in a loop
                self._usage = (now + USAGE_TTL, self._usage[1])  # must not cost a scan each
        used, files = self._usage[1]
        s = pyfuse3.StatvfsData()
        s.f_bsize = STATFS_BLOCK
        s.f_frsize = STATFS_BLOCK
        s.f_bfree = s.f_bavail = STATFS_FREE // STATFS_BLOCK
        s.f_blocks = s.f_bfree + -(-used // STATFS_BLOCK)
        s.f_ffree = s.f_favail = 2**32
        s.f_files = s.f_ffree + files
        s.f_namemax = 255
        return s

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if not name.startswith(b"user."):
            # security.*, system.posix_acl_*, trusted.*: not supported here, and saying so
            # (rather than "no such attribute") lets `ls -l` stop asking for every file: it
            # remembers per device that contexts and ACLs are unsupported.
            raise NotSupported()
        if not name.startswith(XATTR_CONTROL):
            return await self.fs.xattrs.getxattr(inode, name)
        node = self.fs.node(inode)
        if name == XATTR_STATE and not node.is_dir:
            return self.fs.state_of(node).encode()
        if name == XATTR_PID and inode == pyfuse3.ROOT_INODE:
            return str(os.getpid()).encode()
        if name == XATTR_PENDING and inode == pyfuse3.ROOT_INODE:
            _control_allowed(ctx)
            pending = [
                {"key": key, "kind": kind, "why": why} for key, kind, why in self.fs.not_in_s3()
            ]
            return json.dumps(pending, sort_keys=True).encode()
        if name in (XATTR_STATS, XATTR_STATUS) and inode == pyfuse3.ROOT_INODE:
            # What the mount does and which key managers fail is for its owner (and root),
            # not for every user --allow-other lets in.
            _control_allowed(ctx)
            status = self.fs.stats()
            # Requests by kind; sweeps of --max-inodes the loop stopped waiting for.
            status["kernel"] = {"requests": dict(self.requests), "drop_stalls": self.dropper.stalls}
            if name == XATTR_STATUS:
                status["key_managers"] = await self._key_health()
            return json.dumps(status, sort_keys=True).encode()
        raise NoAttribute()

    async def _key_health(self) -> dict[str, str]:
        async with self._health_lock:  # readers at the same time share one round of checks
            now = time.monotonic()
            if self._health is None or now - self._health[0] >= HEALTH_TTL:
                # Bounded by the managers' own timeouts (one that does not answer is reported).
                health = await trio.to_thread.run_sync(self.fs.key_health)
                self._health = (time.monotonic(), health)
            return self._health[1]

    @_guard
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.fs.xattrs.listxattr(inode)

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if inode == pyfuse3.ROOT_INODE and name in (XATTR_DRAIN, XATTR_STOP):
            _control_allowed(ctx)
            if name == XATTR_STOP:
                self.fs.stop_requested.set()
                return
            try:
                stall = float(value.decode() or "60")
            except ValueError:
                raise InvalidRequest() from None
            if await self.fs.drain(stall):
                raise Busy()
            return
        await self.fs.xattrs.setxattr(inode, name, value)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.xattrs.removexattr(inode, name)
