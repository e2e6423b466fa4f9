"""Inodes: what the filesystem knows about one file, directory or symlink.

Paths are relative to the volume root ('' is the root, 'a/b' a child). A node lives until the
kernel forgets it (lookup count 0) and nothing holds it open or dirty.
"""

from __future__ import annotations

import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, overload

import trio

from s3cryptfs.cache.reader import ReadState, Version
from s3cryptfs.format import metadata as md
from s3cryptfs.upload import closed as closed_files
from s3cryptfs.upload.state import FileWrite
from s3cryptfs.vfs.attrindex import IndexEntry, shared_int

ROOT_INODE = 1
T = TypeVar("T")


class Attrs(Protocol):
    """Attributes read from S3: an object's metadata (md.PosixAttrs) or a directory index
    entry (taken as it is: a wide directory applies one per file)."""

    @property
    def mode(self) -> int | None: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def gid(self) -> int | None: ...
    @property
    def mtime_ns(self) -> int | None: ...
    @property
    def rdev(self) -> int | None: ...
    @property
    def atime_ns(self) -> int | None: ...


def now_ns() -> int:
    return time.time_ns()


# Slots: a directory of 100,000 files holds as many of these; without them each carries a
# per-instance dict that costs more than its fields.
@dataclass(eq=False, slots=True)
class ChildInfo:
    """An object version in S3 as a listing or a HEAD reported it: a directory's listing entry,
    and the version a file node was last seen (or written) as (Node.remote). A node made from
    a listing shares its entry instead of a copy (a wide directory's files each had both), so
    neither side changes one after it is made, except the listing's sharing of strings with
    its index (vfs/listing.py); what the mount learns of the version it opened (metadata, the
    reader's version) is the node's own."""

    is_dir: bool
    size: int = 0  # body size
    etag: str = ""
    mtime_ns: int = 0  # when S3 stored it (LastModified); 0 when not known
    attrs: IndexEntry | None = None  # from the directory index, when still valid

    @property
    def body_size(self) -> int:
        return self.size


@dataclass(eq=False, slots=True)
class Listing:
    children: dict[str, ChildInfo]
    fetched_at: float = field(default_factory=time.monotonic)
    _subdirs: int | None = None  # counted on demand, then kept by put() and drop()

    def put(self, name: str, info: ChildInfo) -> None:
        """Add or replace one name (the subdirectory count kept, not recounted: a directory
        being filled is asked for its attributes after every create)."""
        old = self.children.get(name)
        self.children[name] = info
        if self._subdirs is not None:
            self._subdirs += info.is_dir - (old is not None and old.is_dir)

    def drop(self, name: str) -> None:
        old = self.children.pop(name, None)
        if self._subdirs is not None and old is not None and old.is_dir:
            self._subdirs -= 1

    def subdirs(self) -> int:
        if self._subdirs is None:
            self._subdirs = sum(1 for c in self.children.values() if c.is_dir)
        return self._subdirs


@dataclass(eq=False, slots=True)
class DirState:
    """What only a directory node holds (made on first use: most nodes are files)."""

    listing: Listing | None = None
    # Changes made while a LIST of this directory is in flight: the LIST may predate them, so
    # they are replayed onto its result (name -> entry, None = removed).
    listing_fetches: int = 0
    # The LIST of this directory in flight (the first, when several are): when it started,
    # and its entries so far. What a readdir answers from its pages before it ends is as
    # fresh as that listing will be.
    listing_pending: tuple[float, dict[str, ChildInfo]] | None = None
    listing_log: list[tuple[str, ChildInfo | None]] | None = None
    index: dict[str, IndexEntry] | None = None  # its attribute index, as loaded
    index_at: float = 0.0
    has_marker: bool = False  # a "dir/" marker object exists


@dataclass(eq=False, slots=True)
class Extra:
    """What few file nodes hold (made when first set to something)."""

    rdev: int = 0  # device nodes
    # Set explicitly (utimensat, `touch -a`): reads never update it (docs/SEMANTICS.md). None
    # shows the mtime.
    atime_ns: int | None = None
    link_target: bytes | None = None
    # Extended attributes (user.*) as this mount shows them. None: those sealed in the
    # metadata of the file's version (node.remote), not read yet (vfs/xattrs.py). Directories
    # always have them (from their index entry).
    xattrs: dict[bytes, bytes] | None = None
    error: str | None = None  # last upload failure, for the state attribute
    # Of the version in node.remote: its object metadata (None: not HEADed, or shed once a
    # listing applied it) and the reader's view of it (made at its first read).
    metadata: dict[str, str] | None = None
    version: Version | None = None
    _lock: trio.Lock | None = None  # made on first use: most listed files are never locked
    xattrs_lock: trio.Lock | None = None  # (vfs/xattrs.py)
    opens: int = 0
    writers: int = 0
    # unlinked because another machine deleted the object (not by this mount's unlink)
    deleted_elsewhere: bool = False


_NO_DIR = DirState()
_NO_EXTRA = Extra()


class _Aside(Generic[T]):
    """A node field kept in a side record (DirState, Extra) that is made when the field is
    first set to something other than its default: until then reads give the default."""

    def __init__(self, side: str, empty: DirState | Extra) -> None:
        self.side = side
        self.empty = empty
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, node: None, owner: type) -> _Aside[T]: ...
    @overload
    def __get__(self, node: Node, owner: type) -> T: ...
    def __get__(self, node: Node | None, owner: type) -> T | _Aside[T]:
        if node is None:
            return self
        value: T = getattr(getattr(node, self.side) or self.empty, self.name)
        return value

    def __set__(self, node: Node, value: T) -> None:
        record = getattr(node, self.side)
        empty = self.empty
        default = value == getattr(empty, self.name)
        if record is None:
            if default:
                return
            record = type(empty)()
            setattr(node, self.side, record)
        setattr(record, self.name, value)
        # Back to its default (a file's last close): a record holding only defaults goes, or
        # every file ever opened would keep one.
        if default and all(getattr(record, f) == getattr(empty, f) for f in record.__slots__):
            setattr(node, self.side, None)


class _Flag:
    """A boolean node field kept as one bit of the node's _flags: a slot each cost a wide
    directory 8 bytes per file."""

    def __init__(self, bit: int) -> None:
        self.bit = bit

    @overload
    def __get__(self, node: None, owner: type) -> _Flag: ...
    @overload
    def __get__(self, node: Node, owner: type) -> bool: ...
    def __get__(self, node: Node | None, owner: type) -> bool | _Flag:
        if node is None:
            return self
        return bool(node._flags & self.bit)

    def __set__(self, node: Node, value: bool) -> None:
        node._flags = node._flags | self.bit if value else node._flags & ~self.bit


@dataclass(eq=False, slots=True)
class _NodeFields:
    """The fields a Node keeps in its own slots (see Node)."""

    ino: int
    path: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int = 0
    size: int = 0  # plaintext
    _remote: ChildInfo | None = None  # see the property remote
    # What it holds locally (write-back file, sealed version not in S3 yet: upload/files.py),
    # made on first use: most known files are only listed (see the property w).
    _w: FileWrite | None = field(default=None, init=False, repr=False)
    lookups: int = 0
    _flags: int = field(default=0, init=False, repr=False)  # the _Flag fields of Node
    _dir: DirState | None = field(default=None, init=False, repr=False)
    _extra: Extra | None = field(default=None, init=False, repr=False)


class Node(_NodeFields):
    """One inode. Slots, and the fields of directories (DirState) and of files few have
    (Extra) kept aside: a wide directory holds a node per file."""

    __slots__ = ()

    listing = _Aside[Listing | None]("_dir", _NO_DIR)
    listing_fetches = _Aside[int]("_dir", _NO_DIR)
    listing_pending = _Aside[tuple[float, dict[str, ChildInfo]] | None]("_dir", _NO_DIR)
    listing_log = _Aside[list[tuple[str, ChildInfo | None]] | None]("_dir", _NO_DIR)
    index = _Aside[dict[str, IndexEntry] | None]("_dir", _NO_DIR)
    index_at = _Aside[float]("_dir", _NO_DIR)
    has_marker = _Aside[bool]("_dir", _NO_DIR)
    # The mode was chosen through this mount (create, mkdir, chmod), not read from S3: shown
    # with its setuid, setgid and sticky bits (Filesystem.attr).
    mode_set_here = _Flag(1)
    unlinked = _Flag(2)
    # Looked up, listed or opened since the last sweep of a bounded table (NodeTable.to_forget).
    recent = _Flag(4)
    # Its attributes are stored (read from S3 or written there), not the --dir-mode and owner
    # defaults shown for a directory that carries none: those are never written back.
    attrs_stored = _Flag(8)
    # Open file handles and those open for writing: few files at once have any.
    opens = _Aside[int]("_extra", _NO_EXTRA)
    writers = _Aside[int]("_extra", _NO_EXTRA)
    rdev = _Aside[int]("_extra", _NO_EXTRA)
    atime_ns = _Aside[int | None]("_extra", _NO_EXTRA)
    link_target = _Aside[bytes | None]("_extra", _NO_EXTRA)
    xattrs = _Aside[dict[bytes, bytes] | None]("_extra", _NO_EXTRA)
    error = _Aside[str | None]("_extra", _NO_EXTRA)
    deleted_elsewhere = _Aside[bool]("_extra", _NO_EXTRA)
    metadata = _Aside[dict[str, str] | None]("_extra", _NO_EXTRA)
    version = _Aside[Version | None]("_extra", _NO_EXTRA)
    _lock = _Aside[trio.Lock | None]("_extra", _NO_EXTRA)
    xattrs_lock = _Aside[trio.Lock | None]("_extra", _NO_EXTRA)
    # Mode, owner and mtime of the version in remote are known (from its metadata or the
    # directory index): else they are the defaults, and never written to the index.
    attrs_known = _Flag(16)
    # A gateway multipart object's size was read from its manifest.
    companion_read = _Flag(32)

    @property
    def remote(self) -> ChildInfo | None:
        """The object version in S3 this node was last seen (or written) as."""
        return self._remote

    @remote.setter
    def remote(self, remote: ChildInfo | None) -> None:
        # What was learnt of the version before belongs to it, not to the new one.
        self._remote = remote
        if self._extra is not None:
            self.metadata = None
            self.version = None
        self._flags &= ~(Node.attrs_known.bit | Node.companion_read.bit)

    def set_remote(
        self,
        remote: ChildInfo | None,
        metadata: dict[str, str] | None = None,
        attrs_known: bool = False,
    ) -> None:
        """A new version in S3, with what is known of it."""
        self.remote = remote
        if metadata is not None:
            self.metadata = metadata
        self.attrs_known = attrs_known

    def copied_to(self, etag: str) -> Version | None:
        """Its version was copied in S3 (a rename): the copy, with the same body and metadata,
        is its version now. Returns the reader's version of the old one (to forget: the
        copy is read by its own ETag)."""
        old = self._remote
        assert old is not None
        version, companion = self.version, self.companion_read
        self.set_remote(ChildInfo(False, old.size, etag), self.metadata, self.attrs_known)
        self.companion_read = companion
        return version

    @property
    def lock(self) -> trio.Lock:
        # Kept aside, made on first use: most listed files are never locked, and a lock with
        # its parking lot is a tenth of a node's size.
        lock = self._lock
        if lock is None:
            lock = self._lock = trio.Lock()
        return lock

    @property
    def w(self) -> FileWrite:
        if self._w is None:
            self._w = FileWrite()
        return self._w

    @property
    def write_state(self) -> FileWrite | None:
        """Its write state if it has one (w makes one: scans of every node use this)."""
        return self._w

    @property
    def holds_local(self) -> bool:
        """A write-back file or a sealed version not in S3 yet."""
        w = self._w
        return w is not None and (w.staging is not None or w.local is not None)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent_path(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    def apply_attrs(self, attrs: Attrs) -> None:
        """Attributes read from S3 (object metadata, a directory index)."""
        self.attrs_stored = True
        types: tuple[int, ...] = (stat.S_IFDIR,) if self.is_dir else (stat.S_IFREG, stat.S_IFLNK)
        if not self.is_dir and self.size == 0:
            # Unauthenticated metadata cannot turn a file with content into a FIFO that
            # blocks whoever opens it: special files are empty objects.
            types += md.SPECIAL_TYPES
        if attrs.mode is not None and stat.S_IFMT(attrs.mode) in types:
            if attrs.mode != self.mode:  # (our own chmod read back stays ours)
                self.mode_set_here = False
            self.mode = shared_int(attrs.mode)
        if attrs.uid is not None:
            self.uid = shared_int(attrs.uid)
        if attrs.gid is not None:
            self.gid = shared_int(attrs.gid)
        if attrs.mtime_ns is not None:
            self.mtime_ns = attrs.mtime_ns
        if attrs.rdev is not None and md.is_device(self.mode):
            self.rdev = attrs.rdev
        self.atime_ns = attrs.atime_ns  # only set explicitly; else the mtime stands for it

    def posix_attrs(self) -> md.PosixAttrs:
        """What the object's metadata says of the file."""
        rdev = self.rdev if md.is_device(self.mode) else None
        return md.PosixAttrs(self.mode, self.uid, self.gid, self.mtime_ns, rdev, self.atime_ns)

    @property
    def nlink(self) -> int:
        if self.is_dir:
            # "." and each subdirectory's "..", as far as the listing held knows them.
            return 2 + (self.listing.subdirs() if self.listing is not None else 0)
        return 0 if self.unlinked else 1

    def dirty(self) -> bool:
        return self._w is not None and self._w.busy

    @property
    def remote_etag(self) -> str | None:
        return self.remote.etag if self.remote is not None else None


@dataclass(eq=False)
class Handle:
    fh: int
    node: Node
    writable: bool
    state: ReadState = field(default_factory=ReadState)
    keep_cache: bool = True  # whether the kernel's pages of the file are still its content
    direct: bool = False  # its writes bypass the kernel's page cache (direct I/O)
    # Opened by root (who keeps setuid and setgid bits when writing); any other writer drops
    # them, as the kernel does on a local disk (Filesystem.write).
    privileged: bool = True


# Metadata values every file has its own of (times, wrapped keys are long): interning them
# would only grow the interpreter's table of interned strings, which never shrinks.
_UNIQUE_VALUES = frozenset({md.MTIME, md.ATIME})
_SHORT = 24
_REPEATED = frozenset({md.FORMAT, md.KMS_ID, md.KMS_PROVIDER, md.KEY_VERSION})


def shared_metadata(meta: dict[str, str]) -> dict[str, str]:
    """*meta* with its names and repeated values interned: the files of one directory repeat
    the same names and many of the same values (format, key version, key manager, owner,
    mode), and a HEAD gives each file its own copies of all of them."""
    return {
        sys.intern(k): sys.intern(v)
        if k in _REPEATED or (len(v) <= _SHORT and k not in _UNIQUE_VALUES)
        else v
        for k, v in meta.items()
    }


def inherited_group(parent: Node, gid: int, mode: int) -> tuple[int, int]:
    """The group and mode of a node that the caller of group *gid* creates in *parent*.

    In a directory with the set-group-ID bit, new entries take the directory's group and new
    directories keep the bit, as on a local disk: shared project directories rely on it. The
    kernel has already cleared the bit from the mode of a file whose creator is not a member
    of that group, and only it knows the creator's supplementary groups."""
    if not parent.mode & stat.S_ISGID:
        return gid, mode
    if stat.S_ISDIR(mode):
        mode |= stat.S_ISGID
    return parent.gid, mode


def child_path(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class NodeTable:
    """Every node the kernel or an open file still refers to, by inode and by path.

    With a *limit*, the table asks to be trimmed when it holds more nodes than that: the
    kernel keeps an inode (and so a node here) for every name it looked up or got from a
    readdir until it is short of memory, so a `find` or an `ls -l` over a wide bucket would
    otherwise hold one node per file it ever saw. `to_forget` picks files the kernel should
    drop (the adapter invalidates their names; the kernel's FORGET then frees the node
    through `maybe_drop`)."""

    def __init__(self, limit: int = 0) -> None:
        self.by_ino: dict[int, Node] = {}
        self.by_path: dict[str, Node] = {}
        self._next = ROOT_INODE + 1
        self.limit = limit  # 0: no bound
        self.asked = 0  # names the kernel was asked to drop, for the status
        # Inodes asked for and not forgotten yet: counted as gone (their FORGET is on its
        # way), and not asked again unless looked up again. A kernel that kept them anyway
        # would so make a sweep wait for a tenth of the limit of new nodes, not come at
        # every reply.
        self._asking: set[int] = set()

    def held(self, node: Node) -> Node:
        """The kernel takes one more reference to *node* (a lookup reply, a readdir entry):
        the node to answer with. A node made by a request that waited (a HEAD) may have been
        dropped meanwhile for being unreferenced: it is put back, unless another node took
        its path, which is then the answer."""
        node = self.current(node) or node
        node.lookups += 1
        node.recent = True
        if self._asking:
            self._asking.discard(node.ino)
        return node

    def is_asked(self, node: Node) -> bool:
        """*node* is still to be dropped by the kernel: chosen by a sweep, and not looked up,
        listed, renamed or freed since."""
        return node.ino in self._asking and self.by_ino.get(node.ino) is node

    def withdraw(self, node: Node) -> None:
        """A file a sweep chose is not asked about after all (fuse_drop.py: it was used,
        moved or freed before its name went out)."""
        self._asking.discard(node.ino)
        self.asked -= 1

    def over_limit(self) -> bool:
        return self.limit > 0 and len(self.by_ino) - len(self._asking) > self.limit

    def to_forget(self, keep: Node | None = None) -> list[Node]:
        """Bring the table to nine tenths of its limit: nodes the kernel holds no reference
        to (made by a listing ahead of its readdir's replies, or for a readdir stopped early)
        are dropped here; the files returned are those the kernel should drop. *keep*: the
        node of the reply being sent, which is not chosen.

        Second chance: a file used since the last sweep loses its mark and stays; the others
        go, oldest first (the table is in order of arrival). Directories stay (dropping one
        unhashes it: a shell inside it would see its cwd deleted), and so do open files,
        files with changes not in S3 yet and files the kernel was already asked about."""
        want = len(self.by_ino) - len(self._asking) - self.limit * 9 // 10
        chosen: list[Node] = []
        # A clock whose hand starts at the oldest node at every sweep: the scan stops once
        # enough are found, so a sweep costs what it frees plus the marks it takes, not the
        # whole table (those that survive it are at the front, without their marks, next time).
        nodes = list(self.by_ino.values())
        for _ in range(2):  # the second pass takes the files that lost their mark
            for node in nodes:
                if want <= 0:
                    break
                if node is keep or not self._droppable(node):
                    continue
                if node.lookups == 0:
                    if self.by_ino.get(node.ino) is node:  # (not dropped by the first pass)
                        self.maybe_drop(node)
                        want -= 1
                elif node.recent:
                    node.recent = False
                else:
                    chosen.append(node)
                    self._asking.add(node.ino)
                    want -= 1
        self.asked += len(chosen)
        return chosen

    def _droppable(self, node: Node) -> bool:
        return (
            node.opens == 0
            and not node.unlinked
            and node.ino != ROOT_INODE
            and node.ino not in self._asking
            and not stat.S_ISDIR(node.mode)
            and not node.dirty()
            and not node.holds_local
        )

    def add(self, node: Node) -> Node:
        self.by_ino[node.ino] = node
        self.by_path[node.path] = node
        return node

    def add_found(self, node: Node) -> Node:
        """*node*, made from what S3 or a listing said (answers awaited), unless another
        request made a node of that kind for the path meanwhile: that one is the file. Two
        inodes for one path would split its versions (an upload landing on the other)."""
        known = self.by_path.get(node.path)
        if known is not None and known.is_dir == node.is_dir:
            return known
        return self.add(node)

    def new_ino(self) -> int:
        ino = self._next
        self._next += 1
        return ino

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def at(self, path: str) -> Node | None:
        return self.by_path.get(path)

    def current(self, node: Node) -> Node | None:
        """*node* if it is still in the table (put back if it was only dropped for being
        unused), the node now at its path if that changed, None if it was removed."""
        if self.by_ino.get(node.ino) is node:
            return node
        if node.unlinked:
            return None
        now = self.by_path.get(node.path)
        if now is not None:
            return now
        return self.add(node)

    def detach(self, node: Node) -> None:
        """Remove *node* from the namespace (unlink); it lives on while open or looked up."""
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]

    def move(self, node: Node, new_path: str) -> None:
        """Rename *node* and, for a directory, every known descendant."""
        old = node.path
        moves = [node]
        if node.is_dir:  # (a file has none: no look at every known node per file renamed)
            moves += [n for p, n in self.by_path.items() if p.startswith(old + "/")]
        for n in moves:
            if self.by_path.get(n.path) is n:
                del self.by_path[n.path]
        for n in moves:
            n.path = new_path + n.path[len(old) :]
            self.by_path[n.path] = n
            # (asked under its old name, the kernel may keep it: it may be asked again)
            self._asking.discard(n.ino)
            if n._w is not None and n._w.staging is not None:
                closed_files.tag(n._w.staging.fd, n.path)

    def maybe_drop(self, node: Node) -> None:
        """Free a node nobody refers to any more."""
        if node.ino == ROOT_INODE or node.lookups > 0 or node.opens > 0 or node.dirty():
            return
        self.by_ino.pop(node.ino, None)
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        if self._asking:
            self._asking.discard(node.ino)
