"""Listings and lookups of the filesystem core: what a directory holds, from S3 LISTs
(trusted for --dir-cache-ttl), with the attributes of its index and what this mount changed
itself; HEADs for single names and for attributes an index does not have.

Split out of vfs/core.py by operation group; works on the Filesystem through ``self.fs``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio

from s3cryptfs.codec import OWN, object_kind
from s3cryptfs.errors import (
    FsError,
    NotDirectory,
    ObjectNotFound,
    S3CryptFSError,
    StoreError,
    strip_subject,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import metadata as md
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.format.xattrs import decode_set, encode_set
from s3cryptfs.store.base import ListPage, ObjectInfo
from s3cryptfs.vfs import names
from s3cryptfs.vfs.attrindex import SELF, IndexEntry
from s3cryptfs.vfs.nodes import ChildInfo, Listing, Node, child_path, now_ns

if TYPE_CHECKING:
    from s3cryptfs.vfs.core import Filesystem

log = logging.getLogger(__name__)

# A name looked up in a directory not listed yet: the directory is listed instead (one LIST
# page holds 1,000 keys) when its index has at most this many entries.
LIST_ON_LOOKUP_MAX = 500

# The HEADs of a directory's unindexed files: how many are out at once (the CRT sends them
# together from one thread: past a few dozen, the server's queue grows, not its throughput) and
# how many one worker-thread job takes (a LIST page's worth, applied as each comes back).
HEAD_CONCURRENCY = 32
HEAD_BATCH = 1000

OnPage = Callable[[list[tuple[str, ChildInfo]]], Awaitable[None]]


class Listings:
    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    async def listing_of(self, node: Node, on_page: OnPage | None = None) -> Listing:
        """The children of a directory, from S3 (cached for dir_ttl) plus local pending ones.

        *on_page*: called with each LIST page's entries (their index attributes applied) as
        the page arrives, so that a readdir can answer before the last page: what the
        finished listing corrects (changes made here meanwhile, pending local files) is not
        sent again."""
        listing = node.listing
        if listing is not None and time.monotonic() - listing.fetched_at < self.fs.opts.dir_ttl:
            return listing
        prefix = self.fs.dir_prefix(node.path)
        children: dict[str, ChildInfo] = {}
        index_loaded = trio.Event()
        # file names a directory of the same name may still replace (a dict: ordered)
        held: dict[str, None] = {}

        def page_entries(page: ListPage) -> list[str]:
            for p in page.prefixes:
                name = p[len(prefix) :].rstrip("/")
                if name and name not in (".", "..") and "/" not in name:
                    children[name] = ChildInfo(is_dir=True)  # a directory wins over a file
                    held.pop(name, None)
            for o in page.objects:
                name = o.key[len(prefix) :]
                if not name or name in (".", "..") or "/" in name or name in children:
                    continue
                children[name] = ChildInfo(False, o.size, o.etag, o.mtime_ns)
                held[name] = None
            # S3 lists in key order: "NAME/" comes after "NAME" and the keys between them,
            # so a file name is final once the listing has passed its "NAME/".
            last = max([*(o.key for o in page.objects), *page.prefixes], default="")
            ready = [n for n in held if not page.token or prefix + n + "/" < last]
            for n in ready:
                del held[n]
            dirs = [p[len(prefix) :].rstrip("/") for p in page.prefixes]
            return ready + [n for n in dirs if n and n not in (".", "..") and "/" not in n]

        async def fetch_pages(send: trio.MemorySendChannel[ListPage]) -> None:
            async with send:
                token: str | None = None
                while True:
                    page = await self.fs._thread(self.fs.store.list, prefix, "/", token)
                    await send.send(page)
                    if not page.token:
                        return
                    token = page.token

        async def fetch_listing() -> None:
            # The next pages are fetched while this one is answered: the server's LIST and
            # the mount's work on a page (nodes, attributes, the kernel's replies) overlap
            # instead of taking turns. Two pages ahead at most.
            send, recv = trio.open_memory_channel[ListPage](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_pages, send)
                async with recv:
                    async for page in recv:
                        names = page_entries(page)
                        if on_page is not None:
                            await index_loaded.wait()
                            await on_page(self._with_attrs(node, children, names))

        async def load_index() -> None:
            await self.dir_index(node)
            index_loaded.set()

        if node.listing_log is None:
            node.listing_log = []
        changes = node.listing_log
        log_start = len(changes)
        if node.listing_fetches == 0:
            node.listing_pending = (time.monotonic(), children)
        node.listing_fetches += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_listing)
                nursery.start_soon(load_index)
            # Creates, uploads and removals that happened during the LIST may be missing
            # from it (or it may still show them): what the mount did itself wins.
            for name, change in changes[log_start:]:
                if change is None:
                    children.pop(name, None)
                else:
                    children[name] = change
        finally:
            node.listing_fetches -= 1
            if node.listing_fetches == 0:
                changes.clear()
                node.listing_pending = None
        self._with_attrs(node, children, children)
        self._share_names(node, children)
        for name in [n for n in children if self._hidden(node, children, n)]:
            del children[name]
        if not self.fs.opts.read_only:
            self.fs.index.note_names(node.path, children)  # (the index's own entry: kept)
        for pending in self.fs.unsynced:
            if pending.parent_path == node.path and not pending.unlinked:
                children.setdefault(pending.name, ChildInfo(pending.is_dir))
        node.listing = Listing(children)
        return node.listing

    def _with_attrs(
        self, node: Node, children: dict[str, ChildInfo], names: Iterable[str]
    ) -> list[tuple[str, ChildInfo]]:
        """The entries *names* with the attributes of *node*'s index applied, where the index
        still describes them; the mount's own and the gateway's companion objects left out."""
        index = node.index or {}
        out = []
        for name in names:
            info = children.get(name)
            if info is None:
                continue
            entry = index.get(name)
            if (
                entry is not None
                and entry.is_dir == info.is_dir
                and (info.is_dir or entry.etag == info.etag)
            ):
                _share(info, entry)
            if not self._hidden(node, children, name):
                out.append((name, info))
        return out

    @staticmethod
    def _share_names(node: Node, children: dict[str, ChildInfo]) -> None:
        """Key the directory's index by the listing's name strings instead of the copies its
        JSON made: in a wide directory each name would be held twice."""
        index = node.index
        if not index:
            return
        shared = {name: index[name] for name in children if name in index}
        if len(shared) < len(index):
            shared.update((n, e) for n, e in index.items() if n not in shared)
        node.index = shared

    @staticmethod
    def _hidden(node: Node, children: dict[str, ChildInfo], name: str) -> bool:
        if node.path == "" and name == META_DIR:
            return True
        # the gateway's multipart manifest: part of its object, not a file of its own
        return name.endswith(gw.MPU_SUFFIX) and name[: -len(gw.MPU_SUFFIX)] in children

    def add(self, parent: Node, name: str, info: ChildInfo) -> None:
        if parent.listing is not None:
            parent.listing.put(name, info)
        if parent.listing_fetches and parent.listing_log is not None:
            parent.listing_log.append((name, info))

    def remove(self, parent_path: str, name: str) -> None:
        parent = self.fs.nodes.at(parent_path)
        if parent is None:
            return
        if parent.listing is not None:
            parent.listing.drop(name)
        if parent.listing_fetches and parent.listing_log is not None:
            parent.listing_log.append((name, None))

    async def child(
        self,
        parent: Node,
        name: str,
        listing: Listing | None = None,
    ) -> Node | None:
        """The node of *name* in *parent*, asking S3 when needed; None if it does not exist.

        *listing*: one just taken (readdir), used as it is: re-validating it for every name
        would LIST the directory once per entry when the listing lifetime is 0."""
        path = child_path(parent.path, name)
        known = self.fs.nodes.at(path)
        if known is not None:
            return known
        if parent.path == "" and name == META_DIR:
            return None
        if not names.can_exist(name, self.fs.key(path)):
            return None  # not UTF-8, or a key over 1024 bytes: asking S3 would fail
        if listing is None:
            listing = parent.listing
            ttl = self.fs.opts.dir_ttl
            if listing is not None and time.monotonic() - listing.fetched_at >= ttl:
                listing = await self.listing_of(parent)
            elif listing is None and names.needs_listing(name, self.fs.opts.backslash_names):
                # The server may store "\" as "/": a HEAD of "a\b" would find "a/b".
                listing = await self.listing_of(parent)
            elif listing is None and await self._small(parent):
                # A HEAD of the name, then a LIST of "NAME/" when it is no file, ask for this
                # one name; tools look up several names of a directory before reading it
                # (git: ".git" and ".gitignore" in each directory it enters). One LIST of
                # a small directory answers them all, and its readdir.
                listing = await self.listing_of(parent)
        if listing is not None:
            info = listing.children.get(name)
            if info is None:
                return None
            if info.is_dir:
                return self.fs._dir_node(path, attrs=info.attrs)
            node = self.fs._file_node(path, info)
            return node
        # No listing of the parent: ask for this one name.
        key = self.fs.key(path)
        try:
            head = await self.fs._thread(self.fs.store.head, key)
        except ObjectNotFound:
            pass
        else:
            node = self.fs._file_node(path, head)
            if head.metadata is not None and md.MTIME not in head.metadata:
                # Streamed uploads fix their metadata before the last write: the exact mtime
                # is in the directory index (if it still describes this version).
                seen = node.mtime_ns
                entry = (await self.dir_index(parent)).get(name)
                # (unless the node changed meanwhile: a touch here, or another version)
                remote = node.remote
                if (
                    entry is not None
                    and entry.etag == head.etag
                    and remote is not None
                    and remote.etag == head.etag
                    and node.mtime_ns == seen
                ):
                    node.mtime_ns = entry.mtime_ns
            return node
        page = await self.fs._thread(self.fs.store.list, key + "/", "/", None)
        if page.objects or page.prefixes:
            node = self.fs._dir_node(path, attrs=(await self.dir_index(parent)).get(name))
            node.has_marker = any(o.key == key + "/" for o in page.objects)
            return node
        return None

    async def _small(self, parent: Node) -> bool:
        """Does *parent*'s directory index (one GET, kept as long as a listing) say it holds
        few enough names for one LIST page? Without an index, its size is not known."""
        return 0 < len(await self.dir_index(parent)) <= LIST_ON_LOOKUP_MAX

    def kernel_ttl(self, node: Node) -> float:
        """How long the kernel may keep *node*'s name and attributes without asking.

        A file that is in S3 and not being written here changes, as far as this mount
        knows, only when its directory is listed again (readdir replies carry the new
        attributes) or at an open (which invalidates what the kernel kept): until its
        directory's listing expires, the kernel's copy is as good as ours, and asking again
        costs a round trip per file in a scan (a LOOKUP before each open of `cat *`).
        Directories, and files with local changes: 0, the adapter's shortest.

        While the directory is being listed, a file whose version that LIST has already
        shown (a readdir answers its pages before it ends: the same ETag as the node's) is
        as fresh as the listing will be: trusted from its start. Otherwise a scan that opens
        the files after its readdir would send a LOOKUP for each name once the adapter's
        shortest has passed. A file the LIST has not reached yet, or shows in another
        version, keeps the trust it had."""
        if node.is_dir or node.remote is None or node.unlinked or node.holds_local:
            return 0.0
        parent = self.fs.nodes.at(node.parent_path)
        if parent is None:
            return 0.0
        since = parent.listing.fetched_at if parent.listing is not None else None
        pending = parent.listing_pending
        if pending is not None:
            entry = pending[1].get(node.name)
            if entry is not None and not entry.is_dir and entry.etag == node.remote.etag:
                since = max(since or 0.0, pending[0])
        if since is None:
            return 0.0
        return max(0.0, since + self.fs.opts.dir_ttl - time.monotonic())

    async def lookup(self, parent_ino: int, name: str) -> Node:
        parent = self.fs.node(parent_ino)
        if not parent.is_dir:
            raise NotDirectory()
        if name == ".":
            return parent
        if name == "..":
            return self.fs.nodes.at(parent.parent_path) or parent
        node = await self.child(parent, name)
        if node is None:
            raise self.missing(parent, name)
        await self.load_metadata(node)
        return node

    def missing(self, parent: Node, name: str) -> FsError:
        """The error for a name *parent* does not hold: ENOENT, or ENAMETOOLONG for a name or
        key too long to exist (vfs/names.py)."""
        return names.missing(name, self.fs.key(child_path(parent.path, name)))

    async def load_metadata(self, node: Node) -> None:
        """HEAD a listed file once, for its mode, owner and mtime."""
        if node.is_dir or node.remote is None:
            return
        if node.attrs_known:
            await self.companion_size(node)  # (returns at once but for multipart objects)
            return
        await self.head_metadata(node)

    async def head_metadata(self, node: Node) -> None:
        assert node.remote is not None
        try:
            head = await self.fs._thread(self.fs.store.head, self.fs.key(node.path))
        except ObjectNotFound:
            return
        await self._took_head(node, head)

    async def _took_head(
        self, node: Node, head: ObjectInfo, name: str | None = None
    ) -> IndexEntry | None:
        """*node*'s attributes from its HEAD (the object may have changed since its listing);
        its index entry, if it has one."""
        if node.remote is None:
            return None  # removed while the HEAD was out
        if head.etag != node.remote.etag:
            if node.writers or node.holds_local:
                # Opened for writing while the HEAD was out: the version that open found is
                # the one its next upload is based on (If-Match), and must stay so: based on
                # a newer one, it would replace another machine's version, not become a copy.
                return None
            self.fs._replace_remote(node, head)
        self.fs._apply_metadata(node, head.metadata or {})
        await self.companion_size(node)
        return self.note(node, name)

    @staticmethod
    def _shed_metadata(node: Node) -> None:
        """A file HEADed only for its attributes (a listing) keeps them, not the object's
        metadata: that is most of what a known file costs, a wide directory holds as many as
        it has files, and an open reads it again anyway (close-to-open, Versions.revalidate).
        Kept for what needs it later: files in use, and formats not our own, whose size and
        index entry depend on it."""
        meta = node.metadata
        if node.remote is None or meta is None or not node.attrs_known:
            return
        if node.opens or node.holds_local:
            return
        if object_kind(meta) != OWN or node.error:
            return
        node.metadata = None

    async def companion_size(self, node: Node) -> None:
        """A gateway multipart object's size is only in its manifest: read it for stat."""
        meta = node.metadata
        if node.remote is None or node.companion_read or not meta:
            return
        # (every getattr passes here: our own objects are told apart without normalizing)
        if md.FORMAT in meta or not gw.is_mpu_object(meta):
            return
        if node.holds_local:
            return
        key = self.fs.key(node.path)
        node.companion_read = True
        try:
            node.size = await self.fs._thread(self.fs.codec.mpu_size, meta, key)
        except S3CryptFSError as exc:
            log.error("%s: %s", key, strip_subject(exc, key))
            node.error = str(exc)

    async def load_attrs_many(
        self, entries: list[tuple[str, Node]], listed: dict[str, ChildInfo] | None = None
    ) -> None:
        """Load metadata for many listed files at once (readdir; each with its name as the
        listing holds it, which their index entries then share): their HEADs go out together
        from one worker thread (ObjectStore.head_many), a batch at a time, and are applied
        here as each batch comes back.

        The attributes found are kept in the listing's entries as well (*listed*, or the
        directory's listing), sharing the index entry: a file the kernel drops
        (--max-inodes) and looks up again while the listing is trusted is then made again
        without a second HEAD."""
        todo = [
            (name, n)
            for name, n in entries
            if not n.is_dir and n.remote is not None and not n.attrs_known
        ]
        for start in range(0, len(todo), HEAD_BATCH):
            batch = {self.fs.key(n.path): (name, n) for name, n in todo[start : start + HEAD_BATCH]}
            heads = await self.fs._thread(self._heads, list(batch))
            failed: StoreError | None = None
            for key, head in heads:
                name, node = batch[key]
                if isinstance(head, ObjectNotFound):
                    continue  # gone since its listing: left as listed, as for one HEAD
                if isinstance(head, StoreError):
                    failed = failed or head
                    continue
                if node.remote is None or node.attrs_known:
                    continue  # removed, or loaded by an open, while the batch was out
                entry = await self._took_head(node, head, name)
                self._shed_metadata(node)
                if entry is not None:
                    children = listed if listed is not None else self._children_of(node)
                    info = children.get(name) if children is not None else None
                    if info is not None and info.attrs is None and info.etag == entry.etag:
                        _share(info, entry)
            if failed is not None:
                raise failed

    def _children_of(self, node: Node) -> dict[str, ChildInfo] | None:
        parent = self.fs.nodes.at(node.parent_path)
        listing = parent.listing if parent is not None else None
        return listing.children if listing is not None else None

    def _heads(self, keys: list[str]) -> list[tuple[str, ObjectInfo | StoreError]]:
        return list(self.fs.store.head_many(keys, HEAD_CONCURRENCY))

    async def stream(self, ino: int, emit: Callable[[list[tuple[str, Node]]], None]) -> None:
        """readdir answered as it goes: *emit* gets the entries of each LIST page, their
        attributes loaded, as soon as they are ready (the first ones after one page and its
        HEADs, not after the whole directory), then those only the finished listing has."""
        node = self.fs.node(ino)
        if not node.is_dir:
            raise NotDirectory()
        sent: set[str] = set()

        async def on_page(batch: list[tuple[str, ChildInfo]]) -> None:
            out = []
            for name, info in batch:
                path = child_path(node.path, name)
                child = self.fs.nodes.at(path)
                if child is None:
                    child = (
                        self.fs._dir_node(path, attrs=info.attrs)
                        if info.is_dir
                        else self.fs._file_node(path, info)
                    )
                if not child.unlinked:
                    out.append((name, child))
            await self.load_attrs_many(out, dict(batch))
            sent.update(name for name, _ in out)
            emit(out)

        with self.fs.index.batch(node.path):
            listing = await self.listing_of(node, on_page)
            rest: list[tuple[str, Node]] = []
            for name in sorted(listing.children):
                if name in sent:
                    continue
                child = await self.child(node, name, listing)
                if child is not None and not child.unlinked:
                    rest.append((name, child))
            await self.load_attrs_many(rest)
        emit(rest)

    async def readdir(self, ino: int) -> list[tuple[str, Node]]:
        node = self.fs.node(ino)
        if not node.is_dir:
            raise NotDirectory()
        listing = await self.listing_of(node)
        out: list[tuple[str, Node]] = []
        for name in sorted(listing.children):
            child = await self.child(node, name, listing)
            if child is not None and not child.unlinked:
                out.append((name, child))
        with self.fs.index.batch(node.path):
            await self.load_attrs_many(out)
        return out

    # --- the directory attribute index ------------------------------------------------

    def index_entry(self, node: Node) -> IndexEntry | None:
        if node.is_dir:
            xattrs = encode_set(node.xattrs or {})
            return IndexEntry(
                "", node.mode, node.uid, node.gid, node.mtime_ns, xattrs, node.atime_ns
            )
        remote = node.remote
        ws = node.write_state
        if remote is None or not node.attrs_known or (ws is not None and ws.local is not None):
            return None  # not in S3 yet: noted again once uploaded
        if node.metadata is not None and object_kind(node.metadata) != OWN:
            return None  # a foreign object's size needs its metadata: always HEADed
        return IndexEntry(
            remote.etag, node.mode, node.uid, node.gid, node.mtime_ns, atime_ns=node.atime_ns
        )

    def note(self, node: Node, name: str | None = None) -> IndexEntry | None:
        """Record *node*'s attributes in its directory's index (written in the background);
        the entry, or None if it has none yet. *name*: its name as its directory's listing
        holds it (one string for both)."""
        entry = self.index_entry(node)
        if entry is None or self.fs.opts.read_only:
            return entry
        node.attrs_stored = True
        if node.path == "":
            self.fs.index.note("", SELF, entry)
        else:
            own = node.name  # (renamed since its listing: then that name is not its own)
            self.fs.index.note(node.parent_path, name if name == own else own, entry)
        return entry

    def entries_changed(self, parent: Node, now: int | None = None) -> None:
        """A name was added to or removed from *parent*: its mtime and ctime move, and the
        new mtime goes to the index too, or a remount would show an older one (for a directory
        that carries no attributes, storing its mtime would store the defaults with it)."""
        parent.mtime_ns = parent.ctime_ns = now if now is not None else now_ns()
        if parent.attrs_stored:
            self.note(parent)

    def note_gone(self, parent_path: str, name: str) -> None:
        if not self.fs.opts.read_only:
            self.fs.index.note(parent_path, name, None)

    async def dir_index(self, node: Node) -> dict[str, IndexEntry]:
        """The attribute index of directory *node* (cached as long as its listing)."""
        if node.index is not None and time.monotonic() - node.index_at < self.fs.opts.dir_ttl:
            return node.index
        node.index = await self.fs.index.load(node.path)
        node.index_at = time.monotonic()
        if node.path == "":
            own = node.index.get(SELF)
            if own is not None and own.is_dir:
                node.apply_attrs(own)
                node.xattrs = decode_set(own.xattrs) if own.xattrs else {}
        return node.index


def _share(info: ChildInfo, entry: IndexEntry) -> None:
    """*entry* describes the listed version: the listing entry takes its attributes, and its
    ETag and mtime objects instead of equal copies (a wide directory holds one of each per
    file). The listed mtime (the upload's time) was only a stand-in for the file's own."""
    info.attrs = entry
    if not info.is_dir:
        info.etag = entry.etag
        info.mtime_ns = entry.mtime_ns
