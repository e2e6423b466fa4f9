"""What the rest of s3cryptfs may use of an object store: the `ObjectStore` protocol and the
values that cross it. Only the composition root (mount.make_store, store.open_store) names an
implementation (store/s3.py: boto3; store/native.py: the AWS CRT data path)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from s3cryptfs import limits
from s3cryptfs.errors import StoreError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime_ns: int
    metadata: dict[str, str] | None = None  # None: not known (LIST does not return it)


@dataclass(frozen=True)
class PendingGet:
    """The one request of a get_bounded sent without waiting for it (get_bounded_start)."""

    # The object and its metadata, or any error: then ask get_bounded, which retries and
    # classifies (nothing is retried or classified here).
    done: concurrent.futures.Future[tuple[bytes, ObjectInfo]]
    # Give up on a reply that does not come (the client has no read timeout of its own): its
    # connection is closed.
    abandon: Callable[[], None]


@dataclass
class ListPage:
    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    token: str | None = None
    # The server's clock when it answered (its Date header), in ns: ages of objects are
    # measured against it, never against this machine's clock.
    server_time_ns: int | None = None


@dataclass(frozen=True)
class StoreSettings:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    # Total time one operation may spend retrying transient errors before it fails.
    retry_deadline: float = 45.0
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    max_connections: int = 64
    part_size: int = 8 * 1024 * 1024
    multipart_threshold: int = 32 * 1024 * 1024
    # Parts of one multipart upload in flight. Each holds a part-sized buffer (8 MiB) until
    # the server has it; on a server that takes about 100 MiB/s six keep it busy as well as
    # ten did, and a 1 GiB copy's peak RSS went from about 290 to 250 MiB.
    part_concurrency: int = 6
    copy_threshold: int = 5 * 1024**3  # CopyObject's limit
    copy_part_size: int = 512 * 1024 * 1024
    client: str = "boto3"  # --s3-client: which implementation carries the data path


# (part number, ETag)
PartList = list[tuple[int, str]]


def etag_of(raw: str) -> str:
    """ETags in one spelling: quoted, as HEAD and LIST give them (some servers' CopyObject
    results drop the quotes), so ETags from different calls compare equal."""
    if raw and not raw.startswith(('"', 'W/"')):
        return f'"{raw}"'
    return raw


def conditions(if_match: str | None, if_none_match: bool) -> dict[str, str]:
    """The conditions of a write, as complete_multipart takes them."""
    cond: dict[str, str] = {}
    if if_match:
        cond["IfMatch"] = if_match
    elif if_none_match:
        cond["IfNoneMatch"] = "*"
    return cond


class ObjectStore(Protocol):
    """One bucket, blocking calls (made from worker threads), one retry policy. Every failure
    leaves as one of the StoreError kinds of ``s3cryptfs.errors``; a server error is never
    reported as "not found"."""

    settings: StoreSettings
    bucket: str
    # Counters for status and metrics, read and written under stats_lock.
    stats_lock: threading.Lock
    requests: dict[str, int]
    errors: dict[str, int]
    bytes_sent: int
    bytes_received: int

    def count_sent(self, n: int) -> None: ...

    def with_retry_deadline(self, seconds: float) -> ObjectStore:
        """The same store (client, statistics) with a shorter retry deadline."""
        ...

    def check_bucket(self, definitive_after: float | None = None) -> None: ...

    def head(self, key: str) -> ObjectInfo: ...

    def head_many(
        self, keys: Iterable[str], concurrency: int
    ) -> Iterator[tuple[str, ObjectInfo | StoreError]]:
        """head of many keys at once, as they finish; a key's error is yielded, not raised."""
        ...

    def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        if_match: str | None = None,
    ) -> bytes:
        """Bytes [start, end] (inclusive) of *key*; PreconditionFailed if its ETag changed."""
        ...

    def get_bounded(self, key: str, limit: int, what: str) -> tuple[bytes, ObjectInfo]:
        """The whole object with its metadata, in one request, if it is at most *limit* bytes;
        a larger one is refused (ObjectTooLarge) before its body is read."""
        ...

    def get_bounded_start(self, key: str, limit: int, what: str) -> PendingGet | None:
        """get_bounded's first request, sent without blocking the caller, for an event loop
        that would rather not hand a small read to a thread and back; None when this store
        cannot. Only its simple case ends in a result: an object the one request brought
        whole."""
        ...

    def read_companion(self, key: str) -> tuple[dict[str, str], bytes]: ...

    def list(
        self,
        prefix: str,
        delimiter: str | None = "/",
        token: str | None = None,
        start_after: str | None = None,
    ) -> ListPage: ...

    def list_all(
        self, prefix: str, delimiter: str | None = "/", start_after: str | None = None
    ) -> Iterator[ListPage]: ...

    def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Write *key* whole; returns the new ETag."""
        ...

    def upload_file(
        self,
        key: str,
        path: str,
        metadata: Mapping[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        offset: int = 0,
        size: int | None = None,
    ) -> str: ...

    def create_multipart(
        self, key: str, metadata: Mapping[str, str], content_type: str = "application/octet-stream"
    ) -> str: ...

    def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes | bytearray
    ) -> str: ...

    def complete_multipart(
        self, key: str, upload_id: str, parts: PartList, conditions: Mapping[str, str]
    ) -> str: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...

    def copy(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str] | None = None,
        src_etag: str | None = None,
        content_type: str = "application/octet-stream",
        size: int | None = None,
    ) -> str: ...

    def delete(self, key: str) -> None: ...


class PagedReads:
    """What both stores build the same way on their own list and get_bounded: paging through
    a listing, and reading a gateway multipart object's manifest."""

    def list(
        self,
        prefix: str,
        delimiter: str | None = "/",
        token: str | None = None,
        start_after: str | None = None,
    ) -> ListPage:
        raise NotImplementedError

    def get_bounded(self, key: str, limit: int, what: str) -> tuple[bytes, ObjectInfo]:
        raise NotImplementedError

    def get_bounded_start(self, key: str, limit: int, what: str) -> PendingGet | None:
        return None  # (a client that can send without blocking says otherwise)

    def list_all(
        self, prefix: str, delimiter: str | None = "/", start_after: str | None = None
    ) -> Iterator[ListPage]:
        token = None
        while True:
            page = self.list(prefix, delimiter, token, start_after)
            yield page
            if not page.token:
                return
            token = page.token

    def head(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def head_many(
        self, keys: Iterable[str], concurrency: int
    ) -> Iterator[tuple[str, ObjectInfo | StoreError]]:
        """head of every key, *concurrency* at a time, in the order they finish; the errors
        head raises are yielded with their key. A thread per HEAD: a client that can send
        requests without a thread each does better (NativeStore)."""
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = {pool.submit(self.head, key): key for key in keys}
            for done in concurrent.futures.as_completed(futures):
                try:
                    yield futures[done], done.result()
                except StoreError as exc:
                    yield futures[done], exc

    def read_companion(self, key: str) -> tuple[dict[str, str], bytes]:
        """Metadata and body of a gateway multipart object's manifest (bounded; blocking)."""
        body, info = self.get_bounded(key, limits.MPU_MANIFEST_MAX, "multipart manifest")
        return info.metadata or {}, body
