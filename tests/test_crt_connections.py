"""The native store's own HTTP connections (store/crtconn.py): kept alive and reused, bounded
by --max-connections, and a kept connection the server closed meanwhile costs no retry."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
import time

import pytest

from s3cryptfs.store import crtconn
from s3cryptfs.store.base import StoreSettings
from s3cryptfs.store.factory import open_store
from tests.servers import local_http


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; counts connections, and with server.drop_second closes a
    connection when its second request arrives, without answering it."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            srv.accepted += 1  # type: ignore[attr-defined]
            srv.now += 1  # type: ignore[attr-defined]
            srv.most = max(srv.most, srv.now)  # type: ignore[attr-defined]
        self.served = 0

    def finish(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.now -= 1  # type: ignore[attr-defined]
        super().finish()

    def do_HEAD(self) -> None:
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            srv.seen.append(self.path)  # type: ignore[attr-defined]
            srv.signed.append((self.headers["x-amz-content-sha256"], None))  # type: ignore[attr-defined]
        if self.served and srv.drop_second:  # type: ignore[attr-defined]
            self.close_connection = True
            return
        self.served += 1
        time.sleep(srv.delay)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.send_header("ETag", '"0123"')
        self.end_headers()

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.seen.append((self.path, len(body)))  # type: ignore[attr-defined]
            signed = self.headers["x-amz-content-sha256"]
            self.server.signed.append((signed, hashlib.sha256(body).hexdigest()))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.send_header("ETag", '"put"')
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def keepalive(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    state = {
        "lock": threading.Lock(),
        "accepted": 0,
        "now": 0,
        "most": 0,
        "seen": [],
        "signed": [],
    }
    with local_http(_KeepAlive, drop_second=False, delay=0.0, **state) as server:
        yield server


def _store(server, max_connections=64):
    host, port = server.server_address
    return open_store(
        StoreSettings(
            bucket="b",
            endpoint_url=f"http://{host}:{port}",
            client="native",
            retry_deadline=10.0,
            max_connections=max_connections,
        )
    )


def test_requests_share_a_few_kept_connections_within_the_bound(keepalive):
    keepalive.delay = 0.01  # long enough for the threads' requests to overlap
    store = _store(keepalive, max_connections=2)

    def heads(n: int) -> None:
        for i in range(5):
            assert store.head(f"t{n}-{i}").etag == '"0123"'

    threads = [threading.Thread(target=heads, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keepalive.seen) == 30
    assert keepalive.most <= 2  # never more open at once than the bound
    assert keepalive.accepted <= 2  # 30 requests, kept connections: no connect each
    assert not store.errors


def test_a_kept_connection_the_server_closed_is_sent_again_at_once(keepalive, caplog):
    keepalive.drop_second = True
    store = _store(keepalive)
    caplog.set_level(logging.WARNING)
    assert store.head("first").etag == '"0123"'
    started = time.monotonic()
    assert store.head("second").etag == '"0123"'
    # The second went out on the first's connection, which the server closed unanswered,
    # then on a new one: no retry (no warning, no error counted, no back-off).
    assert keepalive.seen == ["/b/first", "/b/second", "/b/second"]
    assert keepalive.accepted == 2
    assert not store.errors
    assert "retrying" not in caplog.text
    assert time.monotonic() - started < 1.0


def test_sending_a_body_counts_as_progress(keepalive, monkeypatch):
    """The stall watch sees a request move while its body is being sent (a slow uplink shared
    by many uploads is slow, not stalled): the body is read through the hook that says so."""
    moved: list[int] = []
    plain = crtconn.Body.readinto1

    def watched(self, buffer):  # type: ignore[no-untyped-def]
        n = plain(self, buffer)
        moved.append(n)
        return n

    monkeypatch.setattr(crtconn.Body, "readinto1", watched)
    store = _store(keepalive)
    assert store.put("k", b"x" * 300_000, {}) == '"put"'
    assert keepalive.seen == [("/b/k", 300_000)]
    assert sum(moved) == 300_000


def test_over_plain_http_a_body_is_signed_with_its_sha256(keepalive):
    """Without TLS, the body's SHA-256 goes in the signature (x-amz-content-sha256), which
    servers that check it (AWS S3, MinIO) compare with the body they got: a body changed on
    its way is refused instead of stored. Requests without a body stay unsigned."""
    store = _store(keepalive)
    body = bytes(range(256)) * 16
    store.put("k", body, {"a": "1"})
    [(signed, actual)] = keepalive.signed
    assert signed == actual == hashlib.sha256(body).hexdigest()
    store.head("k")
    assert keepalive.signed[1] == ("UNSIGNED-PAYLOAD", None)  # (no body: nothing to sign)
