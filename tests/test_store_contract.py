"""The ObjectStore contract, for both implementations (--s3-client boto3 and native), against
SeaweedFS and against a tiny local HTTP server that answers what a test needs (503s)."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time

import pytest

from s3cryptfs.errors import (
    EndpointUnreachable,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    TransientStoreError,
)
from s3cryptfs.store.base import StoreSettings
from s3cryptfs.store.factory import open_store

MIB = 1024 * 1024
CLIENTS = ["boto3", "native"]


@pytest.fixture(params=CLIENTS)
def client(request):
    return request.param


@pytest.fixture
def creds(seaweed, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)


@pytest.fixture
def store(seaweed, bucket, client, creds):
    return open_store(
        StoreSettings(bucket=bucket, endpoint_url=seaweed.endpoint_url, client=client)
    )


def test_the_setting_picks_the_implementation(store, client):
    assert type(store).__name__ == {"boto3": "S3Store", "native": "NativeStore"}[client]


def test_conditional_put(store):
    etag = store.put("k", b"one", {"a": "1"}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"two", {}, if_none_match=True)
    new = store.put("k", b"two", {"a": "2"}, if_match=etag)
    assert new != etag
    with pytest.raises(PreconditionFailed):
        store.put("k", b"three", {}, if_match=etag)
    assert store.get("k") == b"two"
    assert store.errors.get("PreconditionFailed") == 2


def test_get_with_if_match_and_range(store):
    etag = store.put("k", b"0123456789", {})
    assert store.get("k", 2, 5, if_match=etag) == b"2345"
    assert store.get("k", 7) == b"789"
    store.put("k", b"changed", {})
    with pytest.raises(PreconditionFailed):
        store.get("k", 0, 3, if_match=etag)


def test_head_and_get_bounded_return_metadata(store):
    key = "dir/a name+with %chars~"
    etag = store.put(key, b"body", {"s3c-one": "v1", "s3c-two": "AbC="})
    info = store.head(key)
    assert (info.key, info.size, info.etag) == (key, 4, etag)
    assert info.metadata == {"s3c-one": "v1", "s3c-two": "AbC="}
    assert abs(info.mtime_ns / 1e9 - time.time()) < 120
    body, whole = store.get_bounded(key, 10, "test object")
    assert body == b"body" and whole.metadata == info.metadata and whole.etag == etag
    assert store.read_companion(key) == (info.metadata, b"body")


def test_list_with_delimiter_and_pages(store):
    for i in range(1003):
        store.put(f"p/f{i:04d}", b"", {})
    store.put("p/sub/x", b"1", {})
    store.put("p/marker/", b"", {})
    store.put("pq", b"", {})
    first = store.list("p/")
    assert len(first.objects) == 1000 and first.token
    assert first.server_time_ns and abs(first.server_time_ns / 1e9 - time.time()) < 120
    pages = list(store.list_all("p/"))
    keys = [o.key for page in pages for o in page.objects]
    prefixes = [p for page in pages for p in page.prefixes]
    assert keys == [f"p/f{i:04d}" for i in range(1003)]
    assert sorted(prefixes) == ["p/marker/", "p/sub/"]
    flat = [o.key for page in store.list_all("p/", delimiter=None) for o in page.objects]
    assert "p/sub/x" in flat and "p/marker/" in flat and len(flat) == 1005
    after = store.list("p/f", start_after="p/f0999")
    assert [o.key for o in after.objects] == ["p/f1000", "p/f1001", "p/f1002"]
    assert store.list("p/f100").objects[0].key == "p/f1000"  # a prefix, not a path segment


def test_get_bounded_refuses_an_oversized_object_in_one_request(store):
    store.put("large", os.urandom(3 * MIB), {})
    before_get = store.requests.get("get", 0)
    before_bytes = store.bytes_received
    with pytest.raises(ObjectTooLarge) as exc:
        store.get_bounded("large", MIB, "directory index")
    assert str(exc.value) == (
        f"directory index large is {3 * MIB} bytes, more than the 1 MiB allowed: not read"
    )
    assert store.requests.get("get", 0) == before_get + 1
    assert store.requests.get("head", 0) == 0
    assert store.bytes_received == before_bytes


def test_missing_object_and_counters(store):
    with pytest.raises(ObjectNotFound):
        store.head("nothing")
    with pytest.raises(ObjectNotFound):
        store.get("nothing")
    store.put("k", b"12345", {})
    store.get("k")
    store.delete("k")
    with pytest.raises(ObjectNotFound):
        store.head("k")
    assert store.bytes_sent >= 5 and store.bytes_received >= 5
    assert store.requests["head"] == 2 and store.errors["ObjectNotFound"] == 3


def test_multipart_and_copy_work_through_the_store(store):
    body = os.urandom(6 * MIB)
    uid = store.create_multipart("mp", {"m": "1"})
    etag = store.upload_part("mp", uid, 1, body)
    final = store.complete_multipart("mp", uid, [(1, etag)], {"IfNoneMatch": "*"})
    assert store.head("mp").etag == final
    copied = store.copy("mp", "cp", {"m": "2"}, src_etag=final)
    assert store.head("cp").metadata == {"m": "2"} and store.head("cp").etag == copied


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next status of the server's script (the last repeats)."""

    def _answer(self, with_body: bool) -> None:
        script = self.server.script  # type: ignore[attr-defined]
        status = script.pop(0) if len(script) > 1 else script[0]
        self.server.seen.append(status)  # type: ignore[attr-defined]
        body = b""
        if status >= 400 and with_body:
            code = {503: "ServiceUnavailable", 404: "NoSuchKey", 500: "InternalError"}[status]
            body = f"<Error><Code>{code}</Code><Message>scripted</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if status >= 400 else 5))
        self.send_header("ETag", '"0123"')
        self.send_header("Last-Modified", "Wed, 02 Dec 2026 10:00:00 GMT")
        self.send_header("x-amz-meta-k", "v")
        self.end_headers()
        if with_body:
            self.wfile.write(body if status >= 400 else b"hello")

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.seen = [200], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _scripted_store(server, client, deadline=10.0):
    host, port = server.server_address
    return open_store(
        StoreSettings(
            bucket="scripted",
            endpoint_url=f"http://{host}:{port}",
            client=client,
            retry_deadline=deadline,
        )
    )


def test_5xx_is_retried_then_succeeds(scripted, client):
    scripted.script = [503, 503, 200]
    store = _scripted_store(scripted, client)
    info = store.head("k")
    assert (info.size, info.etag, info.metadata) == (5, '"0123"', {"k": "v"})
    assert store.get("k") == b"hello"
    assert scripted.seen == [503, 503, 200, 200]
    assert set(store.errors) == {"TransientStoreError"}


@pytest.mark.parametrize("status", [503, 500])
def test_5xx_is_never_not_found(scripted, client, status):
    scripted.script = [status]
    store = _scripted_store(scripted, client, deadline=1.0)
    for call in (lambda: store.head("k"), lambda: store.get("k")):
        with pytest.raises(TransientStoreError) as exc:
            call()
        assert not isinstance(exc.value, ObjectNotFound)
    assert len(scripted.seen) > 2  # retried


def test_404_is_not_found_at_once(scripted, client):
    scripted.script = [404]
    store = _scripted_store(scripted, client)
    with pytest.raises(ObjectNotFound):
        store.get("k")
    assert scripted.seen == [404]


def test_a_refused_port_fails_fast_on_first_contact(client, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    store = open_store(
        StoreSettings(
            bucket="nowhere", endpoint_url=f"http://127.0.0.1:{port}", client=client,
            retry_deadline=30.0,
        )
    )
    start = time.monotonic()
    with pytest.raises(EndpointUnreachable):
        store.check_bucket(definitive_after=1.0)
    assert time.monotonic() - start < 5.0


def test_native_mount_round_trip(make_volume, bucket):
    vol = make_volume(bucket=bucket)
    vol.init()
    vol.mount("--s3-client", "native")
    m = vol.mountpoint
    body = os.urandom(200_000)
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(body)
    (m / "small").write_text("hello")
    vol.remount()
    assert (m / "d" / "f").read_bytes() == body
    assert sorted(os.listdir(m)) == ["d", "small"]
    assert os.stat(m / "d" / "f").st_size == len(body)
    os.rename(m / "small", m / "d" / "moved")
    vol.remount()
    assert (m / "d" / "moved").read_text() == "hello"
    assert sorted(os.listdir(m / "d")) == ["f", "moved"]
