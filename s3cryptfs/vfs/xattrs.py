"""Extended attributes (``user.*``) of files and directories, kept as on a local disk.

Where they live (docs/FORMAT.md 6.1 and 8.5): a file's set is sealed under its own data key in
its object's user metadata (``s3cryptfs-xattrs``), so a change is a metadata-only copy like a
chmod, rides with a version not uploaded yet, follows the file through renames and is sealed
again under the new data key of every new version. A directory's set is in its entry of the
(sealed) directory index, like its mode: directory markers lose their metadata on some stores.
Symbolic links have none: Linux refuses ``user.*`` on them (EPERM) before asking us.

The mount's own control attributes (``user.s3cryptfs.*``, fuse_ops.py) are not stored here and
never listed; they cannot be set or removed as ordinary attributes either.

The metadata-only change that stores a file's attributes (chmod, chown, touch, setxattr) is
here too (persist). Split out of vfs/core.py: the Filesystem delegates these here, and they
work on its nodes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from s3cryptfs.errors import (
    AttributeNameTooLong,
    AttributesFull,
    AttributeTooLarge,
    IntegrityError,
    InvalidRequest,
    NoAttribute,
    NoSuchEntry,
    NotPermitted,
    NotSupported,
    strip_subject,
)
from s3cryptfs.format import xattrs as xa
from s3cryptfs.vfs.nodes import ROOT_INODE, ChildInfo, Node, now_ns

if TYPE_CHECKING:
    from s3cryptfs.vfs.core import Filesystem

log = logging.getLogger(__name__)


def check_name(name: bytes) -> None:
    """Refuse a name that cannot be stored, with the errno Linux gives for it."""
    if not name.startswith(xa.PREFIX) or name.startswith(xa.RESERVED):
        raise NotSupported()  # other namespaces, and the mount's control names
    if len(name) > xa.NAME_MAX:
        raise AttributeNameTooLong()
    if len(name) == len(xa.PREFIX) or b"\x00" in name:
        raise InvalidRequest("an extended attribute name needs something after user.")


def decoded(raw: bytes) -> dict[bytes, bytes]:
    """A set from a directory index entry (checked when the index was read)."""
    return xa.decode_set(raw) if raw else {}


class Xattrs:
    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    @staticmethod
    def _lock(node: Node) -> trio.Lock:
        """One change at a time per node: read, change, store must not interleave."""
        lock = node.xattrs_lock
        if lock is None:
            lock = node.xattrs_lock = trio.Lock()
        return lock

    async def of(self, node: Node) -> dict[bytes, bytes]:
        """The extended attributes of *node* (a file's are read from its newest version's
        metadata once, and opened under its data key: may HEAD, may call a KMS)."""
        if node.is_link:
            return {}
        if node.is_dir:
            if node.ino == ROOT_INODE and node.index is None:
                await self.fs.listing.dir_index(node)  # the root's own entry is in its index
            if node.xattrs is None:
                node.xattrs = {}
            return node.xattrs
        while node.xattrs is None:
            local, remote = node.w.local, node.remote
            if local is not None:
                meta = local.metadata
            elif remote is not None:
                if node.metadata is None:
                    await self.fs.listing.head_metadata(node)
                    if node.remote is not remote or node.w.local is not local:
                        continue  # another version meanwhile: look again
                meta = node.metadata or {}
            else:
                node.xattrs = {}  # never stored: a new file
                break
            if xa.META_NAME not in meta:
                found: dict[bytes, bytes] = {}
            else:
                key = self.fs.key(node.path)
                found = await self.fs._thread(self.fs.codec.open_xattrs, meta, key)
            if node.xattrs is None and node.remote is remote and node.w.local is local:
                node.xattrs = found
            else:
                return found
        return node.xattrs

    # --- the requests (fuse_ops.py) ------------------------------------------------------

    async def listxattr(self, ino: int) -> list[bytes]:
        return sorted(await self.of(self.fs.node(ino)))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        value = (await self.of(self.fs.node(ino))).get(name)
        if value is None:
            raise NoAttribute()
        return value

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        await self.set(self.fs.node(ino), name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        await self.remove(self.fs.node(ino), name)

    # --- changes -------------------------------------------------------------------------

    async def for_new_version(self, node: Node) -> dict[bytes, bytes]:
        """What a new version of the file carries (the write path asks before sealing): those
        of its current version, unless they do not authenticate: then none, or the file could
        never be written again."""
        try:
            return await self.of(node)
        except IntegrityError as exc:
            key = self.fs.key(node.path)
            log.error(
                "%s: its extended attributes are dropped from its new version: %s",
                key,
                strip_subject(exc, key),
            )
            node.xattrs = {}
            return {}

    def limit(self, node: Node) -> int:
        """Bytes of encoded attributes *node* has room for."""
        if node.is_dir:
            return xa.SET_MAX
        local, remote = node.w.local, node.remote
        meta = local.metadata if local is not None else node.metadata if remote else None
        return self.fs.codec.xattrs_limit(meta)

    async def set(self, node: Node, name: bytes, value: bytes) -> None:
        check_name(name)
        if len(value) > xa.VALUE_MAX:
            raise AttributeTooLarge()
        self.fs._writable()
        if node.is_link:
            raise NotPermitted("extended attributes of symbolic links")  # as Linux says
        async with self._lock(node):
            wanted = {**await self.of(node), name: value}
            if xa.encoded_size(wanted) > self.limit(node):
                raise AttributesFull(
                    f"{self.fs.key(node.path)}: the extended attributes would take "
                    f"{xa.encoded_size(wanted)} bytes, more than the {self.limit(node)} a "
                    "file or directory holds"
                )
            await self._store(node, wanted)

    async def remove(self, node: Node, name: bytes) -> None:
        check_name(name)
        self.fs._writable()
        async with self._lock(node):
            current = await self.of(node)
            if name not in current:
                raise NoAttribute()
            await self._store(node, {n: v for n, v in current.items() if n != name})

    async def _store(self, node: Node, wanted: dict[bytes, bytes]) -> None:
        before = node.xattrs
        node.xattrs = wanted
        node.ctime_ns = now_ns()
        if node.is_dir:
            self.fs.listing.note(node)  # the index entry carries them
            return
        try:
            await self.fs._persist_attrs(node, xattrs_changed=True)
        except BaseException:
            if node.xattrs is wanted:
                node.xattrs = before
            raise

    # --- the metadata of a file's newest version -------------------------------------------

    def newest_metadata(self, node: Node) -> dict[str, str]:
        """The metadata of the file's newest version, as far as known ({} if not)."""
        if node.w.local is not None:
            return node.w.local.metadata
        return (node.metadata if node.remote is not None else None) or {}

    async def persist(self, node: Node, xattrs_changed: bool = False) -> None:
        """Store mode/owner/mtime (and with *xattrs_changed*, the extended attributes) in the
        object's metadata, without re-uploading data."""
        fs = self.fs
        if node.w.unsealed:
            return  # the next commit carries them
        key = fs.key(node.path)
        local = node.w.local
        if local is not None:
            meta = await self._new_metadata(node, local.metadata, xattrs_changed)
            if fs.uploader.update_metadata(key, meta):
                local.metadata = meta
                return
            await fs.uploader.wait(local, raise_errors=False)
        if node.remote is None:
            return
        if node.metadata is None:
            # What was just set must survive the HEAD, which applies the stored attributes
            # (attributes from the directory index come without the object's metadata).
            wanted = (node.mode, node.uid, node.gid, node.mtime_ns, node.mode_set_here)
            xattrs = node.xattrs
            await fs.listing.head_metadata(node)
            node.mode, node.uid, node.gid, node.mtime_ns, node.mode_set_here = wanted
            if xattrs_changed:
                node.xattrs = xattrs
            if node.metadata is None:
                # Gone, or another version than the one this mount writes from: a copy would
                # lose the envelope. A file written here carries them in its next version.
                if node.w.staging is None:
                    raise NoSuchEntry(f"{key} is not in S3")
                node.w.dirtied()
                if node.writers == 0:
                    await fs.writes.seal_closed(node, tell=True)
                return
        remote = node.remote
        assert remote is not None
        meta = await self._new_metadata(node, node.metadata or {}, xattrs_changed)
        etag = await fs._thread(
            lambda: fs.store.copy(key, key, meta, src_etag=remote.etag, size=remote.body_size)
        )
        old_version = node.version if node.remote is remote else None
        node.set_remote(ChildInfo(False, remote.body_size, etag), meta, attrs_known=True)
        node.version = old_version
        fs.listing.note(node)
        if old_version is not None:
            # Same bytes, new ETag: keep the cached chunks, fetch by the new ETag.
            old_version.fetch = fs._fetcher(key, etag)

    async def _new_metadata(
        self, node: Node, base: dict[str, str], xattrs_changed: bool
    ) -> dict[str, str]:
        """*base* (the metadata of the file's newest version) with the node's attributes; with
        *xattrs_changed*, its extended attributes sealed anew under that version's data key."""
        meta = {**base, **node.posix_attrs().encode()}
        if not xattrs_changed:
            return meta
        key = self.fs.key(node.path)
        wanted = node.xattrs or {}
        meta = await self.fs._thread(self.fs.codec.seal_xattrs, meta, wanted, key)
        if wanted and xa.metadata_size(meta) > xa.METADATA_MAX:
            raise AttributesFull(
                f"{key}: its metadata would take {xa.metadata_size(meta)} bytes with these "
                f"extended attributes, more than the {xa.METADATA_MAX} S3 allows"
            )
        return meta
