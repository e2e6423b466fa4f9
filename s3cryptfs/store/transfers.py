"""Large uploads and copies, built once on the multipart primitives that each store implements
(store/s3.py on boto3, store/native.py on awscrt): a file above the multipart threshold goes up
in parallel parts, an object above CopyObject's limit is copied part by part, and a failed
session is aborted so that no half-written object ever becomes visible."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from s3cryptfs.errors import PreconditionFailed
from s3cryptfs.store.base import ObjectInfo, PartList, StoreSettings
from s3cryptfs.store.base import conditions as write_conditions

MIN_PART = 5 * 1024 * 1024


class MultipartTransfers:
    settings: StoreSettings

    # --- what each store implements -------------------------------------------------------

    def head(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/octet-stream",
    ) -> str:
        raise NotImplementedError

    def create_multipart(
        self, key: str, metadata: Mapping[str, str], content_type: str = "application/octet-stream"
    ) -> str:
        raise NotImplementedError

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        raise NotImplementedError

    def complete_multipart(
        self, key: str, upload_id: str, parts: PartList, conditions: Mapping[str, str]
    ) -> str:
        raise NotImplementedError

    def abort_multipart(self, key: str, upload_id: str) -> None:
        raise NotImplementedError

    def copy_object(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str] | None,
        src_etag: str | None,
        content_type: str,
    ) -> str:
        """One CopyObject (at most copy_threshold bytes); the new ETag."""
        raise NotImplementedError

    def upload_part_copy(
        self,
        src: str,
        dst: str,
        upload_id: str,
        number: int,
        first: int,
        last: int,
        src_etag: str | None,
    ) -> str:
        """Bytes [first, last] of *src* as part *number* of *dst*; the part's ETag."""
        raise NotImplementedError

    # --- built on them ----------------------------------------------------------------------

    @staticmethod
    def conditions(if_match: str | None, if_none_match: bool) -> dict[str, str]:
        return write_conditions(if_match, if_none_match)

    def upload_file(
        self,
        key: str,
        path: str,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        offset: int = 0,
        size: int | None = None,
    ) -> str:
        """Upload a local file (or *size* bytes of it from *offset*) as *key*, multipart with
        parallel parts when it is large."""
        if size is None:
            size = os.path.getsize(path) - offset
        if size < self.settings.multipart_threshold:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
            if len(data) != size:
                raise OSError(f"{path}: shorter than expected")
            return self.put(key, data, metadata, if_match, if_none_match)
        if offset:
            raise ValueError("a large body is a file of its own")
        return self._multipart(key, path, size, metadata, if_match, if_none_match)

    def _multipart(
        self,
        key: str,
        path: str,
        size: int,
        metadata: Mapping[str, str],
        if_match: str | None,
        if_none_match: bool,
    ) -> str:
        part_size = max(self.settings.part_size, MIN_PART, -(-size // 10000))
        fd = os.open(path, os.O_RDONLY)
        try:

            def send(upload_id: str, number: int) -> str:
                offset = (number - 1) * part_size
                data = os.pread(fd, min(part_size, size - offset), offset)
                return self.upload_part(key, upload_id, number, data)

            return self._multipart_session(
                key,
                metadata,
                "application/octet-stream",
                -(-size // part_size),
                send,
                self.conditions(if_match, if_none_match),
            )
        finally:
            os.close(fd)

    def _multipart_session(
        self,
        key: str,
        metadata: Mapping[str, str],
        content_type: str,
        count: int,
        send: Callable[[str, int], str],
        conditions: Mapping[str, str],
    ) -> str:
        """Create a multipart upload, send parts 1..count in parallel with send(upload_id, n)
        (which returns the part's ETag), complete it under *conditions*; abort on failure, so
        no half-written object ever becomes visible."""
        upload_id = self.create_multipart(key, metadata, content_type)
        try:
            with ThreadPoolExecutor(self.settings.part_concurrency) as pool:
                etags = list(pool.map(lambda n: send(upload_id, n), range(1, count + 1)))
            return self.complete_multipart(
                key, upload_id, list(enumerate(etags, start=1)), conditions
            )
        except BaseException:
            self.abort_multipart(key, upload_id)
            raise

    def copy(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str] | None = None,
        src_etag: str | None = None,
        content_type: str = "application/octet-stream",
        size: int | None = None,
    ) -> str:
        """Server-side copy; with *metadata*, replace the metadata. Returns the new ETag.

        CopyObject stops at 5 GiB: give *size* (the source's length) and larger objects are
        copied part by part (UploadPartCopy), still without their bytes passing through us."""
        if size is not None and size > self.settings.copy_threshold:
            return self._multipart_copy(src, dst, size, metadata, src_etag, content_type)
        return self.copy_object(src, dst, metadata, src_etag, content_type)

    def _multipart_copy(
        self,
        src: str,
        dst: str,
        size: int,
        metadata: Mapping[str, str] | None,
        src_etag: str | None,
        content_type: str,
    ) -> str:
        if metadata is None:  # a multipart copy does not carry the source's metadata over
            head = self.head(src)
            if src_etag and head.etag != src_etag:
                raise PreconditionFailed(f"copy {src}: the object changed")
            metadata = head.metadata or {}
            src_etag = src_etag or head.etag
        part_size = max(self.settings.copy_part_size, MIN_PART, -(-size // 10000))

        def send(upload_id: str, number: int) -> str:
            first = (number - 1) * part_size
            last = min(first + part_size, size) - 1
            return self.upload_part_copy(src, dst, upload_id, number, first, last, src_etag)

        return self._multipart_session(dst, metadata, content_type, -(-size // part_size), send, {})
