"""The object store: boto3 behind a small, blocking interface with one retry policy.

Blocking on purpose: the filesystem core calls it from worker threads (trio.to_thread). Every
failure leaves as one of the StoreError kinds of ``s3cryptfs.errors``; a server error is never
reported as "not found".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import email.utils
import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bce
import botocore.session
import botocore.utils
from botocore.config import Config

from s3cryptfs import limits
from s3cryptfs.errors import (
    AccessDenied,
    EndpointUnreachable,
    StoreError,
    TransientStoreError,
)
from s3cryptfs.store import retry
from s3cryptfs.store.base import (
    ListPage,
    ObjectInfo,
    PagedReads,
    PartList,
    StoreSettings,
    etag_of,
)
from s3cryptfs.store.retry import classify_reply
from s3cryptfs.store.transfers import MultipartTransfers

__all__ = ["ListPage", "ObjectInfo", "PartList", "S3Store", "StoreSettings", "etag_of"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _timestamp(value: str) -> datetime.datetime:
    """botocore's default parser (dateutil) dominates the CPU cost of a 1000-key LIST; S3's
    ISO 8601 and HTTP dates have fast parsers in the standard library."""
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            slow: datetime.datetime = botocore.utils.parse_timestamp(value)
            return slow
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed


def _botocore_session() -> botocore.session.Session:
    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_timestamp
    )
    return session


def classify(exc: BaseException, what: str) -> StoreError:
    """Map a botocore exception to our error kinds. *what* names the operation and key."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return classify_reply(code, status, err.get("Message") or code, what)
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
        return EndpointUnreachable(f"{what}: cannot connect to the S3 endpoint ({exc})")
    if isinstance(
        exc, bce.ReadTimeoutError | bce.ConnectionClosedError | bce.ResponseStreamingError
    ):
        return TransientStoreError(f"{what}: S3 connection failed ({exc})")
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return AccessDenied(f"{what}: no S3 credentials found ({exc})")
    if isinstance(exc, bce.HTTPClientError | ConnectionError | TimeoutError):
        return TransientStoreError(f"{what}: S3 connection failed ({exc})")
    if isinstance(exc, bce.BotoCoreError):
        return StoreError(f"{what}: {exc}")
    raise exc


def definitive(exc: BaseException) -> bool:
    """An error that retrying for long will not cure: nothing listens on the port, the host
    name does not resolve, TLS fails (a wrong port, a plain-HTTP server, a certificate that is
    not trusted). A first contact says so at once instead of retrying for the whole deadline;
    later, the same errors are retried (a server restarting refuses connections for a while)."""
    if isinstance(exc, bce.SSLError):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError | socket.gaierror | ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _no_expect_for_small(request: Any, **_: Any) -> None:
    # "Expect: 100-continue" costs a round trip before the body; it only pays off for bodies
    # big enough that sending them to a server about to refuse would waste time.
    length = request.headers.get("Content-Length")
    if length is not None and int(length) < 1024 * 1024 and "Expect" in request.headers:
        del request.headers["Expect"]


def _close_after_marker(request: Any, **_: Any) -> None:
    if request.url.split("?", 1)[0].endswith("/"):
        request.headers["Connection"] = "close"


def _cheaper_list_error_check(client: Any) -> None:
    """botocore parses every XML reply twice: once to look for an error hidden in a 200 (or a
    truncated body), once for real. For LIST replies, the first parse was a fifth of the time
    of `ls -l`; a complete listing ends with its closing tag, so that is what is checked."""
    from botocore import handlers

    original = getattr(handlers, "_handle_200_error", None)
    if original is None:  # a botocore without this handler: nothing to replace
        return

    def check(operation_model: Any, response_dict: dict[str, Any], **kwargs: Any) -> None:
        if operation_model.name != "ListObjectsV2":
            original(operation_model=operation_model, response_dict=response_dict, **kwargs)
            return
        body = response_dict.get("body") or b""
        if response_dict.get("status_code") == 200 and not body.rstrip().endswith(
            b"</ListBucketResult>"
        ):
            response_dict["status_code"] = 500  # an error document or a cut-off reply: retry

    events = client.meta.events
    events.unregister("before-parse.s3.*", original)
    events.register_first("before-parse.s3.*", check)


# Endpoint parameters that name the object, not where to send the request.
_PER_OBJECT_PARAMS = ("Key", "Prefix", "CopySource")


def _cache_endpoint_resolution(client: Any) -> None:
    """botocore evaluates S3's endpoint rule set for every request and caches the result per
    set of parameters; the parameters include the object key, so for a stream of new keys the
    cache never hits and the rule set costs about a fifth of the CPU of a small PUT. The rule
    set never looks at the key (checked here, on the rule set this botocore ships), so the
    per-object parameters are left out of the lookup."""
    resolver = getattr(client, "_ruleset_resolver", None)
    provider = getattr(resolver, "_provider", None)
    if provider is None or not hasattr(provider, "resolve_endpoint"):
        return
    try:
        rules = json.dumps(client._loader.load_service_model("s3", "endpoint-rule-set-1"))
    except Exception:  # noqa: BLE001 - no rule set to check: leave botocore as it is
        return
    if any(f'"ref": "{name}"' in rules for name in _PER_OBJECT_PARAMS):
        return
    original = provider.resolve_endpoint

    def resolve_endpoint(**params: Any) -> Any:
        for name in _PER_OBJECT_PARAMS:
            params.pop(name, None)
        return original(**params)

    provider.resolve_endpoint = resolve_endpoint


def _cache_user_agent(client: Any) -> None:
    """botocore rebuilds the User-Agent header twice per request, sanitizing every component
    character by character (about a tenth of the CPU of a small PUT). The string only changes
    with the set of features in use (client-wide and the request's context), so it is built
    once per such set."""
    creator = getattr(client, "_user_agent_creator", None)
    build = getattr(creator, "to_string", None)
    if creator is None or build is None or not hasattr(creator, "_client_features"):
        return
    try:
        from botocore.context import get_context
    except ImportError:
        return
    cache: dict[tuple[frozenset[str], frozenset[str]], str] = {}

    def to_string() -> str:
        context = get_context()
        key = (
            frozenset(creator._client_features or ()),
            frozenset(context.features) if context is not None else frozenset(),
        )
        value = cache.get(key)
        if value is None:
            value = cache[key] = build()
        return value

    creator.to_string = to_string


def _sign_bodies_unless_tls(client: Any) -> None:
    """Bodies are signed (their SHA-256 in the signature, which the server checks) only over
    plain HTTP: over TLS they cannot change on their way, and hashing them cost about 0.7
    CPU-seconds per GiB uploaded (botocore signs them whenever no checksum header is sent,
    TLS or not). Decided by the endpoint the client resolved, which a configured
    AWS_ENDPOINT_URL may make plain HTTP even when none is given here."""
    config = client.meta.config
    s3 = {k: v for k, v in (config.s3 or {}).items() if k != "payload_signing_enabled"}
    if str(client.meta.endpoint_url).lower().startswith("https:"):
        s3["payload_signing_enabled"] = False
    config.s3 = s3  # (read by the signer at each request)


class S3Store(PagedReads, MultipartTransfers):
    """One bucket, one shared boto3 client (thread safe), one retry policy."""

    def __init__(self, settings: StoreSettings, client: Any | None = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._client = client or boto3.session.Session(botocore_session=_botocore_session()).client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                max_pool_connections=settings.max_connections,
                s3={"addressing_style": "path"} if settings.endpoint_url else None,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        # SeaweedFS answers a PUT of a "dir/" marker in a way that leaves the connection out of
        # step (the next request on it reads a stale reply and times out), so such PUTs do not
        # keep their connection.
        self._client.meta.events.register("before-send.s3.PutObject", _close_after_marker)
        self._client.meta.events.register("before-send.s3.PutObject", _no_expect_for_small)
        _sign_bodies_unless_tls(self._client)
        _cheaper_list_error_check(self._client)
        _cache_endpoint_resolution(self._client)
        _cache_user_agent(self._client)
        self.stats_lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        # Bodies moved, for status and metrics (uploads through the helper process are
        # counted by their caller: count_sent).
        self.bytes_sent = 0
        self.bytes_received = 0

    def count_sent(self, n: int) -> None:
        with self.stats_lock:
            self.bytes_sent += n

    def _count_received(self, n: int) -> None:
        with self.stats_lock:
            self.bytes_received += n

    def with_retry_deadline(self, seconds: float) -> S3Store:
        """This store (its client, its statistics) with a shorter retry deadline: for requests
        whose failure costs little, which must not hold anything up for long."""
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, retry_deadline=seconds)
        return other

    # --- the retry loop -----------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], definitive_after: float | None = None) -> T:
        """*fn* under the retry policy of store/retry.py."""
        return retry.call(
            self, self.settings.retry_deadline, what, fn, classify, definitive, definitive_after
        )

    # --- reading --------------------------------------------------------------------------

    def check_bucket(self, definitive_after: float | None = None) -> None:
        self._call(
            f"head_bucket {self.bucket}",
            lambda: self._client.head_bucket(Bucket=self.bucket),
            definitive_after,
        )

    def head(self, key: str) -> ObjectInfo:
        r = self._call(f"head {key}", lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        return ObjectInfo(
            key=key,
            size=int(r["ContentLength"]),
            etag=etag_of(r["ETag"]),
            mtime_ns=int(r["LastModified"].timestamp() * 1e9),
            metadata={k.lower(): v for k, v in r.get("Metadata", {}).items()},
        )

    def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        if_match: str | None = None,
    ) -> bytes:
        """Bytes [start, end] (inclusive) of *key*; PreconditionFailed if its ETag changed."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        if if_match:
            args["IfMatch"] = if_match

        def fetch() -> bytes:
            r = self._client.get_object(**args)
            data: bytes = r["Body"].read()
            self._count_received(len(data))
            return data

        return self._call(f"get {key}", fetch)

    def get_bounded(self, key: str, limit: int, what: str) -> tuple[bytes, ObjectInfo]:
        """The whole object with its metadata, in one request, if it is at most *limit* bytes.

        The bucket is not trusted to keep small what we read whole: a larger object is refused
        (ObjectTooLarge, naming *what* it was read as) from the response's Content-Length,
        before its body is read, and a body longer than announced is cut at limit + 1 bytes."""

        def fetch() -> tuple[bytes, ObjectInfo]:
            r = self._client.get_object(Bucket=self.bucket, Key=key)
            stream = r["Body"]
            try:
                limits.check_size(what, key, int(r.get("ContentLength") or 0), limit)
                body = stream.read(limit + 1)
                limits.check_size(what, key, len(body), limit)
            finally:
                stream.close()  # unread bytes are not downloaded: the connection is dropped
            self._count_received(len(body))
            info = ObjectInfo(
                key=key,
                size=len(body),
                etag=etag_of(r["ETag"]),
                mtime_ns=int(r["LastModified"].timestamp() * 1e9),
                metadata={k.lower(): v for k, v in r.get("Metadata", {}).items()},
            )
            return body, info

        return self._call(f"get {key}", fetch)

    def list(
        self,
        prefix: str,
        delimiter: str | None = "/",
        token: str | None = None,
        start_after: str | None = None,
    ) -> ListPage:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
        if delimiter:
            args["Delimiter"] = delimiter
        if token:
            args["ContinuationToken"] = token
        elif start_after:
            args["StartAfter"] = start_after
        r = self._call(f"list {prefix}", lambda: self._client.list_objects_v2(**args))
        page = ListPage()
        for o in r.get("Contents", []):
            page.objects.append(
                ObjectInfo(
                    key=o["Key"],
                    size=int(o["Size"]),
                    etag=etag_of(o.get("ETag", "")),
                    mtime_ns=int(o["LastModified"].timestamp() * 1e9),
                )
            )
        page.prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
        page.token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                page.server_time_ns = int(
                    email.utils.parsedate_to_datetime(date).timestamp() * 1e9
                )
        return page

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
        args = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "Metadata": dict(metadata),
            "ContentType": content_type,
            **self.conditions(if_match, if_none_match),
        }
        r = self._call(f"put {key}", lambda: self._client.put_object(**args))
        self.count_sent(len(body))
        return etag_of(r["ETag"])

    # The pieces of a multipart upload, for callers that send parts as their data appears.

    def create_multipart(
        self, key: str, metadata: Mapping[str, str], content_type: str = "application/octet-stream"
    ) -> str:
        upload = self._call(
            f"create_multipart {key}",
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=dict(metadata), ContentType=content_type
            ),
        )
        return str(upload["UploadId"])

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> str:
        r = self._call(
            f"upload_part {key}#{number}",
            lambda: self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            ),
        )
        self.count_sent(len(data))
        return str(r["ETag"])

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: PartList,
        conditions: Mapping[str, str],
    ) -> str:
        """Make the parts (number, ETag), in order, the object; *conditions* as for put."""
        listed = [{"PartNumber": n, "ETag": e} for n, e in parts]
        r = self._call(
            f"complete_multipart {key}",
            lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
                **conditions,
            ),
        )
        return etag_of(r["ETag"])

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Best effort (the caller's own error matters more): discard an unfinished upload."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
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
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": dst,
            "CopySource": {"Bucket": self.bucket, "Key": src},
        }
        if metadata is not None:
            args["Metadata"] = dict(metadata)
            args["MetadataDirective"] = "REPLACE"
            args["ContentType"] = content_type
        if src_etag:
            args["CopySourceIfMatch"] = src_etag
        r = self._call(f"copy {src} -> {dst}", lambda: self._client.copy_object(**args))
        return etag_of(r["CopyObjectResult"]["ETag"])

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
        extra = {"CopySourceIfMatch": src_etag} if src_etag else {}
        r = self._call(
            f"upload_part_copy {src} -> {dst}#{number}",
            lambda: self._client.upload_part_copy(
                Bucket=self.bucket,
                Key=dst,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": src},
                CopySourceRange=f"bytes={first}-{last}",
                **extra,
            ),
        )
        etag: str = r["CopyPartResult"]["ETag"]
        return etag

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=key))
