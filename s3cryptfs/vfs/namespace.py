"""Namespace changes of the filesystem core: mkdir, symlink, rmdir, unlink, rename.

Split out of vfs/core.py by operation group: Filesystem delegates these operations here, and
this class works on the Filesystem's nodes, listings and stores through ``self.fs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import stat
from typing import TYPE_CHECKING

from s3cryptfs import limits
from s3cryptfs.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    InvalidRequest,
    IsDirectory,
    NameTooLong,
    NoSuchEntry,
    NotDirectory,
    NotPermitted,
    ObjectNotFound,
    PreconditionFailed,
    UploadConflict,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import metadata as md
from s3cryptfs.upload.journal import ABSENT, Base, Entry
from s3cryptfs.vfs.attrindex import SELF
from s3cryptfs.vfs.nodes import (
    ChildInfo,
    Listing,
    Node,
    child_path,
    inherited_group,
    now_ns,
)

if TYPE_CHECKING:
    from s3cryptfs.vfs.core import Filesystem

log = logging.getLogger(__name__)

# Copies of a file being renamed while other machines keep replacing it (each attempt a HEAD
# and a conditional copy): then the rename fails with EIO.
RENAME_ATTEMPTS = 10


class Namespace:
    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    async def _new_name(self, parent_ino: int, name: str, is_dir: bool) -> tuple[Node, str]:
        """The parent and path of a name about to be created (EEXIST if it exists)."""
        self.fs._writable()
        parent = self.fs.node(parent_ino)
        self.fs._check_name(parent, name, is_dir)
        if await self.fs.listing.child(parent, name) is not None:
            raise AlreadyExists()
        return parent, child_path(parent.path, name)

    async def mkdir(
        self,
        parent_ino: int,
        name: str,
        mode: int,
        uid: int,
        gid: int,
    ) -> Node:
        parent, path = await self._new_name(parent_ino, name, is_dir=True)
        now = now_ns()
        gid, mode = inherited_group(parent, gid, stat.S_IFDIR | (mode & 0o7777))
        attrs = md.PosixAttrs(mode, uid, gid, now)
        marker = self.fs.key(path) + "/"
        await self.fs._thread(
            lambda: self.fs.store.put(marker, b"", attrs.encode(), if_none_match=True)
        )
        node = self.fs._dir_node(path, now)
        node.mode, node.uid, node.gid = mode, uid, gid
        node.mode_set_here = True
        node.has_marker = True
        node.listing = Listing({})
        self.fs.listing.add(parent, name, ChildInfo(True))
        self.fs.listing.entries_changed(parent, now)
        self.fs.listing.note(node)
        return node

    async def _drop_streams_under(self, node: Node) -> None:
        """Drop the streamed uploads of *node* and, for a directory, of every node below."""
        if not node.is_dir:
            if node.write_state is not None and node.write_state.stream is not None:
                await self.fs.writes.drop_stream(node, "renamed")
            return
        path = node.path
        for n in list(self.fs.nodes.by_path.values()):
            ws = n.write_state
            if ws is not None and ws.stream is not None and (
                n.path == path or n.path.startswith(path + "/")
            ):
                await self.fs.writes.drop_stream(n, "renamed")

    async def readlink(self, node: Node) -> bytes:
        fs = self.fs
        if not node.is_link:
            raise InvalidRequest()
        if node.link_target is None:
            await fs.versions.revalidate(node)
            assert node.remote is not None
            # (the read below is pinned to this ETag, so the size checked is the size read)
            limits.check_size(
                "symlink", fs.key(node.path), node.remote.body_size, limits.SYMLINK_BODY_MAX
            )
            version = fs._remote_version(node)
            node.link_target = await fs.reader.read(version, 0, version.plain_size or 1 << 20)
        return node.link_target

    async def symlink(
        self,
        parent_ino: int,
        name: str,
        target: bytes,
        uid: int,
        gid: int,
    ) -> Node:
        parent, path = await self._new_name(parent_ino, name, is_dir=False)
        now = now_ns()
        gid, _ = inherited_group(parent, gid, stat.S_IFLNK | 0o777)
        attrs = md.PosixAttrs(stat.S_IFLNK | 0o777, uid, gid, now)
        with self.fs.codec.fence():
            body, meta = await self.fs._thread(
                lambda: self.fs.codec.seal_bytes(target, attrs, self.fs.key(path), content=True)
            )
            etag = await self.fs._thread(
                lambda: self.fs.store.put(self.fs.key(path), body, meta, if_none_match=True)
            )
        node = Node(self.fs.nodes.new_ino(), path, stat.S_IFLNK | 0o777, uid, gid, now, now)
        info = ChildInfo(False, len(body), etag, now)
        node.set_remote(info, meta, attrs_known=True)
        node.size = len(target)
        node.link_target = target
        self.fs.nodes.add(node)
        self.fs.listing.note(node)
        self.fs.listing.add(parent, name, info)
        self.fs.listing.entries_changed(parent, now)
        return node

    def _has_unsynced_child(self, node: Node) -> bool:
        return any(n.parent_path == node.path and not n.unlinked for n in self.fs.unsynced)

    async def _is_empty(self, node: Node) -> bool:
        # Checked before the LIST too: a child whose upload completes while the LIST is in
        # flight would otherwise be in neither.
        if self._has_unsynced_child(node):
            return False
        prefix = self.fs.dir_prefix(node.path)
        page = await self.fs._thread(self.fs.store.list, prefix, "/", None)
        others = [o for o in page.objects if o.key != prefix] + page.prefixes
        if others:
            return False
        return not self._has_unsynced_child(node)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self.fs._writable()
        parent = self.fs.node(parent_ino)
        node = await self.fs.listing.child(parent, name)
        if node is None:
            raise self.fs.listing.missing(parent, name)
        if not node.is_dir:
            raise NotDirectory()
        if not await self._is_empty(node):
            raise DirectoryNotEmpty()
        with contextlib.suppress(ObjectNotFound):
            await self.fs._thread(self.fs.store.delete, self.fs.key(node.path) + "/")
        node.unlinked = True
        self.fs.nodes.detach(node)
        self.fs.listing.remove(parent.path, name)
        self.fs.listing.note_gone(parent.path, name)
        if not self.fs.opts.read_only:
            self.fs.index.forget_dir(node.path)
        self.fs.listing.entries_changed(parent)

    async def unlink(self, parent_ino: int, name: str) -> None:
        self.fs._writable()
        parent = self.fs.node(parent_ino)
        node = await self.fs.listing.child(parent, name)
        if node is None:
            raise self.fs.listing.missing(parent, name)
        if node.is_dir:
            raise IsDirectory()
        key = self.fs.key(node.path)
        # No close seals the file meanwhile: its version would be uploaded after the delete.
        async with self.fs.writes.names.changing(node, node.lock):
            await self.fs.writes.drop_stream(node, "unlinked")
            await self._keep_open_content(node)
            self.fs.uploader.cancel(key)
            await self.fs.writes.forget_closed(node)  # before waiting: a crash must not revive it
            await self.fs.uploader.wait_all(self.fs.uploader.pending_for(key))
            await self._orphan(node)
        self.fs.listing.remove(parent.path, name)
        self.fs.listing.note_gone(parent.path, name)
        await self._records_settled()
        with contextlib.suppress(ObjectNotFound):
            await self.fs._thread(self.fs.store.delete, key)
        if node.remote is not None and gw.is_mpu_object(node.metadata or {}):
            with contextlib.suppress(ObjectNotFound):
                await self.fs._thread(self.fs.store.delete, key + gw.MPU_SUFFIX)
        self.fs.listing.entries_changed(parent)
        self.fs.nodes.maybe_drop(node)

    async def _keep_open_content(self, node: Node) -> None:
        """A file about to lose its name (unlink, or a rename over it) stays readable and
        writable through the descriptors still open on it, as on a local disk: its content
        moves into its write-back file before the object goes or is overwritten."""
        if node.opens == 0:
            return
        node.w.keep = True  # an upload landing meanwhile must not release the copy
        await self.fs._materialize(node)
        async with node.lock:
            await self.fs.writes.uncut(node)  # what was cut is read from the object, going now

    async def _orphan(self, node: Node) -> None:
        """*node* has no name any more: nothing of it is sealed, uploaded or recovered after a
        crash; what its open descriptors write goes away with the last of them."""
        await self.fs.writes.forget_closed(node)
        node.unlinked = True
        node.w.local = None
        node.w.local_version = None
        self.fs.unsynced.discard(node)
        self.fs.nodes.detach(node)

    async def _settle(self, node: Node) -> None:
        """Make sure a file's newest content is in S3 (rename copies what S3 has)."""
        if node.w.unsealed and node.writers == 0:
            await self.fs.writes.commit(node)
        if node.w.local is not None:
            try:
                await self.fs.uploader.wait(node.w.local)
            except UploadConflict:
                # Another machine's version won: ours is in its conflict copy (and the log),
                # and the name holds theirs, which is what moves.
                pass

    async def rename(
        self, old_parent: int, old_name: str, new_parent: int, new_name: str, flags: int
    ) -> None:
        self.fs._writable()
        src_parent = self.fs.node(old_parent)
        dst_parent = self.fs.node(new_parent)
        self.fs._check_name(dst_parent, new_name)
        node = await self.fs.listing.child(src_parent, old_name)
        if node is None:
            raise self.fs.listing.missing(src_parent, old_name)
        if node.is_dir:
            self.fs._check_name(dst_parent, new_name, is_dir=True)  # its marker key ends in /
        target = await self.fs.listing.child(dst_parent, new_name)
        if target is node:
            return
        noreplace = flags & 1  # RENAME_NOREPLACE
        if flags & ~1:
            raise InvalidRequest("RENAME_EXCHANGE is not supported")
        if target is not None:
            if noreplace:
                raise AlreadyExists()
            if node.is_dir and not target.is_dir:
                raise NotDirectory()
            if not node.is_dir and target.is_dir:
                raise IsDirectory()
            if target.is_dir and not await self._is_empty(target):
                raise DirectoryNotEmpty()
        new_path = child_path(dst_parent.path, new_name)
        if node.is_dir and new_path.startswith(node.path + "/"):
            raise InvalidRequest("cannot move a directory into itself")
        async with contextlib.AsyncExitStack() as stack:
            # No close seals the file, or the file it replaces, under its name meanwhile: its
            # version would be queued under a name that is changing (upload/state.py).
            files = [n for n in (node, target) if n is not None and not n.is_dir]
            for f in sorted(files, key=lambda n: n.ino):
                await stack.enter_async_context(self.fs.writes.names.changing(f, f.lock))
            # A streamed upload goes to the old name: it is sent whole at close instead.
            await self._drop_streams_under(node)
            if target is not None:
                await self.fs.writes.drop_stream(target, "replaced")
                if not target.is_dir:
                    await self._keep_open_content(target)
            if node.is_dir:
                await self._rename_dir(node, new_path, target)
                moved = None
            else:
                moved = await self._rename_file(node, new_path, target)
            await self._move_node(node, new_path, src_parent, old_name, target, moved)
        self.fs.listing.add(
            dst_parent,
            new_name,
            ChildInfo(
                node.is_dir,
                node.remote.body_size if node.remote else 0,
                node.remote.etag if node.remote else "",
            ),
        )
        now = now_ns()
        self.fs.listing.entries_changed(src_parent, now)
        if dst_parent is not src_parent:
            self.fs.listing.entries_changed(dst_parent, now)
        node.ctime_ns = now
        self.fs.listing.note_gone(src_parent.path, old_name)
        self.fs.listing.note(node)

    async def _move_node(
        self,
        node: Node,
        new_path: str,
        src_parent: Node,
        old_name: str,
        target: Node | None,
        moved: Entry | None,
    ) -> None:
        if node.unlinked:
            # Another machine deleted it while the rename waited for its upload, which lost
            # to that delete and went to a conflict copy (Versions.conflicted). There is
            # nothing left to move; given a name again, the node would be handed to the
            # kernel there and every open of that name would fail with ESTALE.
            if moved is None:
                raise NoSuchEntry(f"{self.fs.key(node.path)} was deleted by another client")
            node.unlinked = node.deleted_elsewhere = False  # its newest version goes there
        try:
            self.fs.listing.remove(src_parent.path, old_name)
            if target is not None:
                await self._orphan(target)
            self.fs.nodes.move(node, new_path)
        finally:
            if moved is not None:
                # Sent from now on: when it lands, its key names the node (Versions.uploaded).
                self.fs.uploader.release(moved)

    async def _rename_file(
        self,
        node: Node,
        new_path: str,
        target: Node | None,
    ) -> Entry | None:
        """Move a file's content to *new_path*'s key. Returns its queued version when that was
        moved in the journal: held back from upload until the caller has renamed the node."""
        old_key, new_key = self.fs.key(node.path), self.fs.key(new_path)
        if node.w.unsealed and node.writers == 0:
            await self.fs.writes.commit(node)
        queued = self._queued(node)
        if queued is not None:
            self.fs.uploader.hold(queued)  # not sent under the old name while we look around
        try:
            if target is not None:
                await self._settle(target)
                self.fs.uploader.cancel(new_key)
                await self._records_settled()
            if queued is not None and self._queued(node) is queued:
                await self._move_queued(node, queued, new_key, target)
                return queued  # held until the node has its new name
        except BaseException:
            if queued is not None:
                self.fs.uploader.release(queued)
            raise
        if queued is not None:
            self.fs.uploader.release(queued)  # changed meanwhile: the long way
        await self._settle(node)
        if node.remote is None:
            return None  # only local (still open, never committed): nothing in S3 to move
        if node.w.staging is not None:
            async with node.lock:
                await self.fs.writes.uncut(node)  # what was cut is read from the old name
        await self._records_settled()
        etag, mpu = await self._copy_object(node, old_key, new_key)
        await self._delete_old(old_key, mpu)
        version = node.copied_to(etag)
        if version is not None:
            self.fs.reader.forget(version)  # (the copy is read by its own ETag)
        return None

    async def _records_settled(self) -> None:
        """Before this mount deletes or replaces an object in S3 (unlink, rename): the records
        of versions already uploaded, or cancelled, are gone from the journal's disk. Their
        removal may wait for the next group commit (Journal.remove keeps its order), and a
        crash before it would make the next mount upload such a version again: over the
        file renamed there (a conflict copy), or under a name deleted since (the file back)."""
        if self.fs.journal.commits.pending:
            await self.fs.journal.commits.sync()

    async def _delete_old(self, key: str, mpu: bool) -> None:
        """Delete a renamed file's object under its old *key*, and the manifest of a gateway
        multipart object (*mpu*) with it."""
        with contextlib.suppress(ObjectNotFound):
            await self.fs._thread(self.fs.store.delete, key)
        if mpu:
            with contextlib.suppress(ObjectNotFound):
                await self.fs._thread(self.fs.store.delete, key + gw.MPU_SUFFIX)

    def _queued(self, node: Node) -> Entry | None:
        """The version of *node* a rename can move in the journal, if any: nobody writes the
        file, and its newest version waits for its upload, unstarted (Uploader.movable)."""
        entry = node.w.local
        if entry is None or node.writers or node.w.unsealed or node.w.diverted is not None:
            return None
        if entry.key != self.fs.key(node.path) or not self.fs.uploader.movable(entry):
            return None
        return entry

    async def _move_queued(
        self, node: Node, entry: Entry, new_key: str, target: Node | None
    ) -> None:
        """Rename a file whose newest version is still queued (git's objects, rsync's and
        editors' temporary files): the version is moved to *new_key* in the journal and
        uploaded there, with no wait and no copy. What the old name holds in S3 (an older
        version) is deleted once the move is on the disk."""
        old_key = entry.key
        old_base = entry.base
        old, old_meta = node.remote, node.metadata
        base: Base = ("etag", target.remote.etag) if target and target.remote else ABSENT
        # The old name holds an object when the file was in S3 under it, or when the version
        # was to replace what the old name held (this file was itself renamed over a file
        # in S3, not yet sent): either goes, or the old name comes back at the next listing.
        replaced = old is None and old_base[0] == "etag"
        async with node.lock:  # no commit under the old name meanwhile
            self.fs.uploader.rekey(entry, new_key, base)
            if old is None and not replaced and not entry.displaced:
                return
            # A replaced object's metadata is not at hand: its manifest, if any, goes too.
            mpu = replaced or (old is not None and gw.is_mpu_object(old_meta or {}))
            try:
                # On the disk before S3 changes, and before the older versions this one
                # displaced go: a crash before then would send those under the old name.
                await self.fs.journal.commits.sync()
                entry.displaced = False
                if old is not None or replaced:
                    await self._delete_old(old_key, mpu)
            except BaseException:
                # The old name still holds its version: the rename did not happen.
                self.fs.uploader.rekey(entry, old_key, old_base)
                raise
        version = node.version if old is not None and node.remote is old else None
        node.remote = None  # until the upload lands under the new name (Versions.uploaded)
        # Not in S3 under any name meanwhile: a listing of its new directory fetched from S3
        # adds it as it adds a file created here (Listings.listing_of).
        self.fs.unsynced.add(node)
        if version is not None:
            self.fs.reader.forget(version)
        self.fs.small.forget_key(old_key)

    async def _copy_object(self, node: Node, old_key: str, new_key: str) -> tuple[str, bool]:
        """Copy the object *node* names to *new_key* on the server (no re-encryption).
        Returns the copy's ETag and whether it is a gateway multipart object (whose manifest
        was copied too)."""
        for attempt in range(RENAME_ATTEMPTS):
            remote = node.remote
            assert remote is not None
            new_meta = None
            mpu = gw.is_mpu_object(node.metadata or {})
            if mpu:
                # The manifest moves first, and the object's pointer names its new place.
                await self.fs._thread(
                    lambda: self.fs.store.copy(
                        old_key + gw.MPU_SUFFIX, new_key + gw.MPU_SUFFIX, None
                    )
                )
                new_meta = {
                    **(node.metadata or {}),
                    "encryption-fallback-ptr": new_key + gw.MPU_SUFFIX,
                }
            try:
                etag = await self.fs._thread(
                    functools.partial(
                        self.fs.store.copy,
                        old_key,
                        new_key,
                        new_meta,
                        src_etag=remote.etag,
                        size=remote.body_size,
                    )
                )
                break
            except PreconditionFailed:
                # Another machine stored a new version under the old name since we looked:
                # rename (and link) copies what the name holds now, as a local disk would. Not
                # while this mount is writing the file or has a version of it to upload.
                if attempt == RENAME_ATTEMPTS - 1 or node.writers or node.w.busy:
                    raise
                self.fs.writes.release_if_idle(node)  # its write-back file: an old version
                if node.w.staging is not None:
                    raise
                try:
                    head = await self.fs._thread(self.fs.store.head, old_key)
                except ObjectNotFound:
                    raise NoSuchEntry(f"{old_key} was deleted by another client") from None
                self.fs._replace_remote(node, head)
        return etag, mpu

    async def _rename_dir(self, node: Node, new_path: str, target: Node | None) -> None:
        """Copy every object under the directory, then delete the originals (not atomic)."""
        old_prefix = self.fs.dir_prefix(node.path)
        new_prefix = self.fs.dir_prefix(new_path)
        for n in list(self.fs.nodes.by_path.values()):
            if n.path.startswith(node.path + "/") and not n.is_dir:
                await self._settle(n)
        await self.fs.uploader.wait_all(self.fs.uploader.pending_under(old_prefix))
        await self._records_settled()

        marker_meta = node.posix_attrs().encode()

        def listed() -> dict[str, int]:
            return {
                o.key: o.size
                for page in self.fs.store.list_all(old_prefix, None)
                for o in page.objects
            }

        sizes = await self.fs._thread(listed)
        self._check_moved_keys(node, new_path, list(sizes))

        def move_all() -> dict[str, str]:
            etags: dict[str, str] = {}
            keys = list(sizes)
            if node.has_marker and old_prefix not in keys:
                keys.append(old_prefix)
            for key in keys:
                new_key = new_prefix + key[len(old_prefix) :]
                try:
                    if key.endswith("/"):
                        # markers hold no data; some servers cannot copy them
                        etags[key] = self.fs.store.put(new_key, b"", marker_meta)
                    elif key + gw.MPU_SUFFIX in sizes:
                        # maybe a gateway multipart object: its pointer must follow it
                        head = self.fs.store.head(key).metadata or {}
                        meta = None  # None: the copy keeps the object's metadata
                        if gw.is_mpu_object(head):
                            meta = {**head, "encryption-fallback-ptr": new_key + gw.MPU_SUFFIX}
                        etags[key] = self.fs.store.copy(key, new_key, meta, size=sizes.get(key))
                    else:
                        etags[key] = self.fs.store.copy(key, new_key, size=sizes.get(key))
                except ObjectNotFound:
                    continue
            # the old marker goes last, whether or not the listing showed it (servers that keep
            # folders would otherwise keep the old directory alive). Deepest keys first: such
            # servers do not delete a subdirectory marker while it still has children.
            for key in sorted(set(keys) | {old_prefix}, reverse=True):
                with contextlib.suppress(ObjectNotFound):
                    self.fs.store.delete(key)
            return etags

        if target is not None and target.has_marker:
            with contextlib.suppress(ObjectNotFound):
                await self.fs._thread(self.fs.store.delete, self.fs.dir_prefix(target.path))
        etags = await self.fs._thread(move_all)
        await self._move_indexes(node.path, new_path, etags)
        if not node.has_marker:
            # An implicit directory exists only through its objects: keep an empty one alive.
            page = await self.fs._thread(self.fs.store.list, new_prefix, "/", None)
            if not page.objects and not page.prefixes:
                attrs = node.posix_attrs().encode()
                await self.fs._thread(lambda: self.fs.store.put(new_prefix, b"", attrs))
                node.has_marker = True
        for n in list(self.fs.nodes.by_path.values()):
            if n.path != node.path and not n.path.startswith(node.path + "/"):
                continue
            n.listing = None
            if n.remote is None:
                continue
            version = n.copied_to(etags.get(self.fs.key(n.path)) or n.remote.etag)
            if version is not None:
                self.fs.reader.forget(version)

    def _check_moved_keys(self, node: Node, new_path: str, keys: list[str]) -> None:
        """ENAMETOOLONG, before anything is copied, when moving directory *node* to *new_path*
        would give an object below it (*keys*, just listed, or a file not in S3 yet) a key over
        1024 bytes."""
        old_prefix = self.fs.dir_prefix(node.path)
        grow = len(self.fs.dir_prefix(new_path).encode()) - len(old_prefix.encode())
        if grow <= 0:
            return
        local = [
            self.fs.dir_prefix(n.path) if n.is_dir else self.fs.key(n.path)
            for n in self.fs.nodes.by_path.values()
            if n.path.startswith(node.path + "/")
        ]
        longest = max([*keys, *local], key=lambda k: len(k.encode()), default="")
        size = len(longest.encode()) + grow
        if size > limits.KEY_MAX:
            raise NameTooLong(
                f"moving {old_prefix} to {self.fs.dir_prefix(new_path)} would make the key of "
                f"{longest[len(old_prefix) :]} {size} bytes long (at most {limits.KEY_MAX})"
            )

    async def _move_indexes(
        self,
        old_path: str,
        new_path: str,
        etags: dict[str, str],
    ) -> None:
        """Carry a renamed tree's attribute indexes to the new paths (each is sealed per path)."""
        if self.fs.opts.read_only:
            return
        dirs = {old_path}
        for key in etags:
            rel = key[len(self.fs.prefix) :]
            if rel.endswith("/"):
                rel = rel.rstrip("/") + "/."  # a marker: its directory is itself
            while "/" in rel:
                rel = rel.rsplit("/", 1)[0]
                if rel != old_path and not rel.startswith(old_path + "/"):
                    break
                dirs.add(rel)
        for d in sorted(dirs):
            entries = await self.fs.index.load(d)
            self.fs.index.forget_dir(d)
            new_d = new_path + d[len(old_path) :]
            for name, entry in entries.items():
                if entry.is_dir or name == SELF:
                    self.fs.index.note(new_d, name, entry)
                    continue
                new_etag = etags.get(self.fs.key(child_path(d, name)))
                if new_etag:
                    self.fs.index.note(new_d, name, dataclasses.replace(entry, etag=new_etag))

    async def link(self, ino: int, new_parent: int, new_name: str) -> Node:
        """A hard link, with --hard-links copy: the new name gets a copy of the file (a
        server-side copy of what S3 holds once the file's newest content is there), and the
        two names are separate files from then on. Otherwise refused (EPERM)."""
        if self.fs.opts.hard_links != "copy":
            # A name no key can hold says so first, as it does for every other new name.
            self.fs._check_name(self.fs.node(new_parent), new_name)
            raise NotPermitted("hard links are not supported (--hard-links copy stores copies)")
        node = self.fs.node(ino)
        if node.is_dir or node.unlinked:
            raise NotPermitted() if node.is_dir else NoSuchEntry()
        parent, path = await self._new_name(new_parent, new_name, False)
        if node.w.unsealed:
            # What the file holds now, even while it is open for writing (like fsync).
            await self.fs.writes.commit(node)
        await self._settle(node)
        if node.remote is None:
            raise NoSuchEntry(f"{self.fs.key(node.path)} is not in S3")
        etag, _ = await self._copy_object(node, self.fs.key(node.path), self.fs.key(path))
        remote = node.remote
        now = now_ns()
        copy = Node(self.fs.nodes.new_ino(), path, node.mode, node.uid, node.gid, node.mtime_ns)
        copy.ctime_ns = now
        copy.mode_set_here = node.mode_set_here
        copy.size = node.size
        copy.link_target = node.link_target
        info = ChildInfo(False, remote.body_size, etag)
        copy.set_remote(info, node.metadata, node.attrs_known)
        self.fs.nodes.add(copy)
        self.fs.listing.add(parent, new_name, info)
        self.fs.listing.note(copy)
        self.fs.listing.entries_changed(parent, now)
        return copy

    async def mknod(
        self, parent_ino: int, name: str, mode: int, rdev: int, uid: int, gid: int
    ) -> Node:
        """A FIFO, socket or device node (or an empty regular file): an empty object whose
        mode, and for a device its number, are in its metadata and the directory index."""
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, *md.SPECIAL_TYPES):
            raise InvalidRequest(f"mknod of file type {kind:o}")
        parent, path = await self._new_name(parent_ino, name, False)
        now = now_ns()
        gid, mode = inherited_group(parent, gid, kind | (mode & 0o7777))
        attrs = md.PosixAttrs(mode, uid, gid, now, rdev if md.is_device(mode) else None)
        key = self.fs.key(path)
        with self.fs.codec.fence():
            body, meta = await self.fs._thread(
                lambda: self.fs.codec.seal_bytes(b"", attrs, key, content=True)
            )
            etag = await self.fs._thread(
                lambda: self.fs.store.put(key, body, meta, if_none_match=True)
            )
        node = Node(self.fs.nodes.new_ino(), path, mode, uid, gid, now, now)
        node.mode_set_here = True
        node.rdev = attrs.rdev or 0
        info = ChildInfo(False, len(body), etag, now)
        node.set_remote(info, meta, attrs_known=True)
        self.fs.nodes.add(node)
        self.fs.listing.note(node)
        self.fs.listing.add(parent, name, info)
        self.fs.listing.entries_changed(parent, now)
        return node
