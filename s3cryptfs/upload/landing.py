"""Versions landing: what the write path does when the uploader finishes one of a file's
versions (in S3, or saved as a conflict copy because another writer got in first), and the
state a file shows meanwhile. WritePath (files.py) takes this part as a base class, as it
takes KeptClosed (keep.py): the same files, split off to keep each module to one job.
"""

from __future__ import annotations

from typing import Any

from s3cryptfs.cache.reader import Reader
from s3cryptfs.upload.journal import Entry
from s3cryptfs.upload.state import Written
from s3cryptfs.upload.uploader import Uploader


class Landing:
    """The uploads-landing part of WritePath (which sets these attributes)."""

    uploader: Uploader
    reader: Reader
    callbacks: Any  # files.WriteCallbacks

    def key(self, f: Written) -> str:
        raise NotImplementedError

    def release_if_idle(self, f: Written) -> None:
        raise NotImplementedError

    async def _uploaded(self, entry: Entry) -> None:
        """The uploader finished *entry*: the file's content now lives in S3."""
        f = self.callbacks.find(entry.key)
        if f is None or f.w.local is not entry:
            return
        w = f.w
        w.local = None
        if w.local_version is not None:
            self.reader.forget(w.local_version)
        w.local_version = None
        await self.callbacks.uploaded(f, entry)  # no local version any more: S3 has it
        self.release_if_idle(f)

    async def _conflicted(self, entry: Entry) -> None:
        f = self.callbacks.find(entry.key)
        if f is None:
            return
        w = f.w
        if w.local is not entry:
            if w.local is not None:
                return  # a newer version is queued: it follows this one (uploader._next)
        else:
            w.local = None
            if w.local_version is not None:
                self.reader.forget(w.local_version)
            w.local_version = None
        w.diverted = entry
        await self.end_divergence(f)

    async def end_divergence(self, f: Written) -> None:
        """Once nobody writes a file whose versions went to a conflict copy and all of them
        are stored, the file is the other writer's version again (the core reads it anew):
        the next open and write start a new lineage, based on that version."""
        w = f.w
        entry = w.diverted
        if entry is None or f.writers or w.busy:
            return
        w.diverted = None
        await self.callbacks.conflicted(f, entry)

    def state_of(self, f: Written) -> str:
        """clean, dirty or uploading (the state attribute of a file)."""
        w = f.w
        if w.unsealed:
            return "dirty"
        if w.local is not None:
            entry = self.uploader.in_flight.get(self.key(f))
            return "uploading" if entry is w.local else "dirty"
        return "clean"
