"""Mutual-TLS connections to a KMIP server through PyKMIP, pooled, with errors translated.

PyKMIP's ``ProxyKmipClient`` is not thread safe and builds its own TLS context without a server
name (so no hostname check, and ``PROTOCOL_TLS_CLIENT`` cannot be used). We keep its KMIP encoding
and replace only the socket factory of its ``KMIPProxy`` with one that uses our context: verified
server certificate AND host name, TLS >= 1.2, client certificate (optionally with a key password,
which PyKMIP would otherwise prompt for on a terminal).

Every blocking socket step (connect, handshake, send, each receive) is bounded by ``timeout``.
A connection that saw a transport error is thrown away, never reused: its KMIP stream may be out
of step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TypeVar

from s3cryptfs.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyManagerError,
    ProviderUnavailable,
)
from s3cryptfs.keys.pykmip_compat import (
    KMIPProxy,
    ProxyKmipClient,
    RequestLengthMismatch,
    enums,
    pie_exceptions,
)

T = TypeVar("T")

# PyKMIP logs every request and response in hex at DEBUG (data keys included): never let that
# through, whatever the application's logging level. Its ERROR lines on connection failures
# duplicate the errors we raise, so they are silenced too.
logging.getLogger("kmip.services.kmip_protocol").setLevel(logging.INFO)
for _name in ("kmip.pie.client", "kmip.services.kmip_client"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

# TLS alerts by which a server says it refused our certificate (not that it is down).
_REFUSAL_REASONS = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_REQUIRED",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


def tls_context(
    ca: str, cert: str, key: str, key_password: str | bytes | None = None
) -> ssl.SSLContext:
    """A client context for mutual TLS; ConfigError when a file is missing or unusable."""
    for what, path in (("ca", ca), ("cert", cert), ("key", key)):
        if not path or not os.path.isfile(path):
            raise ConfigError(f"kmip: {what} file {path!r} does not exist")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # A password of b"" makes OpenSSL fail instead of prompting on the terminal.
        ctx.load_cert_chain(cert, key, password=key_password or b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"kmip: cannot load the TLS certificates: {exc}") from None
    return ctx


class _Proxy(KMIPProxy):  # type: ignore[misc]  # PyKMIP has no types: its classes are Any
    """KMIPProxy whose sockets come from our TLS context."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float
    ) -> None:
        # os.devnull as the config file: PyKMIP must not read ~/.pykmip or /etc/pykmip.
        super().__init__(host=host, port=port, timeout=math.ceil(timeout), config_file=os.devnull)
        self.timeout = timeout
        self._context = context
        self._server_name = server_name

    def _create_socket(self, sock: socket.socket) -> None:
        self.socket = self._context.wrap_socket(
            sock, server_side=False, server_hostname=self._server_name
        )
        self.socket.settimeout(self.timeout)


def open_client(
    host: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float
) -> ProxyKmipClient:
    """A connected ProxyKmipClient; raises the translated error when it cannot connect."""
    client = ProxyKmipClient(hostname=host, port=port, config_file=os.devnull)
    client.proxy = _Proxy(host, port, context, server_name, timeout)
    client.kmip_version = enums.KMIPVersion.KMIP_1_2
    try:
        client.open()
    except Exception as exc:  # noqa: BLE001 - PyKMIP fails with any kind: translate sorts them
        with contextlib.suppress(Exception):
            client.proxy.close()
        raise translate_transport(exc, host, port) from None
    return client


def translate_transport(exc: BaseException, host: str, port: int) -> KeyManagerError:
    """The error kind for a failure below KMIP (socket, TLS, framing)."""
    where = f"KMIP server {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return KeyAccessDenied(
            f"{where}: its certificate does not verify against our CA or name: "
            f"{exc.verify_message or exc.reason}"
        )
    if isinstance(exc, ssl.SSLError) and any(r in (exc.reason or "") for r in _REFUSAL_REASONS):
        return KeyAccessDenied(f"{where} refused our client certificate ({exc.reason})")
    if isinstance(exc, TimeoutError | socket.timeout):
        return ProviderUnavailable(f"{where} did not answer in time")
    if _is_transport_error(exc):
        return ProviderUnavailable(f"{where} is unreachable: {type(exc).__name__}: {exc}")
    return ProviderUnavailable(f"{where}: unexpected client failure: {type(exc).__name__}")


def _is_transport_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        OSError
        | EOFError
        | RequestLengthMismatch
        | pie_exceptions.ClientConnectionFailure
        | pie_exceptions.ClientConnectionNotOpen,
    )


class ConnectionPool:
    """Up to *size* open clients, each used by one thread at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        server_name: str,
        timeout: float,
        size: int = 4,
    ) -> None:
        self.host, self.port = host, port
        self._context = context
        self._server_name = server_name
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[ProxyKmipClient] = []
        self._lock = threading.Lock()
        self._closed = False

    def _take(self) -> tuple[ProxyKmipClient, bool]:
        with self._lock:
            if self._closed:
                raise ProviderUnavailable("the KMIP key manager is closed")
            if self._idle:
                return self._idle.pop(), True
        client = open_client(self.host, self.port, self._context, self._server_name, self._timeout)
        return client, False

    def _release(self, client: ProxyKmipClient, healthy: bool) -> None:
        with self._lock:
            if healthy and not self._closed:
                self._idle.append(client)
                return
        _close_quietly(client)

    def call(self, fn: Callable[[ProxyKmipClient], T]) -> T:
        """Run *fn* with a client of its own. A reused connection found dead (the server closed
        it while idle) is retried once on a fresh one; a timeout is not retried."""
        for attempt in (1, 2):
            with self._slots:
                client, reused = self._take()
                try:
                    result = fn(client)
                except pie_exceptions.KmipOperationFailure:
                    self._release(client, True)  # a KMIP-level refusal: the stream is intact
                    raise
                except BaseException as exc:
                    self._release(client, False)
                    if not _is_transport_error(exc):
                        raise
                    if attempt == 1 and reused and not isinstance(exc, TimeoutError):
                        continue
                    raise translate_transport(exc, self.host, self.port) from None
                self._release(client, True)
                return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for client in idle:
            _close_quietly(client)


def _close_quietly(client: ProxyKmipClient) -> None:
    with contextlib.suppress(Exception):
        client.close()
