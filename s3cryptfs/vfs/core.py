"""The filesystem core: POSIX operations on inodes, in terms of the object store.

FUSE-free (the adapter in fuse_ops.py is a thin translation), so it is testable without a
kernel. It raises errors from s3cryptfs.errors; fuse_ops turns them into errnos.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from s3cryptfs import limits, malloc
from s3cryptfs.cache.blocks import BlockCache
from s3cryptfs.cache.disk import DiskCache
from s3cryptfs.cache.reader import Reader, Version
from s3cryptfs.codec import OWN, ObjectCodec, object_kind
from s3cryptfs.errors import (
    AlreadyExists,
    BadHandle,
    FileTooLarge,
    IntegrityError,
    IsDirectory,
    KeyManagerError,
    NoSuchEntry,
    NotPermitted,
    ReadOnlyMount,
    S3CryptFSError,
    StaleEntry,
    UploadConflict,
    strip_subject,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.format import xattrs as xa
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.store.base import ObjectInfo, ObjectStore
from s3cryptfs.upload import closed as closed_files
from s3cryptfs.upload.closed import ClosedRecord
from s3cryptfs.upload.files import WriteCallbacks, WritePath, WriteSettings
from s3cryptfs.vfs import names
from s3cryptfs.vfs.attrindex import AttrIndex, IndexEntry
from s3cryptfs.vfs.listing import Listings
from s3cryptfs.vfs.namespace import Namespace
from s3cryptfs.vfs.nodes import (
    ROOT_INODE,
    ChildInfo,
    Handle,
    Node,
    NodeTable,
    child_path,
    inherited_group,
    now_ns,
    shared_metadata,
)
from s3cryptfs.vfs.pages import KernelPages
from s3cryptfs.vfs.smallfiles import SmallFiles
from s3cryptfs.vfs.status import status_of
from s3cryptfs.vfs.versions import Versions
from s3cryptfs.vfs.xattrs import Xattrs, decoded

log = logging.getLogger(__name__)
T = TypeVar("T")


# Bits that hand out privileges (setuid, setgid) or decide who may delete in a directory
# (sticky): anyone who can write to the bucket can set them in object metadata, so modes read
# from S3 are shown without them unless the user trusts the bucket's attributes
# (docs/SEMANTICS.md). A directory's mode comes from its sealed index, which a bucket writer
# cannot forge: its sticky and set-group-ID bits are shown (a /tmp-like directory stays one
# after a remount, and a shared group directory keeps giving new entries its group).
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
DIR_BITS_SHOWN = stat.S_ISGID | stat.S_ISVTX


@dataclass
class FsOptions:
    # The mount fills these from the options of layer FS (s3cryptfs/options.py); the fields no
    # option sets are in options.FS_INTERNAL, with the reason.
    uid: int
    gid: int
    file_mode: int = 0o644
    dir_mode: int = 0o755
    dir_ttl: float = 5.0
    file_ttl: float = 0.0  # --file-cache-ttl (vfs/smallfiles.py)
    read_only: bool = False
    sync_close: bool = False
    memory_cache: int = 64 * 1024 * 1024
    journal_limit: int = 2 * 1024 * 1024 * 1024
    upload_concurrency: int = 16
    upload_delay: float = 1.0  # --upload-delay
    disk_cache: int = 0  # bytes of ciphertext kept on disk; 0: no disk cache
    io_threads: int = 16
    # Seal and send a large file while it is written sequentially (upload/stream.py).
    stream_uploads: bool = True
    # Upload journal bodies from a helper process (store/helper.py).
    upload_helper: bool = True
    # Show setuid, setgid and sticky bits of modes read from S3 (--trust-attributes).
    trust_attributes: bool = False
    # Bytes of a gateway single-AEAD body downloaded whole to decrypt it (--max-whole-object).
    max_whole_object: int = limits.WHOLE_OBJECT_DEFAULT
    hard_links: str = "refuse"  # or "copy" (--hard-links)
    max_inodes: int = 0  # --max-inodes; 0: no bound (NodeTable)
    # The server keeps a backslash in keys: names with one may be created (vfs/names.py; the
    # mount probes the server). False refuses them, and looks them up by listing only.
    backslash_names: bool = False


@dataclass
class Attr:
    """What getattr returns, FUSE-free."""

    ino: int
    mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    rdev: int = 0
    atime_ns: int = 0
    # How long the kernel may keep this name and these attributes without asking again
    # (0: the adapter's shortest; vfs/listing.py, kernel_ttl).
    ttl: float = 0.0


class Filesystem:
    def __init__(
        self, store: ObjectStore, codec: ObjectCodec, prefix: str, cache_dir: str, opts: FsOptions
    ) -> None:
        self.store = store
        self.codec = codec
        self.prefix = prefix
        self.opts = opts
        self.cache_dir = cache_dir
        self.limiter = trio.CapacityLimiter(opts.io_threads)
        self.blocks = BlockCache(opts.memory_cache)
        self.disk = (
            DiskCache(os.path.join(cache_dir, "ciphertext"), opts.disk_cache)
            if opts.disk_cache > 0
            else None
        )
        self.reader = Reader(self.blocks, self.limiter)
        self.versions = Versions(self)
        self.writes = WritePath(
            store,
            codec,
            self.reader,
            self.limiter,
            WriteSettings(
                prefix=prefix,
                cache_dir=cache_dir,
                journal_limit=opts.journal_limit,
                upload_concurrency=opts.upload_concurrency,
                upload_delay=opts.upload_delay,
                stream_uploads=opts.stream_uploads,
                upload_helper=opts.upload_helper,
                read_only=opts.read_only,
            ),
            WriteCallbacks(
                find=self._node_for_key,
                uploaded=self.versions.uploaded,
                conflicted=self.versions.conflicted,
                xattrs=lambda node: self.xattrs.for_new_version(node),
                attrs_moved=lambda node, xattrs: self.xattrs.persist(node, xattrs),
            ),
        )
        self.journal = self.writes.journal
        self.uploader = self.writes.uploader
        self.nodes = NodeTable(opts.max_inodes)
        now = now_ns()
        root = Node(ROOT_INODE, "", stat.S_IFDIR | opts.dir_mode, opts.uid, opts.gid, now, now)
        root.lookups = 1
        self.nodes.add(root)
        self.handles: dict[int, Handle] = {}
        self.trimmer = malloc.Trimmer()  # freed transfer buffers back to the system
        self._next_fh = 1
        self.unsynced: set[Node] = set()  # created here, not in S3 yet
        self.pages = KernelPages(self.reader)
        self._closed_at_start: list[tuple[str, ClosedRecord]] = []
        # Set by `s3cryptfs umount --force` (through fuse_ops): the mount stops at once.
        self.stop_requested = trio.Event()
        self.index = AttrIndex(store, codec, prefix, self._thread)
        self.namespace = Namespace(self)
        self.listing = Listings(self)
        self.xattrs = Xattrs(self)
        self.small = SmallFiles(self)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def closed_pending(self) -> dict[Any, str]:
        return self.writes.closed_pending

    def clear_staging(self) -> None:
        """Sort what an earlier mount left in the write-back area (before recover())."""
        self._closed_at_start = self.writes.sort_leftovers()

    async def recover(self) -> int:
        """Upload every version committed before a crash, and seal the files that were closed
        but not sealed yet. Returns how many versions there were."""
        entries = await trio.to_thread.run_sync(self.journal.load)
        for entry in entries:
            entry.recovered = True  # perhaps sent before the stop (Uploader._maybe_sent)
        sealed = {e.staging_name for e in entries if e.staging_name}
        adopted = []
        for path, record in self._closed_at_start:
            if os.path.basename(path) in sealed:
                # Sealed into the journal just before the stop; the marker was not yet gone.
                await trio.to_thread.run_sync(closed_files.remove, path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            adopted.append(self._adopt_closed(path, record))
        self._closed_at_start = []
        if not entries and not adopted:
            return 0
        if entries:
            log.info("recovering %d file version(s) from the journal", len(entries))
        if adopted:
            log.info("sealing %d file(s) closed before the mount stopped", len(adopted))
        return await self.writes.recover(adopted, entries)

    def _adopt_closed(self, path: str, record: ClosedRecord) -> Node:
        """A file an earlier mount closed but could not seal becomes a node again; its
        write-back file is sealed like any closed file."""
        node = Node(
            self.nodes.new_ino(),
            record.path,
            record.mode,
            record.uid,
            record.gid,
            record.mtime_ns,
            record.mtime_ns,
        )
        if record.xattrs is not None:
            with contextlib.suppress(ValueError, S3CryptFSError):
                node.xattrs = decoded(base64.b64decode(record.xattrs, validate=True))
        old = self.nodes.at(record.path)
        if old is not None:
            self.nodes.detach(old)
        self.nodes.add(node)
        kind, etag = record.base[0], record.base[1]
        if kind == "etag":
            node.remote = ChildInfo(False, 0, etag)
        else:
            # A new file, or one whose base is no longer known: if the name exists in S3 now,
            # the upload keeps both (a conflict copy), never overwrites.
            self.unsynced.add(node)
        self.writes.adopt(node, path)
        return node

    async def run_background(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.reader.run)
        await self.writes.run(nursery)
        if not self.opts.read_only:
            nursery.start_soon(self.index.run)

    def _files(self) -> list[Node]:
        return list(self.nodes.by_ino.values())

    async def commit_all(self) -> None:
        await self.writes.commit_all(self._files())

    async def drain(self, stall: float | None = None) -> list[tuple[str, str, str]]:
        """Seal every file and wait until every version is in S3 (see WritePath.drain), then
        write the directory indexes. Returns what is not in S3 yet."""
        left = await self.writes.drain(self._files, stall)
        if not left and not self.opts.read_only:
            await self.index.flush()
        return left

    def not_in_s3(self) -> list[tuple[str, str, str]]:
        return self.writes.not_in_s3()

    # --- keys and names ----------------------------------------------------------------

    def key(self, path: str) -> str:
        return self.prefix + path

    def dir_prefix(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def _check_name(self, parent: Node, name: str, is_dir: bool = False) -> None:
        """Refuse a name about to be created in *parent* (or renamed to) that the bucket cannot
        hold (vfs/names.py)."""
        if parent.path == "" and name == META_DIR:
            raise NotPermitted(f"{META_DIR} is reserved for the volume's metadata")
        key = self.key(child_path(parent.path, name))
        names.check_new(name, key, is_dir=is_dir, backslash=self.opts.backslash_names)

    def _writable(self) -> None:
        if self.opts.read_only:
            raise ReadOnlyMount()

    # --- nodes ---------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise NoSuchEntry(f"unknown inode {ino}")
        return node

    def _file_node(self, path: str, info: ObjectInfo | ChildInfo) -> Node:
        mtime = info.mtime_ns
        node = Node(
            self.nodes.new_ino(),
            path,
            stat.S_IFREG | self.opts.file_mode,
            self.opts.uid,
            self.opts.gid,
            mtime,
            mtime,
        )
        size = info.size
        # A listing's entry is shared, not copied: a wide directory holds one per file.
        node.remote = info if isinstance(info, ChildInfo) else ChildInfo(False, size, info.etag)
        meta = info.metadata if isinstance(info, ObjectInfo) else None
        node.size = self.codec.plain_size_or_none(size, meta) or 0
        if isinstance(info, ObjectInfo) and info.metadata is not None:
            self._apply_metadata(node, info.metadata)
        elif isinstance(info, ChildInfo) and info.attrs is not None:
            node.apply_attrs(info.attrs)
            node.attrs_known = not md.is_device(node.mode)  # rdev: in its metadata
        return self.nodes.add_found(node)

    def _dir_node(self, path: str, mtime_ns: int = 0, attrs: IndexEntry | None = None) -> Node:
        if attrs is not None and not attrs.is_dir:
            attrs = None
        mtime = attrs.mtime_ns if attrs is not None else (mtime_ns or now_ns())
        node = Node(
            self.nodes.new_ino(),
            path,
            stat.S_IFDIR | self.opts.dir_mode,
            self.opts.uid,
            self.opts.gid,
            mtime,
            mtime,
        )
        node.xattrs = {}
        if attrs is not None:
            node.apply_attrs(attrs)
            node.xattrs = decoded(attrs.xattrs)
        return self.nodes.add_found(node)

    def _apply_metadata(self, node: Node, meta: dict[str, str]) -> None:
        assert node.remote is not None
        node.metadata = meta = shared_metadata(meta)
        node.attrs_known = True
        node.apply_attrs(md.PosixAttrs.decode(meta))
        if not node.holds_local and object_kind(meta) != OWN:
            # Foreign formats: the listed length alone does not give the plaintext size.
            node.size = self.codec.plain_size_or_none(node.remote.body_size, meta) or 0
        refusal = self.codec.refusal(meta)
        if refusal:
            node.error = refusal

    # --- the directory attribute index ---------------------------------------------------

    def attr(self, node: Node) -> Attr:
        size = node.size
        if node.is_link and node.link_target is not None:
            size = len(node.link_target)
        mode = node.mode
        if not (self.opts.trust_attributes or node.mode_set_here):
            # The one place modes from S3 are masked: on the way to the kernel, so that what
            # is stored is kept as it is (for a mount that trusts it, and in the index).
            mode &= ~(PRIVILEGE_BITS & ~DIR_BITS_SHOWN if node.is_dir else PRIVILEGE_BITS)
        return Attr(
            ino=node.ino,
            mode=mode,
            size=size,
            uid=node.uid,
            gid=node.gid,
            mtime_ns=node.mtime_ns,
            ctime_ns=max(node.ctime_ns, node.mtime_ns),
            atime_ns=node.mtime_ns if node.atime_ns is None else node.atime_ns,
            nlink=node.nlink,
            rdev=node.rdev,
            ttl=self.listing.kernel_ttl(node),
        )

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        return result

    # --- listing (vfs/listing.py) ----------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Node:
        return await self.listing.lookup(parent_ino, name)

    async def readdir(self, ino: int) -> list[tuple[str, Node]]:
        return await self.listing.readdir(ino)

    async def readdir_stream(
        self, ino: int, emit: Callable[[list[tuple[str, Node]]], None]
    ) -> None:
        await self.listing.stream(ino, emit)

    # --- reading -------------------------------------------------------------------------

    def _replace_remote(self, node: Node, info: ObjectInfo) -> None:
        if node.remote is not None and node.version is not None:
            self.reader.forget(node.version)
        node.set_remote(ChildInfo(False, info.size, info.etag), info.metadata)
        node.size = self.codec.plain_size_or_none(info.size, info.metadata) or 0
        node.error = None  # (what was wrong with the version before; this one's: below)
        if not node.w.busy:
            node.xattrs = None  # another version: its own, read when asked for
        if info.metadata is not None:
            self._apply_metadata(node, info.metadata)

    def _remote_version(self, node: Node) -> Version:
        return self.small.remote_version(node)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles[fh]
        # (vfs/pages.py: answered again when that reply would leave the kernel zeros)
        answer = functools.partial(self._read, handle, offset, size)
        return await self.pages.read(handle.node, offset, size, answer)

    def _current_version(self, node: Node) -> Version | None:
        if node.w.local_version is not None:
            return node.w.local_version
        return self._remote_version(node) if node.remote is not None else None

    async def _read(self, handle: Handle, offset: int, size: int) -> bytes:
        node = handle.node
        if node.w.staging is not None:
            return await self.writes.read(node, offset, size)
        if node.error and node.w.local_version is None:
            # The version this descriptor read may have just lost to another machine's:
            # the winner, once S3 has said which it is (or EIO, if it cannot say).
            await self.versions.settled(node)
            if node.w.staging is not None:
                return await self.writes.read(node, offset, size)
        version = node.w.local_version
        if version is None:
            if node.remote is None:
                return b""
            if node.error:
                raise IntegrityError(f"{self.key(node.path)}: {node.error}")
            version = self._remote_version(node)
        try:
            return await self.reader.read(version, offset, size, handle.state)
        except IntegrityError as exc:
            key = self.key(node.path)
            log.error("%s: %s", key, strip_subject(exc, key))
            raise
        except KeyManagerError as exc:
            # The object stays unreadable (EIO) until its key manager answers; the mount lives.
            key = self.key(node.path)
            log.error("%s: cannot unwrap its data key: %s", key, strip_subject(exc, key))
            raise

    async def readlink(self, ino: int) -> bytes:
        return await self.namespace.readlink(self.node(ino))

    # --- opening and writing ------------------------------------------------------------

    def _unless_deleted(self, node: Node, truncating: bool) -> None:
        if not node.unlinked:
            return
        if truncating and node.deleted_elsewhere and self.nodes.at(node.path) is None:
            # Another machine deleted it; truncating needs none of its content: the file
            # is a new one here (uploaded with If-None-Match), as after Versions.revalidate.
            self.versions.reattach(node)
            return
        # The kernel looks the name up again and finds what is there now. Opened as it is,
        # what is written to it would go nowhere.
        raise StaleEntry(f"{self.key(node.path)} was deleted by another client")

    async def open(self, ino: int, flags: int) -> tuple[Handle, bool]:
        """Returns the handle and whether the kernel may keep its page cache."""
        node = self.node(ino)
        if node.is_dir:
            raise IsDirectory()
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._writable()
        truncating = writable and bool(flags & os.O_TRUNC)
        self._unless_deleted(node, truncating)
        try:
            keep = await self.versions.revalidate(node, recreate=truncating)
        except NoSuchEntry as exc:
            raise StaleEntry(str(exc)) from None
        if node.unlinked:  # found deleted meanwhile, by another open's look at S3
            self._unless_deleted(node, truncating)
            keep = False
        if node.error and node.w.local is None and node.w.staging is None and not writable:
            raise IntegrityError(f"{self.key(node.path)}: {node.error}")
        if not writable:
            self.small.opened(node)
        if writable and node.xattrs is None and xa.META_NAME in self.xattrs.newest_metadata(node):
            # The next version carries them, sealed anew: known before a streamed upload
            # fixes its metadata. (Best effort: the commit reads them otherwise.)
            with contextlib.suppress(S3CryptFSError):
                await self.xattrs.of(node)
        handle = self._new_handle(node, writable)
        if writable and flags & os.O_TRUNC:
            # libfuse enables atomic_o_trunc: the kernel sends no separate setattr(size=0).
            try:
                await self.setattr(ino, handle.fh, size=0)
            except BaseException:
                await self.release(handle.fh)
                raise
            keep = False
        return handle, keep

    def _new_handle(self, node: Node, writable: bool) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, node, writable)
        self.handles[fh] = handle
        node.opens += 1
        node.recent = True
        if writable:
            node.writers += 1
        return handle

    async def create(
        self, parent_ino: int, name: str, mode: int, uid: int, gid: int, flags: int = os.O_EXCL
    ) -> Handle:
        self._writable()
        parent = self.node(parent_ino)
        self._check_name(parent, name)
        existing = await self.listing.child(parent, name)
        if existing is not None and not existing.unlinked:
            if flags & os.O_EXCL or existing.is_dir:
                raise AlreadyExists()
            # The kernel thought the name free, but another machine created it meanwhile:
            # without O_EXCL, open(O_CREAT) opens that file (truncating it with O_TRUNC), as
            # on a local disk. Its metadata first: open() revalidates against it.
            await self.listing.load_metadata(existing)
            handle, keep = await self.open(existing.ino, flags)
            handle.keep_cache = keep
            return handle
        now = now_ns()
        path = child_path(parent.path, name)
        gid, mode = inherited_group(parent, gid, stat.S_IFREG | (mode & 0o7777))
        node = Node(self.nodes.new_ino(), path, mode, uid, gid, now, now)
        node.mode_set_here = True
        node.xattrs = {}
        self.nodes.add(node)
        node.w.attach(self.writes.new_staging(path), dirty=True)
        self.unsynced.add(node)
        self.listing.add(parent, name, ChildInfo(False))
        self.listing.entries_changed(parent, now)
        return self._new_handle(node, True)

    async def _materialize(self, node: Node) -> None:
        """Give *node* a write-back file holding its current content (upload/files.py)."""
        if node.w.staging is not None:
            return
        async with node.lock:
            if node.w.staging is not None:
                return
            version = None
            if node.w.local_version is None and node.remote is not None:
                if node.metadata is None:
                    await self.listing.head_metadata(node)  # the format is told by the metadata
                if node.error:
                    raise IntegrityError(f"{self.key(node.path)}: {node.error}")
                version = self._remote_version(node)
            await self.writes.materialize(node, version)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles[fh]
        if not handle.writable:
            raise BadHandle()
        node = handle.node
        self._check_size(offset + len(data))
        await self._materialize(node)
        written = await self.writes.write(node, offset, data)
        node.mtime_ns = node.ctime_ns = now_ns()
        await self.pages.written(node, handle.direct)
        kill = stat.S_ISUID | (stat.S_ISGID if node.mode & stat.S_IXGRP else 0)
        if not handle.privileged and node.mode & kill:
            # With direct I/O the kernel leaves this to the file system (FUSE's killpriv).
            await self.setattr(node.ino, fh, mode=node.mode & ~kill)
        return written

    def _check_size(self, size: int) -> None:
        if size > self.codec.max_file_size:
            raise FileTooLarge(f"{size} bytes: over {self.codec.max_file_size}, one S3 object")

    async def flush(self, fh: int) -> None:
        """close(): seal the file into the journal. When that cannot be done now (its key
        manager does not answer...), the content is kept as closed and sealed later: close
        still succeeds, the file is durable on this disk (upload/closed.py)."""
        handle = self.handles.get(fh)
        if handle is None or not handle.writable:
            return
        node = handle.node
        try:
            entry = await self.writes.commit(node)
        except Exception as exc:  # kept, not dropped: see keep_closed
            await self.writes.keep_closed(node, exc)
            if self.opts.sync_close:
                raise  # close() was asked to mean "in S3": it is not
            return
        if self.opts.sync_close and entry is not None:
            await self.uploader.wait(entry)

    async def fsync(self, fh: int) -> None:
        """Until the file is in S3: an error when it cannot be (the content is kept)."""
        handle = self.handles[fh]
        node = handle.node
        try:
            entry = await self.writes.commit(node)
        except Exception as exc:  # kept, and fsync says it is not in S3
            await self.writes.keep_closed(node, exc)
            raise
        if entry is not None:
            await self.uploader.wait(entry)
        if node.error:
            raise UploadConflict(node.error)

    async def fsyncdir(self) -> None:
        """Names changed in the journal (a rename of a file not uploaded yet) are on the disk
        when this returns, as a directory fsync promises on a local file system."""
        await self.journal.commits.sync()

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        node.opens -= 1
        if handle.writable:
            node.writers -= 1
            await self.pages.closed(node)
            if (
                node.writers == 0
                and node.w.unsealed
                and node not in self.closed_pending  # the retry task has it
            ):
                await self.writes.seal_closed(node)
        if node.unlinked and node.opens == 0:
            self.writes.discard(node)
            self.unsynced.discard(node)
        else:
            self.writes.release_if_idle(node)
            if handle.writable:
                await self.writes.end_divergence(node)
        self.nodes.maybe_drop(node)
        self.trimmer.soon()

    def _node_for_key(self, key: str) -> Node | None:
        if not key.startswith(self.prefix):
            return None
        return self.nodes.at(key[len(self.prefix) :])

    # --- attributes ----------------------------------------------------------------------
    async def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if ino == ROOT_INODE and node.index is None:
            await self.listing.dir_index(node)  # the root's own attributes live in its index
        await self.listing.load_metadata(node)
        return self.attr(node)

    async def setattr(
        self,
        ino: int,
        fh: int | None,
        *,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
    ) -> Attr:
        node = self.node(ino)
        self._writable()
        now = now_ns()
        if size is not None:
            if node.is_dir:
                raise IsDirectory()
            self._check_size(size)
            shrunk = fh is not None and node.w.staging is None and size < node.size
            before = self._current_version(node) if shrunk else None
            if size == 0 and node.w.staging is None:
                node.w.attach(self.writes.new_staging(node.path), dirty=True)
            else:
                await self._materialize(node)
            await self.writes.truncate(node, size)
            node.mtime_ns = now
            self.pages.resized(node, before)
            if fh is None and node.writers == 0:
                # truncate(2) by name: like a close, kept as closed if it cannot be sealed now
                await self.writes.seal_closed(node, tell=True)
                self.writes.release_if_idle(node)
        meta_changed = False
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            node.mode_set_here = True
            meta_changed = True
        if uid is not None and uid != 0xFFFFFFFF:
            node.uid = uid
            meta_changed = True
        if gid is not None and gid != 0xFFFFFFFF:
            node.gid = gid
            meta_changed = True
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
            meta_changed = True
        if atime_ns is not None:
            node.atime_ns = atime_ns
            meta_changed = True
        node.ctime_ns = now
        if meta_changed and not node.is_dir:
            await self._persist_attrs(node)
        elif meta_changed:
            self.listing.note(node)
        return self.attr(node)

    async def _persist_attrs(self, node: Node, xattrs_changed: bool = False) -> None:
        await self.xattrs.persist(node, xattrs_changed)

    def _fetcher(self, key: str, etag: str) -> Any:
        def fetch(start: int, end: int) -> bytes:
            return self.store.get(key, start, end, if_match=etag)

        return fetch if self.disk is None else self.disk.wrap(key, etag, fetch)

    # --- namespace changes (vfs/namespace.py) ----------------------------------------------

    async def mkdir(self, parent_ino: int, name: str, mode: int, uid: int, gid: int) -> Node:
        return await self.namespace.mkdir(parent_ino, name, mode, uid, gid)

    async def symlink(self, parent_ino: int, name: str, target: bytes, uid: int, gid: int) -> Node:
        return await self.namespace.symlink(parent_ino, name, target, uid, gid)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        await self.namespace.rmdir(parent_ino, name)

    async def unlink(self, parent_ino: int, name: str) -> None:
        await self.namespace.unlink(parent_ino, name)

    async def rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int
    ) -> None:
        await self.namespace.rename(old_parent, old_name, new_parent, new_name, flags)

    async def link(self, ino: int, new_parent: int, new_name: str) -> Node:
        return await self.namespace.link(ino, new_parent, new_name)

    async def mknod(
        self, parent_ino: int, name: str, mode: int, rdev: int, uid: int, gid: int
    ) -> Node:
        return await self.namespace.mknod(parent_ino, name, mode, rdev, uid, gid)

    # --- misc ----------------------------------------------------------------------------

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, count in items:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups = max(0, node.lookups - count)
            self.nodes.maybe_drop(node)

    def state_of(self, node: Node) -> str:
        return "error" if node.error else self.writes.state_of(node)

    def queued_versions(self) -> set[tuple[str, int]]:
        return self.uploader.queued_versions()

    def stats(self) -> dict[str, Any]:
        return status_of(self)

    def wrapping_versions(self) -> set[tuple[str, int]]:
        """Blocking: (provider, key version) of the keys wrapped ahead of time, and the one new
        files are wrapped under now (it may ask the key manager)."""
        out = self.codec.pool.versions() if self.codec.pool is not None else set()
        with contextlib.suppress(S3CryptFSError):
            manager = self.codec.ring.active()
            out.add((manager.provider, manager.active_key_version()))
        return out

    def key_problems(self) -> dict[str, S3CryptFSError | None]:
        return self.codec.key_problems()

    def key_health(self) -> dict[str, str]:
        return self.codec.key_health()
