"""Signed requests to one S3 endpoint over a bounded pool of plain awscrt HTTP connections.

NativeStore used to hand each request to the CRT's S3 client (awscrt.s3), whose meta-request
machinery schedules every request and its reply across several of its threads. For the small
requests a mount makes, that scheduling was most of the cost: on one connection to the same
server, a 4 KiB GET answered 0.1-0.2 ms sooner, a HEAD 0.1 ms sooner and a 4 KiB PUT 0.45 ms
sooner, each with about 0.15 ms less CPU (docs/PERFORMANCE.md, "S3 clients"). Here a request
is signed (SigV4, unsigned payload, as the S3 client signed them), given a connection of its
own from the pool, and its reply handed over as it arrives; HTTP/1.1 keep-alive makes the
next request on that connection skip the connect.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import Any

import awscrt.auth
import awscrt.http
import awscrt.io
import botocore.credentials
import botocore.session

# A connection left idle longer than this is closed rather than reused: servers close idle
# keep-alive connections on their own schedule, and one closed while a request is on its way
# fails that request.
IDLE_MAX_S = 10.0


class HttpError(Exception):
    """A reply outside 2xx: its status, headers and body (the S3 error document)."""

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


class Body(io.BytesIO):
    """A request body that tells, as the CRT reads it, that the request moves: a body sent
    slowly (a slow uplink shared by many uploads) is progress, not a stall."""

    def __init__(self, data: bytes | bytearray, progress: list[float]) -> None:
        super().__init__(data)
        self._progress = progress

    def readinto1(self, buffer: Any) -> int:  # what the CRT reads with
        self._progress[0] = time.monotonic()
        return super().readinto1(buffer)

    def readinto(self, buffer: Any) -> int:
        self._progress[0] = time.monotonic()
        return super().readinto(buffer)

    def read(self, size: int | None = -1) -> bytes:
        self._progress[0] = time.monotonic()
        return super().read(size)


class PoolExhausted(Exception):
    """Every connection stayed busy for the whole wait (each request in flight is bounded by
    the read timeout, so this is a stalled server)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # the name to connect to and to present in TLS
    port: int
    https: bool
    ca_bundle: str | None = None


class ConnectionPool:
    """At most *max_connections* open connections to *endpoint*, reused idle-newest first."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: awscrt.auth.AwsCredentialsProvider,
        region: str,
        max_connections: int,
        connect_timeout: float,
    ) -> None:
        self.endpoint = endpoint
        self._credentials = credentials
        self._region = region
        self._max = max(1, max_connections)
        loops = awscrt.io.EventLoopGroup()
        self._bootstrap = awscrt.io.ClientBootstrap(loops, awscrt.io.DefaultHostResolver(loops))
        self._socket = awscrt.io.SocketOptions()
        self._socket.connect_timeout_ms = max(1, int(connect_timeout * 1000))
        self._tls: awscrt.io.ClientTlsContext | None = None
        if endpoint.https:
            options = awscrt.io.TlsContextOptions()
            if endpoint.ca_bundle:
                options.override_default_trust_store_from_path(None, endpoint.ca_bundle)
            self._tls = awscrt.io.ClientTlsContext(options)
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._idle: list[tuple[awscrt.http.HttpClientConnection, float]] = []
        self._open = 0  # connections counted against the bound: idle, busy or connecting

    def sign(self, request: awscrt.http.HttpRequest, body_sha256: str | None = None) -> None:
        """Sign *request* in place (blocking; the CRT asks the credentials provider).
        *body_sha256*: the hex SHA-256 of its body, signed so that the server refuses a body
        changed on its way; None: the body is not signed (UNSIGNED-PAYLOAD)."""
        config = awscrt.auth.AwsSigningConfig(
            algorithm=awscrt.auth.AwsSigningAlgorithm.V4,
            signature_type=awscrt.auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
            credentials_provider=self._credentials,
            region=self._region,
            service="s3",
            # S3 signs the path as sent: no second encoding, no removal of "." or "//".
            use_double_uri_encode=False,
            should_normalize_uri_path=False,
            signed_body_value=body_sha256 or awscrt.auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
            signed_body_header_type=awscrt.auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
        )
        awscrt.auth.aws_sign_request(request, config).result()

    def try_acquire(self) -> awscrt.http.HttpClientConnection | None:
        """An idle connection that served a request before, or None: never connects, never
        waits (for a caller on an event loop)."""
        with self._lock:
            while self._idle:
                conn, since = self._idle.pop()
                if conn.is_open() and time.monotonic() - since < IDLE_MAX_S:
                    return conn
                self._open -= 1
                conn.close()
        return None

    def acquire(self, wait: float) -> tuple[awscrt.http.HttpClientConnection, bool]:
        """A connection for one request, and whether it served one before (then the server
        may have closed it meanwhile). Connects when none is idle and the bound allows;
        otherwise waits up to *wait* seconds for one to be released."""
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                while self._idle:
                    conn, since = self._idle.pop()
                    if conn.is_open() and time.monotonic() - since < IDLE_MAX_S:
                        return conn, True
                    self._open -= 1
                    conn.close()
                if self._open < self._max:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolExhausted()
                self._freed.wait(left)
        try:
            return self._connect(), False
        except BaseException:
            with self._lock:
                self._open -= 1
                self._freed.notify()
            raise

    def _connect(self) -> awscrt.http.HttpClientConnection:
        tls = None
        if self._tls is not None:
            tls = self._tls.new_connection_options()
            tls.set_server_name(self.endpoint.host)
        future = awscrt.http.HttpClientConnection.new(
            host_name=self.endpoint.host,
            port=self.endpoint.port,
            bootstrap=self._bootstrap,
            socket_options=self._socket,
            tls_connection_options=tls,
        )
        conn: awscrt.http.HttpClientConnection = future.result()
        return conn

    def release(self, conn: awscrt.http.HttpClientConnection, reusable: bool) -> None:
        """*conn*'s request is over; *reusable*: it ended with a whole reply."""
        with self._lock:
            if reusable and conn.is_open():
                self._idle.append((conn, time.monotonic()))
            else:
                self._open -= 1
                if conn.is_open():
                    conn.close()
            self._freed.notify()


def credentials_provider() -> tuple[awscrt.auth.AwsCredentialsProvider, bool]:
    """The credentials boto3 would use (environment, profile, SSO, instance role...), from
    botocore's resolver; refreshable ones refresh themselves when they near expiry.

    Fixed keys (environment, a profile's keys) are handed to the CRT as they are: a delegate
    is called back into Python, under the GIL, for every request it signs (about 80 us of
    CPU per request measured, an eighth of a small GET's)."""
    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        # botocore's whole chain found nothing. The CRT's environment provider then fails
        # each request cleanly ("no S3 credentials found"), where a delegate that raises would
        # also print the exception from inside the CRT's callback.
        return awscrt.auth.AwsCredentialsProvider.new_environment(), False
    if not isinstance(creds, botocore.credentials.RefreshableCredentials):
        frozen = creds.get_frozen_credentials()
        fixed = awscrt.auth.AwsCredentialsProvider.new_static(
            frozen.access_key, frozen.secret_key, frozen.token
        )
        return fixed, True
    refreshable = creds  # thread-safe: botocore locks its refresh

    def current() -> awscrt.auth.AwsCredentials:
        frozen = refreshable.get_frozen_credentials()
        return awscrt.auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

    return awscrt.auth.AwsCredentialsProvider.new_delegate(current), False
