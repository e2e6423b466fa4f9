"""The S3 client on the AWS Common Runtime (awscrt): every object operation (HEAD, GET (ranged,
If-Match, bounded), LIST, PUT (conditional), DELETE, multipart uploads, CopyObject and
UploadPartCopy) and HeadBucket, as signed requests built here and sent over the CRT's HTTP
connections (store/crtconn.py) on its own threads (the GIL is held only to hand over headers
and body pieces). Large uploads
and copies are assembled from these requests by store/transfers.py, as for boto3. Request
bodies and ranged reads over BULK_BYTES go through a botocore store instead (see there).

The retry policy and the classification of replies are those of store/retry.py, as for boto3:
the CRT's errors and S3's error replies are mapped onto the same StoreError kinds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import email.utils
import functools
import hashlib
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar
from xml.sax.saxutils import escape

import awscrt.auth
import awscrt.exceptions
import awscrt.http

from s3cryptfs import limits
from s3cryptfs.errors import (
    AccessDenied,
    EndpointUnreachable,
    StoreError,
    TransientStoreError,
)
from s3cryptfs.store import listxml, retry
from s3cryptfs.store.base import (
    ListPage,
    ObjectInfo,
    PagedReads,
    PartList,
    PendingGet,
    StoreSettings,
    etag_of,
)
from s3cryptfs.store.crtconn import (
    Body,
    ConnectionPool,
    Endpoint,
    HttpError,
    PoolExhausted,
    credentials_provider,
)
from s3cryptfs.store.s3 import S3Store
from s3cryptfs.store.transfers import MultipartTransfers

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_META = "x-amz-meta-"
# CRT errors that say the endpoint cannot be reached at all (see retry.call's definitive_after).
_UNREACHABLE = ("AWS_IO_SOCKET_CONNECTION_REFUSED", "AWS_IO_DNS_", "AWS_IO_TLS_")
_NO_CREDENTIALS = "AWS_AUTH_"
# What get_bounded reads before it knows an object's size: what may be refused costs no more.
_FIRST_READ = 1024 * 1024


class _TimedOut(Exception):
    """No byte moved for read_timeout: the request was cancelled."""


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass
class _Reply:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    refused: BaseException | None = None  # raised by our own callbacks, to be re-raised


@dataclass
class _Sent:
    """A request the CRT is working on: its future, the reply being filled in, when a byte
    last moved (progress[0], monotonic), its connection (None: it failed before one was
    given) and whether that connection served a request before; *again* sends it anew."""

    done: concurrent.futures.Future[_Reply]
    reply: _Reply
    progress: list[float]
    conn: awscrt.http.HttpClientConnection | None = None
    reused: bool = False
    again: Callable[[], _Sent] | None = None
    # Taken by whoever gives the connection back first: the reply's end, or a waiter that
    # gives up on it (NativeStore._give_up), which must not close it once it serves another.
    once: threading.Lock = field(default_factory=threading.Lock)


def _waiting(
    start: Callable[Concatenate[NativeStore, P], _Sent],
) -> Callable[Concatenate[NativeStore, P], _Reply]:
    def send(store: NativeStore, /, *args: P.args, **kwargs: P.kwargs) -> _Reply:
        return store._wait(start(store, *args, **kwargs))

    return send


def classify(exc: BaseException, what: str) -> StoreError:
    """Map a CRT exception (or our own) to the StoreError kinds, by the rules of retry.py."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, HttpError):
        code, msg = listxml.error_code(exc.body)
        return retry.classify_reply(code, exc.status_code, msg or code, what)
    if isinstance(exc, (_TimedOut, PoolExhausted)):
        return TransientStoreError(f"{what}: S3 connection failed (no reply within the timeout)")
    if isinstance(exc, awscrt.exceptions.AwsCrtError):
        if exc.name.startswith(_UNREACHABLE):
            return EndpointUnreachable(f"{what}: cannot connect to the S3 endpoint ({exc.name})")
        if exc.name.startswith(_NO_CREDENTIALS):
            return AccessDenied(f"{what}: no S3 credentials found ({exc.name})")
        return TransientStoreError(f"{what}: S3 connection failed ({exc.name})")
    raise exc


def definitive(exc: BaseException) -> bool:
    """As store/s3.py's definitive, for CRT errors: refused, unknown host, TLS failure."""
    return isinstance(exc, awscrt.exceptions.AwsCrtError) and exc.name.startswith(_UNREACHABLE)


# Cached: objects written in one second share the header's text, and email.utils's parser
# costs about as much CPU as the rest of a HEAD's reply handling in Python.
@functools.lru_cache(maxsize=4096)
def _mtime_ns(value: str) -> int:
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp() * 1e9)
    except (TypeError, ValueError):
        return 0


# Request bodies and ranged reads past this size go through botocore (`_bulk`): the CRT copies
# every request body into buffers of its own, so a part in flight costs twice its size and the
# allocator keeps what it took (measured: ten 8 MiB parts at once, +90 MiB of resident memory
# against +3 MiB with botocore), and received bodies are gathered from Python callbacks. For
# a few large requests botocore's per-request CPU is no cost, and its CPU per GiB is as low.
BULK_BYTES = 1024 * 1024


class NativeStore(PagedReads, MultipartTransfers):
    """An ObjectStore on awscrt; see the module's docstring."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.stats_lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        # The botocore store of large transfers, made on first use (shared by the copies
        # with_retry_deadline makes, which is why it sits in a list).
        self._bulk_box: list[S3Store] = []
        self._bulk_lock = threading.Lock()
        # Held in a dict so that the copies with_retry_deadline makes count into the same one.
        self._moved = {"sent": 0, "received": 0}
        region = settings.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        if settings.endpoint_url:
            url = urllib.parse.urlsplit(settings.endpoint_url)
            https = url.scheme == "https"
            self._host = url.netloc
            self._base = f"{url.path.rstrip('/')}/{urllib.parse.quote(self.bucket)}"
            endpoint = Endpoint(url.hostname or "", url.port or (443 if https else 80), https)
        else:
            self._host = f"s3.{region}.amazonaws.com"
            self._base = f"/{urllib.parse.quote(self.bucket)}"
            endpoint = Endpoint(self._host, 443, True)
        if endpoint.https:
            endpoint = dataclasses.replace(endpoint, ca_bundle=os.environ.get("AWS_CA_BUNDLE"))
        credentials, fixed = credentials_provider()
        # Signing with fixed keys waits for nothing: get_bounded_start may sign on the caller's
        # event loop. A refresh of expiring ones may fetch from a server.
        self._fixed_credentials = fixed
        self._pool = ConnectionPool(
            endpoint,
            credentials,
            region,
            settings.max_connections,
            settings.connect_timeout,
        )

    # --- counters ---------------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        return self._moved["sent"]

    @bytes_sent.setter
    def bytes_sent(self, value: int) -> None:
        self._moved["sent"] = value

    @property
    def bytes_received(self) -> int:
        return self._moved["received"]

    @bytes_received.setter
    def bytes_received(self, value: int) -> None:
        self._moved["received"] = value

    def count_sent(self, n: int) -> None:
        with self.stats_lock:
            self._moved["sent"] += n

    def _count_received(self, n: int) -> None:
        with self.stats_lock:
            self._moved["received"] += n

    def with_retry_deadline(self, seconds: float) -> NativeStore:
        """As S3Store.with_retry_deadline: the same client and statistics, a shorter deadline."""
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, retry_deadline=seconds)
        return other

    def _bulk(self) -> S3Store:
        """The botocore store for large transfers, counting into this store's statistics."""
        with self._bulk_lock:
            if not self._bulk_box:
                bulk = S3Store(self.settings)
                bulk.stats_lock = self.stats_lock
                bulk.requests = self.requests
                bulk.errors = self.errors
                bulk.count_sent = self.count_sent  # type: ignore[method-assign]
                bulk._count_received = self._count_received  # type: ignore[method-assign]
                self._bulk_box.append(bulk)
            bulk = self._bulk_box[0]
        if bulk.settings.retry_deadline != self.settings.retry_deadline:
            bulk = bulk.with_retry_deadline(self.settings.retry_deadline)
        return bulk

    def _call(self, what: str, fn: Callable[[], T], definitive_after: float | None = None) -> T:
        return retry.call(
            self, self.settings.retry_deadline, what, fn, classify, definitive, definitive_after
        )

    # --- one request --------------------------------------------------------------------------

    def _path(self, key: str | None, query: Mapping[str, str] | None = None) -> str:
        path = self._base if key is None else f"{self._base}/{urllib.parse.quote(key, safe='/~')}"
        if query:
            path += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="~")
        return path

    def _wait(self, sent: _Sent) -> _Reply:
        """The reply of a request _start handed to the CRT, or its error."""
        while True:
            try:
                return sent.done.result(timeout=min(1.0, self._stall_limit))
            except TimeoutError:
                self._cancel_if_stalled(sent)
            except Exception as exc:
                if sent.reply.refused is not None:
                    raise sent.reply.refused from None
                if (
                    sent.reused
                    and sent.again is not None
                    and sent.reply.status == 0
                    and isinstance(exc, awscrt.exceptions.AwsCrtError)
                ):
                    # A kept-alive connection the server had closed meanwhile: nothing was
                    # answered, so send it again at once (once) rather than as a retry.
                    sent = sent.again()
                    sent.again = None
                    continue
                raise

    @property
    def _stall_limit(self) -> float:
        # The CRT has no read timeout: a request that moves nothing for read_timeout (the
        # connect timeout is the CRT's own) is cancelled here and retried like a timeout.
        return self.settings.read_timeout + self.settings.connect_timeout

    def _give_up(self, sent: _Sent) -> None:
        """Close the connection of a request given up on (which ends it with an error), unless
        its reply came meanwhile and gave the connection back to the pool."""
        if sent.conn is not None and sent.once.acquire(blocking=False):
            self._pool.release(sent.conn, False)

    def _cancel_if_stalled(self, sent: _Sent) -> None:
        if time.monotonic() - sent.progress[0] > self._stall_limit:
            self._give_up(sent)
            with contextlib.suppress(Exception):
                sent.done.result(timeout=self._stall_limit)
            raise _TimedOut() from None

    def _start(
        self,
        method: str,
        path: str,
        operation: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | bytearray | None = None,
        check: Callable[[_Reply], None] | None = None,
        body_limit: int | None = None,
        idle: awscrt.http.HttpClientConnection | None = None,
    ) -> _Sent:
        """One signed request, handed to the CRT and not waited for (_send waits for it).
        *check* sees the status and headers before any body byte (and may raise to drop the
        connection); a body past *body_limit* bytes is cut off by failing the request. What
        fails before the request is sent (signing, connecting) fails its future. *idle*: a
        connection the caller took from the pool (try_acquire) for it."""
        hdrs = awscrt.http.HttpHeaders([("Host", self._host)])
        for name, value in (headers or {}).items():
            hdrs.add(name, value)
        reply = _Reply()
        sent = _Sent(concurrent.futures.Future(), reply, [time.monotonic()])
        stream = None
        if body is not None:
            hdrs.add("Content-Length", str(len(body)))
            stream = Body(body, sent.progress)
        sent.again = lambda: self._start(
            method, path, operation, headers, body, check, body_limit
        )
        request = awscrt.http.HttpRequest(method, path, hdrs, stream)
        # Over TLS the body cannot change on its way; over plain HTTP its SHA-256 in the
        # signature is the only check that the server stored what the journal lets go of
        # (a server that checks it refuses a body that does not match; SeaweedFS does not
        # check). A few microseconds for a small body: larger ones go through botocore,
        # which signs them the same way.
        digest = None
        if body is not None and not self._pool.endpoint.https:
            digest = hashlib.sha256(body).hexdigest()
        try:
            self._pool.sign(request, digest)
            if idle is None:
                conn, sent.reused = self._pool.acquire(self._stall_limit)
            else:
                conn, sent.reused = idle, True
        except Exception as exc:  # noqa: BLE001 - the waiter classifies it
            if idle is not None:
                self._pool.release(idle, True)
            sent.done.set_exception(exc)
            return sent
        sent.conn = conn
        progress = sent.progress
        once = sent.once  # the connection goes back to the pool once

        def release(reusable: bool) -> None:
            if once.acquire(blocking=False):
                self._pool.release(conn, reusable)

        def on_response(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            progress[0] = time.monotonic()
            reply.status = status_code
            reply.headers = {k.lower(): v for k, v in headers}
            if check is not None and 200 <= status_code < 300:
                try:
                    check(reply)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the waiter
                    reply.refused = exc
                    conn.close()

        def on_body(chunk: bytes, **_: Any) -> None:
            progress[0] = time.monotonic()
            if reply.refused is not None:
                return
            reply.body += chunk
            if body_limit is not None and len(reply.body) > body_limit:
                reply.refused = _TooLarge(len(reply.body))
                conn.close()

        def finished(future: concurrent.futures.Future[Any]) -> None:
            error = future.exception()
            release(error is None and reply.refused is None)
            if error is not None:
                sent.done.set_exception(error)
            elif reply.refused is not None:
                sent.done.set_exception(reply.refused)
            elif not 200 <= reply.status < 300:
                sent.done.set_exception(HttpError(reply.status, reply.headers, bytes(reply.body)))
            else:
                sent.done.set_result(reply)

        try:
            http = conn.request(request, on_response=on_response, on_body=on_body)
            http.completion_future.add_done_callback(finished)
            http.activate()
        except Exception as exc:  # noqa: BLE001 - as above
            release(False)
            if not sent.done.done():
                sent.done.set_exception(exc)
        return sent

    # _start, then its reply (or the CRT's error): what every request but head_many's does.
    _send = _waiting(_start)

    # --- reading --------------------------------------------------------------------------

    def check_bucket(self, definitive_after: float | None = None) -> None:
        self._call(
            f"head_bucket {self.bucket}",
            lambda: self._send("HEAD", self._path(None), "HeadBucket"),
            definitive_after,
        )

    def _info(self, key: str, reply: _Reply, size: int) -> ObjectInfo:
        meta = {
            k[len(_META) :]: v
            for k, v in reply.headers.items()
            if k.startswith(_META)
        }
        return ObjectInfo(
            key=key,
            size=size,
            etag=etag_of(reply.headers.get("etag", "")),
            mtime_ns=_mtime_ns(reply.headers.get("last-modified", "")),
            metadata=meta,
        )

    def head(self, key: str) -> ObjectInfo:
        r = self._call(f"head {key}", lambda: self._send("HEAD", self._path(key), "HeadObject"))
        return self._info(key, r, int(r.headers.get("content-length", "0")))

    def head_many(
        self, keys: Iterable[str], concurrency: int
    ) -> Iterator[tuple[str, ObjectInfo | StoreError]]:
        """HEAD every key, *concurrency* at a time, from this one thread: the CRT works on
        them together, where a thread per HEAD costs a thread hand-over each (a wide
        directory's first listing sends one per file). Results come as they finish. A first
        attempt that fails transiently is sent again through head (its retries and deadline);
        errors that retrying does not cure are yielded, not raised."""
        pending = iter(keys)
        flying: dict[concurrent.futures.Future[Any], tuple[str, _Sent]] = {}

        def launch() -> None:
            for key in pending:
                with self.stats_lock:
                    self.requests["head"] = self.requests.get("head", 0) + 1
                sent = self._start("HEAD", self._path(key), "HeadObject")
                flying[sent.done] = (key, sent)
                if len(flying) >= concurrency:
                    return

        def settle(key: str, sent: _Sent) -> tuple[str, ObjectInfo | StoreError]:
            try:
                if not sent.done.done():
                    self._cancel_if_stalled(sent)  # (raises: it is)
                sent.done.result(timeout=0)
                r = sent.reply
                return key, self._info(key, r, int(r.headers.get("content-length", "0")))
            except Exception as raw:  # noqa: BLE001 - classified right below
                err = classify(raw, f"head {key}")
                with self.stats_lock:
                    kind = type(err).__name__
                    self.errors[kind] = self.errors.get(kind, 0) + 1
            if not isinstance(err, TransientStoreError):
                return key, err
            try:
                return key, self.head(key)
            except StoreError as exc:
                return key, exc

        launch()
        while flying:
            done, _ = concurrent.futures.wait(
                flying, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED
            )
            stalled = [] if done else [
                f for f, (_, s) in flying.items()
                if time.monotonic() - s.progress[0] > self._stall_limit
            ]  # fmt: skip
            for f in [*done, *stalled]:
                key, sent = flying.pop(f)
                yield settle(key, sent)
            launch()

    def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        if_match: str | None = None,
    ) -> bytes:
        """Bytes [start, end] (inclusive) of *key*; PreconditionFailed if its ETag changed."""
        if start is not None and end is not None and end - start >= BULK_BYTES:
            return self._bulk().get(key, start, end, if_match)
        headers: dict[str, str] = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        if if_match:
            headers["If-Match"] = if_match

        def fetch() -> bytes:
            r = self._send("GET", self._path(key), "GetObject", headers)
            data = bytes(r.body)
            self._count_received(len(data))
            return data

        return self._call(f"get {key}", fetch)

    def get_bounded_start(self, key: str, limit: int, what: str) -> PendingGet | None:
        """get_bounded's first request, handed to the CRT: its future ends with the object
        when that one reply brought all of it, else with whatever error (get_bounded then
        does it all again, with its retries and second request)."""
        if not self._fixed_credentials:
            return None
        idle = self._pool.try_acquire()
        if idle is None:  # (connecting, or waiting for a connection, would block)
            return None
        out: concurrent.futures.Future[tuple[bytes, ObjectInfo]] = concurrent.futures.Future()
        with self.stats_lock:
            self.requests["get"] = self.requests.get("get", 0) + 1
        check = functools.partial(_check_total, what, key, limit)
        sent = self._start(
            "GET",
            self._path(key),
            "GetObject",
            {"Range": f"bytes=0-{min(limit, _FIRST_READ) - 1}"},
            check=check,
            body_limit=limit,
            idle=idle,
        )

        def done(f: concurrent.futures.Future[_Reply]) -> None:
            try:
                r = f.result()
                body = bytes(r.body)
                if len(body) != (_total(r) if r.status == 206 else len(body)):
                    raise _Incomplete()
                self._count_received(len(body))
                out.set_result((body, self._info(key, r, len(body))))
            except BaseException as exc:  # noqa: BLE001 - the caller asks get_bounded
                out.set_exception(exc)

        sent.done.add_done_callback(done)
        return PendingGet(out, lambda: self._give_up(sent))

    def get_bounded(self, key: str, limit: int, what: str) -> tuple[bytes, ObjectInfo]:
        """The whole object with its metadata, if it is at most *limit* bytes; a larger one is
        refused (ObjectTooLarge) after one request.

        The first request asks for the first _FIRST_READ bytes only and learns the size from
        Content-Range before any body byte (a reply that announces more is refused at its
        headers, one that sends more is cut off at *limit*); an object between that and
        *limit* takes a second, If-Match request."""
        first = min(limit, _FIRST_READ)
        total = _total
        check = functools.partial(_check_total, what, key, limit)

        def read(headers: Mapping[str, str]) -> _Reply:
            try:
                return self._send(
                    "GET", self._path(key), "GetObject", headers, check=check, body_limit=limit
                )
            except _TooLarge as exc:
                limits.check_size(what, key, exc.size, limit)
                raise

        def fetch() -> tuple[bytes, ObjectInfo]:
            try:
                r = read({"Range": f"bytes=0-{first - 1}"})
            except HttpError as exc:
                if exc.status_code != 416:
                    raise
                r = read({})  # no byte to give a range of: an empty object
            body = bytes(r.body)
            size = total(r) if r.status == 206 else len(body)
            if len(body) < size:
                etag = r.headers.get("etag", "")
                try:
                    rest = read({"Range": f"bytes={len(body)}-{size - 1}", "If-Match": etag})
                except HttpError as exc:
                    if exc.status_code != 412:
                        raise
                    # Replaced between the two reads: read the new one from its start.
                    err = retry.classify_reply("", 0, "changed while read", f"get {key}")
                    raise err from None
                body += bytes(rest.body)
            if len(body) != size:  # not what Content-Range announced: read again
                err = retry.classify_reply("", 0, "incomplete reply", f"get {key}")
                raise err
            self._count_received(len(body))
            return body, self._info(key, r, len(body))

        return self._call(f"get {key}", fetch)

    def list(
        self,
        prefix: str,
        delimiter: str | None = "/",
        token: str | None = None,
        start_after: str | None = None,
    ) -> ListPage:
        query = {"list-type": "2", "prefix": prefix, "max-keys": "1000", "encoding-type": "url"}
        if delimiter:
            query["delimiter"] = delimiter
        if token:
            query["continuation-token"] = token
        elif start_after:
            query["start-after"] = start_after
        path = self._path(None, query)

        def fetch() -> _Reply:
            r = self._send("GET", path, "ListObjectsV2")
            # An error document in a 200, or a cut-off reply: retried, as botocore does.
            if not bytes(r.body).rstrip().endswith(b"</ListBucketResult>"):
                raise TransientStoreError(f"list {prefix}: incomplete listing")
            return r

        r = self._call(f"list {prefix}", fetch)
        return _parse_list(r)

    # --- writing --------------------------------------------------------------------------

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
        if len(body) > BULK_BYTES:
            return self._bulk().put(key, body, metadata, if_match, if_none_match, content_type)
        headers = {"Content-Type": content_type}
        headers.update({f"{_META}{k}": v for k, v in metadata.items()})
        if if_match:
            headers["If-Match"] = if_match
        elif if_none_match:
            headers["If-None-Match"] = "*"
        body = bytes(body)
        r = self._call(
            f"put {key}", lambda: self._send("PUT", self._path(key), "PutObject", headers, body)
        )
        self.count_sent(len(body))
        return etag_of(r.headers.get("etag", ""))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self._send("DELETE", self._path(key), "DeleteObject"))

    # --- multipart uploads and copies (assembled by store/transfers.py) -----------------------

    def _meta_headers(self, metadata: Mapping[str, str], content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        headers.update({f"{_META}{k}": v for k, v in metadata.items()})
        return headers

    def _upload_path(self, key: str, upload_id: str, number: int | None = None) -> str:
        query = {"uploadId": upload_id} if number is None else {
            "partNumber": str(number),
            "uploadId": upload_id,
        }
        return self._path(key, query)

    def _source(self, src: str) -> str:
        # As botocore sends it: the bucket as is, the key URL-encoded.
        return f"{self.bucket}/{urllib.parse.quote(src, safe='/~')}"

    def create_multipart(
        self, key: str, metadata: Mapping[str, str], content_type: str = "application/octet-stream"
    ) -> str:
        what = f"create_multipart {key}"
        # A valueless query parameter: urlencode would write "uploads=".
        path = self._path(key) + "?uploads"
        headers = self._meta_headers(metadata, content_type)

        def send() -> str:
            r = self._send("POST", path, "CreateMultipartUpload", headers, b"")
            return listxml.result_text(r.body, what, "UploadId")

        return self._call(what, send)

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        if len(data) > BULK_BYTES:
            return self._bulk().upload_part(key, upload_id, number, data)
        path = self._upload_path(key, upload_id, number)
        r = self._call(
            f"upload_part {key}#{number}",
            lambda: self._send("PUT", path, "UploadPart", None, data),
        )
        self.count_sent(len(data))
        return r.headers.get("etag", "")

    def complete_multipart(
        self, key: str, upload_id: str, parts: PartList, conditions: Mapping[str, str]
    ) -> str:
        """Make the parts (number, ETag), in order, the object; *conditions* as for put (the
        names of store/base.py's conditions(): IfMatch, IfNoneMatch)."""
        what = f"complete_multipart {key}"
        headers = {_CONDITION_HEADERS[name]: value for name, value in conditions.items()}
        listed = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(e)}</ETag></Part>" for n, e in parts
        )
        body = (
            f'<CompleteMultipartUpload xmlns="{_NS[1:-1]}">{listed}</CompleteMultipartUpload>'
        ).encode()
        path = self._upload_path(key, upload_id)

        def send() -> str:
            r = self._send("POST", path, "CompleteMultipartUpload", headers, body)
            return etag_of(listxml.result_text(r.body, what, "ETag"))

        return self._call(what, send)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Best effort, one attempt (the caller's own error matters more), as for boto3."""
        with self.stats_lock:
            self.requests["abort_multipart"] = self.requests.get("abort_multipart", 0) + 1
        try:
            self._send("DELETE", self._upload_path(key, upload_id), "AbortMultipartUpload")
        except Exception:  # noqa: BLE001 - best effort: the caller's error is the one to report
            log.warning("could not abort the multipart upload of %s", key)

    def copy_object(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str] | None,
        src_etag: str | None,
        content_type: str,
    ) -> str:
        what = f"copy {src} -> {dst}"
        headers = {"x-amz-copy-source": self._source(src)}
        if metadata is not None:
            headers.update(self._meta_headers(metadata, content_type))
            headers["x-amz-metadata-directive"] = "REPLACE"
        if src_etag:
            headers["x-amz-copy-source-if-match"] = src_etag

        def send() -> str:
            r = self._send("PUT", self._path(dst), "CopyObject", headers, b"")
            return etag_of(listxml.result_text(r.body, what, "ETag"))

        return self._call(what, send)

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
        what = f"upload_part_copy {src} -> {dst}#{number}"
        headers = {
            "x-amz-copy-source": self._source(src),
            "x-amz-copy-source-range": f"bytes={first}-{last}",
        }
        if src_etag:
            headers["x-amz-copy-source-if-match"] = src_etag
        path = self._upload_path(dst, upload_id, number)

        def send() -> str:
            r = self._send("PUT", path, "UploadPartCopy", headers, b"")
            return listxml.result_text(r.body, what, "ETag")

        return self._call(what, send)


# The names store/base.py's conditions() gives a write's conditions, as HTTP headers.
_CONDITION_HEADERS = {"IfMatch": "If-Match", "IfNoneMatch": "If-None-Match"}


def _total(reply: _Reply) -> int:
    """The object's size, from a ranged reply's Content-Range (or its length)."""
    size = reply.headers.get("content-range", "").rpartition("/")[2]
    return int(size if size.isdigit() else reply.headers.get("content-length") or 0)


def _check_total(what: str, key: str, limit: int, reply: _Reply) -> None:
    limits.check_size(what, key, _total(reply), limit)


class _Incomplete(Exception):
    """A reply with less than the object (it needs get_bounded's second request)."""


def _parse_list(r: _Reply) -> ListPage:
    page = listxml.parse_list(bytes(r.body))
    date = r.headers.get("date")
    if date:
        page.server_time_ns = _mtime_ns(date) or None
    return page
