"""The retry policy and the error classification every object store implementation shares:
an S3 reply (status, code) maps to one StoreError kind, transient ones are retried until the
deadline, and errors that waiting does not cure give up early on a first contact."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from s3cryptfs.errors import (
    AccessDenied,
    BucketNotFound,
    ObjectNotFound,
    PreconditionFailed,
    StoreError,
    TransientStoreError,
    strip_subject,
)

log = logging.getLogger("s3cryptfs.store.s3")  # one logger name for every store's retries
T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
    "OperationAborted",
}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}


def classify_reply(code: str, status: int, msg: str, what: str) -> StoreError:
    """The kind of an S3 error reply: its S3 *code* (may be empty, as for HEAD) and HTTP
    *status* (0: not known). A 5xx is never "not found"."""
    if code == "NoSuchBucket":
        return BucketNotFound(f"{what}: the bucket does not exist")
    if code in _NOT_FOUND or (status == 404 and code not in TRANSIENT_CODES):
        return ObjectNotFound(f"{what}: not found")
    if code in ("PreconditionFailed", "412") or status == 412:
        return PreconditionFailed(f"{what}: changed by another writer (precondition failed)")
    if code in _DENIED or status == 403:
        return AccessDenied(f"{what}: access denied ({code}: {msg})")
    if code in TRANSIENT_CODES or status >= 500 or status == 429 or status == 0:
        return TransientStoreError(f"{what}: S3 error {code or status}: {msg}")
    return StoreError(f"{what}: S3 refused the request ({code or status}: {msg})")


class Counted(Protocol):
    stats_lock: threading.Lock
    requests: dict[str, int]
    errors: dict[str, int]


def call(
    store: Counted,
    deadline_s: float,
    what: str,
    fn: Callable[[], T],
    classify: Callable[[BaseException, str], StoreError],
    definitive: Callable[[BaseException], bool],
    definitive_after: float | None = None,
) -> T:
    """*fn* with retries of transient errors until *deadline_s* seconds have passed. With
    *definitive_after*, errors that waiting does not cure (connection refused, unknown host,
    TLS failure: see *definitive*) are given up after that many seconds instead. *classify*
    raises what it does not know."""
    start = time.monotonic()
    deadline = start + deadline_s
    delay = 0.1
    attempt = 0
    op = what.split(" ", 1)[0]
    while True:
        attempt += 1
        with store.stats_lock:
            store.requests[op] = store.requests.get(op, 0) + 1
        try:
            return fn()
        except Exception as raw:  # noqa: BLE001 - classified right below
            err = classify(raw, what)
            with store.stats_lock:
                kind = type(err).__name__
                store.errors[kind] = store.errors.get(kind, 0) + 1
            if not isinstance(err, TransientStoreError):
                raise err from None
            remaining = deadline - time.monotonic()
            if definitive_after is not None and definitive(raw):
                remaining = min(remaining, start + definitive_after - time.monotonic())
            if remaining <= 0:
                why = strip_subject(err, what)
                log.error("%s: giving up after %d attempts: %s", what, attempt, why)
                raise err from None
            sleep = min(delay * (0.5 + random.random()), remaining, 5.0)
            log.warning("%s: %s; retrying in %.1fs", what, strip_subject(err, what), sleep)
            time.sleep(sleep)
            delay = min(delay * 2, 5.0)
