"""Which version of a file S3 holds, as this mount knows it: checked again at open (another
machine may have replaced or deleted it since), and brought up to date when one of this
mount's versions lands or loses to another writer's (docs/SEMANTICS.md, "Several machines on
one volume").

Split out of vfs/core.py: the Filesystem delegates these here, and they work on its nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from s3cryptfs.errors import NoSuchEntry, ObjectNotFound, ObjectTooLarge, S3CryptFSError
from s3cryptfs.upload.journal import Entry
from s3cryptfs.vfs.nodes import ChildInfo, Node

if TYPE_CHECKING:
    from s3cryptfs.vfs.core import Filesystem
    from s3cryptfs.vfs.smallfiles import Whole


class Versions:
    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        # Files whose version lost while S3 is asked what the name holds now (conflicted):
        # a read meanwhile waits for the answer rather than fail for the version that lost.
        self._settling: dict[Node, trio.Event] = {}

    async def settled(self, node: Node) -> None:
        """Returns once no look at S3 for *node*'s lost version is under way."""
        while (settling := self._settling.get(node)) is not None:
            await settling.wait()

    async def revalidate(self, node: Node, recreate: bool = False) -> bool:
        """Before opening: is the object still what we cached? Returns True if unchanged.
        Asked again under the new name when this mount renamed the file while S3 answered
        (not found under the old one: that says nothing of the file)."""
        for _ in range(3):
            path = node.path
            try:
                return await self._revalidate(node, recreate)
            except NoSuchEntry:
                if node.path == path:
                    raise
        return await self._revalidate(node, recreate)

    async def _revalidate(self, node: Node, recreate: bool) -> bool:
        """*recreate*: if another machine deleted it, the file becomes a new one here (an open
        that truncates needs none of the old content; its version is created with
        If-None-Match, so a file made there meanwhile wins and this one becomes a copy)."""
        if node.w.local is not None or node.w.staging is not None:
            return True
        # No version in S3 known here: a file made here. Unless its version just lost to
        # another machine's (node.error, until Versions.conflicted has asked what the name
        # holds): then this open asks, rather than fail for the version that lost.
        unknown = node.remote is None
        if unknown and not node.error:
            return True
        key = self.fs.key(node.path)
        small = self.fs.small
        got = await small.take(key)
        whole: Whole | None = None
        try:
            known = node.remote
            if got is not None and known and got.info.etag == known.etag and small.trusted(got):
                head = got.info  # fetched ahead within --file-cache-ttl: no request
            elif got is None and small.whole(node) and not small.cached(node):
                try:
                    whole = await small.fetch(key)  # ETag, metadata and body at once
                    head = whole.info
                except ObjectTooLarge:  # it grew since it was listed
                    head = await self.fs._thread(self.fs.store.head, key)
            else:
                head = await self.fs._thread(self.fs.store.head, key)
        except ObjectNotFound:
            if self.fs.key(node.path) != key:
                raise NoSuchEntry() from None  # renamed here meanwhile: revalidate asks again
            if recreate:
                self._as_new(node)
                return False
            self._deleted_elsewhere(node)
            raise NoSuchEntry(f"{key} was deleted by another client") from None
        remote = node.remote
        made_here = remote is None and not unknown
        if made_here or node.w.local is not None or node.w.staging is not None:
            # Written here while S3 answered (another handle's truncating open): the file is
            # what this mount wrote, whatever the answer says of the version before.
            if got is not None:
                self.fs.reader.forget(got.version)
            return True
        changed = remote is None or head.etag != remote.etag
        if got is not None and got.info.etag == head.etag:
            # What a scan fetched ahead is still the object: it becomes the node's version.
            if changed or node.metadata is None:
                self.fs._replace_remote(node, head)
                await self.fs.listing.companion_size(node)
            assert node.remote is not None
            node.version = got.version
            small.ahead_used += 1
            return not changed
        if got is not None:
            self.fs.reader.forget(got.version)
        if not changed and node.metadata is not None and whole is None:
            return True
        if changed or node.metadata is None:
            self.fs._replace_remote(node, head)
            await self.fs.listing.companion_size(node)
        if whole is not None and small.whole(node):  # (not a gateway multipart object)
            small.install(node, whole)
        return not changed

    def reattach(self, node: Node) -> None:
        """A file deleted by another machine becomes a new one here again (a truncating
        open through the kernel's old inode)."""
        node.unlinked = node.deleted_elsewhere = False
        self.fs.nodes.add(node)
        self._as_new(node)
        parent = self.fs.nodes.at(node.parent_path)
        if parent is not None:
            self.fs.listing.add(parent, node.name, ChildInfo(False))

    async def uploaded(self, node: Node, entry: Entry) -> None:
        """A version of *node* reached S3: it is the remote version now."""
        self.fs.small.forget_key(entry.key)  # (fetched ahead: an older version)
        # (no reader's version yet: the local body is read until it is gone, its chunks
        # cached under its own vid)
        info = ChildInfo(False, entry.body_size, entry.etag or "")
        node.set_remote(info, dict(entry.metadata), attrs_known=True)
        self.fs.unsynced.discard(node)
        self.fs.listing.note(node)
        parent = self.fs.nodes.at(node.parent_path)
        if parent is not None:
            self.fs.listing.add(parent, node.name, info)  # (one entry for both)

    async def conflicted(self, node: Node, entry: Entry) -> None:
        """This mount's version went to a conflict copy: the name is the other writer's."""
        error = node.error = str(entry.error)
        self.fs.unsynced.discard(node)
        known = node.remote
        settling = self._settling[node] = trio.Event()
        try:
            head = await self.fs._thread(self.fs.store.head, entry.key)
        except ObjectNotFound:
            head = None
        except S3CryptFSError:
            return  # node.error says why reads fail, until an open finds the new version
        finally:
            if self._settling.get(node) is settling:
                del self._settling[node]
            settling.set()
        if self._moved_on(node, known):
            # Opened, written or looked at anew while S3 answered: what that open found is
            # newer than this answer, and a version written since is the file's now.
            if node.error == error:
                node.error = None
            return
        node.error = None
        if head is None:
            self._deleted_elsewhere(node)  # the other writer deleted it (ours is in the copy)
        else:
            self.fs._replace_remote(node, head)

    @staticmethod
    def _moved_on(node: Node, known: ChildInfo | None) -> bool:
        """Whether *node* changed here since its version in S3 was *known*: an answer about
        that version from a request begun then is stale."""
        return (
            node.remote is not known or node.writers > 0 or node.w.busy or node.unlinked
        )

    def _as_new(self, node: Node) -> None:
        """No version in S3 any more: the next upload creates it (If-None-Match)."""
        if node.remote is not None and node.version is not None:
            self.fs.reader.forget(node.version)
        node.remote = None
        node.size = 0
        node.error = None  # (of the version before)
        if node.xattrs is None:
            node.xattrs = {}  # (their version is gone)
        self.fs.unsynced.add(node)

    def _deleted_elsewhere(self, node: Node) -> None:
        self.fs.nodes.detach(node)
        node.unlinked = node.deleted_elsewhere = True
        self.fs.listing.remove(node.parent_path, node.name)
