"""The ObjectStore contract, for both implementations (--s3-client boto3 and native), against
SeaweedFS and against a tiny local HTTP server that answers what a test needs (503s)."""

from __future__ import annotations

import datetime
import http.server
import os
import socket
import threading
import time

import pytest
from conftest import AUTH_ACCESS_KEY, AUTH_SECRET_KEY
from servers import TcpProxy, local_http

from s3cryptfs.errors import (
    AccessDenied,
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


def test_head_many_answers_each_key_once_and_yields_its_errors(store):
    keys = [f"many/f{i:03d}" for i in range(60)]
    etags = {k: store.put(k, k.encode(), {"s3c-name": k}) for k in keys}
    before = store.requests.get("head", 0)
    results = list(store.head_many([*keys, "many/missing"], 8))
    assert sorted(k for k, _ in results) == sorted([*keys, "many/missing"])
    got = dict(results)
    assert isinstance(got.pop("many/missing"), ObjectNotFound)  # yielded, not raised
    for key, info in got.items():
        assert (info.key, info.size, info.etag) == (key, len(key), etags[key])
        assert info.metadata == {"s3c-name": key}
    assert store.requests["head"] - before == 61


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


def test_list_reads_names_that_need_escaping(store):
    # (store/listxml.py reads the usual reply without an XML tree: every name must survive)
    names = ["n/plain", "n/sp ace", "n/a+b", "n/caf\u00e9", 'n/q"<&>%2F', "n/t\tab"]
    etags = {name: store.put(name, name.encode(), {}) for name in names}
    page = store.list("n/")
    assert {o.key: o.etag for o in page.objects} == etags
    assert {o.key: o.size for o in page.objects} == {n: len(n.encode()) for n in names}
    assert all(o.mtime_ns and abs(o.mtime_ns / 1e9 - time.time()) < 120 for o in page.objects)


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


def test_multipart_round_trip_keeps_metadata_and_counts(store):
    parts = [os.urandom(5 * MIB), os.urandom(123)]
    before = store.bytes_sent
    uid = store.create_multipart("dir/mp +%~", {"s3c-a": "1", "s3c-b": "x=="}, "text/plain")
    etags = [store.upload_part("dir/mp +%~", uid, n, bytearray(p)) for n, p in enumerate(parts, 1)]
    final = store.complete_multipart("dir/mp +%~", uid, list(enumerate(etags, 1)), {})
    info = store.head("dir/mp +%~")
    assert (info.etag, info.size) == (final, sum(map(len, parts)))
    assert info.metadata == {"s3c-a": "1", "s3c-b": "x=="}
    assert store.get("dir/mp +%~") == b"".join(parts)
    assert store.bytes_sent - before == sum(map(len, parts))
    assert (store.requests["create_multipart"], store.requests["upload_part"]) == (1, 2)
    assert store.requests["complete_multipart"] == 1


def _one_part(store, key, body=b"new body"):
    uid = store.create_multipart(key, {"v": "new"})
    return uid, [(1, store.upload_part(key, uid, 1, body))]


def test_conditional_complete(store):
    old = store.put("k", b"old", {"v": "old"})
    uid, parts = _one_part(store, "k")
    with pytest.raises(PreconditionFailed):
        store.complete_multipart("k", uid, parts, {"IfNoneMatch": "*"})
    uid, parts = _one_part(store, "k")
    with pytest.raises(PreconditionFailed):
        store.complete_multipart("k", uid, parts, {"IfMatch": '"0123456789abcdef0123456789abcdef"'})
    assert store.get("k") == b"old" and store.head("k").etag == old
    new = store.complete_multipart("k", uid, parts, {"IfMatch": old})
    assert store.get("k") == b"new body" and store.head("k").etag == new
    uid, parts = _one_part(store, "fresh")
    store.complete_multipart("fresh", uid, parts, {"IfNoneMatch": "*"})
    assert store.head("fresh").metadata == {"v": "new"}
    assert store.errors == {"PreconditionFailed": 2}


def test_abort_discards_the_upload(store, caplog):
    uid, parts = _one_part(store, "aborted")
    store.abort_multipart("aborted", uid)
    with pytest.raises(ObjectNotFound):
        store.complete_multipart("aborted", uid, parts, {})
    with pytest.raises(ObjectNotFound):
        store.head("aborted")
    store.abort_multipart("aborted", "no-such-upload")  # best effort: never raises


def test_upload_file_multipart_and_conditional(seaweed, bucket, client, creds, tmp_path):
    store = open_store(
        StoreSettings(
            bucket=bucket,
            endpoint_url=seaweed.endpoint_url,
            client=client,
            multipart_threshold=6 * MIB,
            part_size=5 * MIB,
        )
    )
    path = tmp_path / "big"
    body = os.urandom(11 * MIB + 17)
    path.write_bytes(body)
    etag = store.upload_file("big", str(path), {"m": "1"}, if_none_match=True)
    assert store.requests["upload_part"] == 3
    with pytest.raises(PreconditionFailed):
        store.upload_file("big", str(path), {"m": "2"}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.upload_file("big", str(path), {"m": "2"}, if_match='"0000000000000000"')
    info = store.head("big")
    assert (info.etag, info.metadata) == (etag, {"m": "1"})
    store.upload_file("big", str(path), {"m": "3"}, if_match=etag)
    assert store.head("big").metadata == {"m": "3"} and store.get("big") == body


def test_copy_replaces_metadata_under_a_condition(store):
    src = "dir/a name+with %chars~"
    etag = store.put(src, b"payload", {"v": "1"})
    copied = store.copy(src, "dst", {"v": "2", "w": "x"}, src_etag=etag)
    info = store.head("dst")
    assert (info.etag, info.metadata) == (copied, {"v": "2", "w": "x"})
    assert store.get("dst") == b"payload"
    store.copy(src, "kept")
    assert store.head("kept").metadata == {"v": "1"}
    store.copy(src, src, {"v": "3"}, src_etag=etag)  # a metadata-only self-copy
    assert store.head(src).metadata == {"v": "3"} and store.get(src) == b"payload"
    store.put(src, b"changed", {"v": "1"})
    with pytest.raises(PreconditionFailed):
        store.copy(src, "dst", {"v": "4"}, src_etag=etag)
    with pytest.raises(ObjectNotFound):
        store.copy("missing", "dst", {"v": "5"})
    assert store.head("dst").metadata == {"v": "2", "w": "x"}


def test_multipart_copy(seaweed, bucket, client, creds):
    store = open_store(
        StoreSettings(
            bucket=bucket,
            endpoint_url=seaweed.endpoint_url,
            client=client,
            copy_threshold=1 * MIB,
            copy_part_size=5 * MIB,
        )
    )
    body = os.urandom(11 * MIB)
    etag = store.put("src b+", body, {"a": "1"})
    store.copy("src b+", "dst", src_etag=etag, size=len(body))
    assert store.get("dst") == body and store.head("dst").metadata == {"a": "1"}
    store.copy("src b+", "src b+", {"a": "2"}, src_etag=etag, size=len(body))
    assert store.get("src b+") == body and store.head("src b+").metadata == {"a": "2"}
    assert store.requests["upload_part_copy"] == 6
    with pytest.raises(PreconditionFailed):
        store.copy("src b+", "dst", {"a": "3"}, src_etag=etag, size=len(body))


def test_wrong_credentials_are_denied_at_once(seaweed_auth, client, monkeypatch):
    bucket = seaweed_auth.make_bucket(f"auth-{client}-{os.getpid()}-{time.monotonic_ns()}")
    settings = StoreSettings(bucket=bucket, endpoint_url=seaweed_auth.endpoint_url, client=client)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AUTH_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AUTH_SECRET_KEY)
    good = open_store(settings)
    etag = good.put("k", b"v", {"m": "1"})
    uid, parts = _one_part(good, "mp")  # every request of a multipart upload is signed right
    good.complete_multipart("mp", uid, parts, {"IfNoneMatch": "*"})
    good.copy("k", "c", {"m": "2"}, src_etag=etag)
    good.abort_multipart("mp", _one_part(good, "mp")[0])
    assert good.errors == {}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    bad = open_store(settings)
    calls = [
        lambda: bad.head("k"),
        lambda: bad.get("k"),
        lambda: bad.put("k", b"x", {}),
        lambda: bad.create_multipart("mp", {}),
        lambda: bad.upload_part("mp", uid, 1, b"x"),
        lambda: bad.complete_multipart("mp", uid, parts, {}),
        lambda: bad.copy("k", "c", {"m": "3"}),
    ]
    for call in calls:
        with pytest.raises(AccessDenied):
            call()
    assert sum(bad.requests.values()) == len(calls)  # none retried
    assert good.head("c").metadata == {"m": "2"}


def test_no_credentials_anywhere_is_one_clean_error(seaweed_auth, client, monkeypatch, capfd):
    """Neither environment, profile nor instance role: each request is refused as "no S3
    credentials found", at once, and no exception escapes inside the client (Python would
    print it, with its traceback, under the command's one-line error)."""
    import sys

    import botocore.session

    escaped: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", escaped.append)
    bucket = seaweed_auth.make_bucket(f"nocreds-{client}-{os.getpid()}-{time.monotonic_ns()}")
    session = botocore.session.get_session()
    monkeypatch.setattr(session, "get_credentials", lambda: None)
    monkeypatch.setattr(botocore.session, "get_session", lambda: session)
    store = open_store(
        StoreSettings(bucket=bucket, endpoint_url=seaweed_auth.endpoint_url, client=client)
    )
    capfd.readouterr()
    for call in (lambda: store.head("k"), lambda: store.put("k", b"v", {})):
        with pytest.raises(AccessDenied, match="no S3 credentials found"):
            call()
    assert capfd.readouterr().err == ""
    assert escaped == []


def test_refreshable_credentials_are_asked_again(seaweed_auth, client, monkeypatch):
    """Fixed keys are read once; credentials that expire (an instance role, SSO) are asked for
    again by the client, so a refreshed key signs the next request."""
    import botocore.credentials
    import botocore.session

    bucket = seaweed_auth.make_bucket(f"refresh-{client}-{os.getpid()}-{time.monotonic_ns()}")
    issued = []

    def refresh() -> dict[str, str]:
        # Within botocore's mandatory refresh window: it asks again at every use, as it
        # would for a role's credentials about to expire.
        secret = AUTH_SECRET_KEY if len(issued) != 1 else "revoked"
        issued.append(secret)
        return {
            "access_key": AUTH_ACCESS_KEY,
            "secret_key": secret,
            "token": "",
            "expiry_time": (datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5))
            .isoformat(),
        }

    session = botocore.session.get_session()
    monkeypatch.setattr(session, "get_credentials", lambda: creds)
    monkeypatch.setattr(botocore.session, "get_session", lambda: session)
    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(
        refresh(), refresh, "test-refresh"
    )
    store = open_store(
        StoreSettings(bucket=bucket, endpoint_url=seaweed_auth.endpoint_url, client=client)
    )
    calls = len(issued)
    with pytest.raises(AccessDenied):  # signed with the second key, which the server refuses
        store.put("k", b"v", {})
    store.put("k", b"v", {})  # and the third one works
    assert len(issued) >= calls + 2
    assert store.get("k") == b"v"


@pytest.fixture
def proxy(seaweed):
    """A TCP proxy in front of SeaweedFS that a test can make silent (blackhole)."""
    proxy = TcpProxy("127.0.0.1", seaweed.s3_port)
    yield proxy
    proxy.stop()


def _proxied_store(proxy, bucket, client):
    """A store through *proxy*, with timeouts of a second and retries for 30 s."""
    return open_store(
        StoreSettings(
            bucket=bucket,
            endpoint_url=proxy.endpoint_url,
            client=client,
            connect_timeout=1.0,
            read_timeout=1.0,
            retry_deadline=30.0,
        )
    )


def test_a_stalled_server_is_retried_until_it_answers(proxy, bucket, client, creds):
    store = _proxied_store(proxy, bucket, client)
    uid = store.create_multipart("mp", {"m": "1"})
    proxy.set_mode("blackhole")
    # Past the first stall's detection with room to spare: the native client sees a stall
    # after read + connect timeout (2 s) at its next once-a-second check, so by 3 s; a silence
    # that ended just then raced the cancel against the CRT's own resend.
    threading.Timer(5.0, proxy.set_mode, ("pass",)).start()
    etag = store.upload_part("mp", uid, 1, b"part")
    store.complete_multipart("mp", uid, [(1, etag)], {})
    assert store.get("mp") == b"part"
    assert store.errors.get("TransientStoreError", 0) >= 1
    assert store.requests["upload_part"] >= 2


def test_head_many_waits_out_a_stalled_server(proxy, bucket, client, creds):
    """HEADs sent together, then a server that stops answering: each stalled request is
    cancelled after the read timeout and sent again until the server is back."""
    store = _proxied_store(proxy, bucket, client)
    keys = [f"stall/f{i}" for i in range(6)]
    for key in keys:
        store.put(key, b"v", {})
    proxy.set_mode("blackhole")
    threading.Timer(3.0, proxy.set_mode, ("pass",)).start()
    results = dict(store.head_many(keys, 4))
    assert sorted(results) == keys
    assert all(info.etag == results[keys[0]].etag for info in results.values())
    assert store.errors.get("TransientStoreError", 0) >= 1


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

    def _document(self) -> None:
        """POST and PUT: the script holds (status, body) pairs."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        script = self.server.script  # type: ignore[attr-defined]
        status, body = script.pop(0) if len(script) > 1 else script[0]
        self.server.seen.append(status)  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"part"')
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self._document()

    def do_PUT(self) -> None:
        self._document()

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
    with local_http(_Scripted, script=[200], seen=[]) as server:
        yield server


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


def test_head_many_retries_5xx_and_yields_what_outlasts_the_deadline(scripted, client):
    scripted.script = [503, 503, 200]
    store = _scripted_store(scripted, client)
    results = dict(store.head_many(["a", "b", "c"], 3))
    assert sorted(results) == ["a", "b", "c"]
    assert all(info.metadata == {"k": "v"} for info in results.values())
    assert scripted.seen.count(503) == 2
    scripted.script, scripted.seen = [503], []
    store = _scripted_store(scripted, client, deadline=1.0)
    results = dict(store.head_many(["a", "b"], 2))
    for err in results.values():
        assert isinstance(err, TransientStoreError) and not isinstance(err, ObjectNotFound)
    assert len(scripted.seen) > 2  # retried before it gave up


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


def test_mount_round_trip(make_volume, bucket, client):
    vol = make_volume(bucket=bucket)
    vol.init()
    vol.mount("--s3-client", client)
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


_DECL = b'<?xml version="1.0" encoding="UTF-8"?>\n'
_COMPLETED = _DECL + (
    b'<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b'<Bucket>scripted</Bucket><Key>k</Key><ETag>"abc-1"</ETag></CompleteMultipartUploadResult>'
)
_COPIED = _DECL + (
    b'<CopyObjectResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b'<LastModified>2026-12-02T10:00:00.000Z</LastModified><ETag>"c0"</ETag></CopyObjectResult>'
)


def _error(code: str) -> bytes:
    return _DECL + f"<Error><Code>{code}</Code><Message>scripted</Message></Error>".encode()


@pytest.mark.parametrize(
    ("op", "done"),
    [
        ("complete", _COMPLETED),
        ("copy", _COPIED),
    ],
)
def test_an_error_in_a_200_is_classified_by_its_code(scripted, client, op, done):
    """S3 may answer CompleteMultipartUpload and CopyObject with 200 and then an error document
    (or a cut-off one): retried when its code is transient, refused by its kind otherwise."""
    store = _scripted_store(scripted, client)

    def call():
        if op == "complete":
            return store.complete_multipart("k", "u", [(1, '"part"')], {"IfNoneMatch": "*"})
        return store.copy("src", "k", {"m": "1"}, src_etag='"part"')

    scripted.script = [
        (200, _error("InternalError")),
        (503, _error("SlowDown")),
        (200, done[: len(done) // 2]),
        (200, done),
    ]
    assert call() == ('"abc-1"' if op == "complete" else '"c0"')
    # (botocore retries an error in a 200 once on its own, uncounted)
    assert scripted.seen == [200, 503, 200, 200]
    assert set(store.errors) == {"TransientStoreError"}
    for code, kind in [("AccessDenied", AccessDenied), ("PreconditionFailed", PreconditionFailed)]:
        scripted.script, scripted.seen = [(200, _error(code))], []
        with pytest.raises(kind):
            call()
        assert len(scripted.seen) <= 2


def test_5xx_on_multipart_requests_is_retried(scripted, client):
    store = _scripted_store(scripted, client)
    scripted.script = [(500, _error("InternalError")), (200, b"")]
    assert store.upload_part("k", "u", 1, b"body") == '"part"'
    scripted.script, scripted.seen = [(503, _error("ServiceUnavailable"))], []
    store = _scripted_store(scripted, client, deadline=1.0)
    with pytest.raises(TransientStoreError):
        store.create_multipart("k", {})
    assert len(scripted.seen) > 2


def test_get_bounded_reads_an_empty_and_a_middle_sized_object(store):
    """Empty (no range to ask for) and larger than the native store's first read (a second
    request), each whole and with its metadata."""
    store.put("empty", b"", {"m": "0"})
    body, info = store.get_bounded("empty", MIB, "test object")
    assert (body, info.metadata, info.size) == (b"", {"m": "0"}, 0)
    big = os.urandom(3 * MIB + 5)
    etag = store.put("middle", big, {"m": "1"})
    body, info = store.get_bounded("middle", 4 * MIB, "test object")
    assert (body, info.etag, info.metadata, info.size) == (big, etag, {"m": "1"}, len(big))


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:9000", "http://", "ftp://host", "http://h:port"])
def test_an_endpoint_that_is_no_url_is_a_usage_error(url, client):
    """Before either client parses it (the CRT's parser failed with a traceback)."""
    from s3cryptfs.errors import ConfigError

    with pytest.raises(ConfigError, match="is not an S3 endpoint"):
        open_store(StoreSettings(bucket="b", endpoint_url=url, client=client))


def test_an_endpoint_that_is_no_url_fails_the_mount_in_one_line(tmp_path):
    from tests.conftest import run_cli

    password = tmp_path / "pw"
    password.write_text("a password long enough")
    password.chmod(0o600)
    (tmp_path / "mnt").mkdir()
    done = run_cli(
        "mount", "s3://bucket/v", tmp_path / "mnt", "--endpoint-url", "notaurl",
        "--password-file", password,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "s3cryptfs: --endpoint-url 'notaurl' is not an S3 endpoint: give http://HOST[:PORT] "
        "or https://HOST[:PORT]"
    ]


def test_bodies_are_signed_over_plain_http_and_not_over_tls(monkeypatch):
    """botocore's store: unsigned bodies (no SHA-256 to compute) only where TLS protects them,
    decided by the endpoint the client resolved, a configured one included."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")

    def signing(endpoint: str | None) -> object:
        store = open_store(StoreSettings(bucket="b", endpoint_url=endpoint, client="boto3"))
        return store._client.meta.config.s3.get("payload_signing_enabled")  # type: ignore[attr-defined]

    assert signing("http://127.0.0.1:8333") is None  # botocore's default: signed over HTTP
    assert signing("https://s3.example.net") is False
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert signing(None) is False  # AWS S3: https
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    assert signing(None) is None


def test_get_bounded_start_sends_without_blocking_or_says_it_cannot(store, client):
    """The native client sends get_bounded's request from the caller's thread without waiting
    (an event loop's small reads); only a whole object in one reply is a result, anything
    else an error for get_bounded to handle. It never connects or waits for a connection:
    without an idle one it declines, as the boto3 store always does."""
    assert store.get_bounded_start("k", MIB, "file") is None  # (native: no idle connection)
    etag = store.put("k", b"small body", {"s3c-a": "1"})  # (now one is idle)
    if client == "boto3":
        assert store.get_bounded_start("k", MIB, "file") is None
        return
    pending = store.get_bounded_start("k", MIB, "file")
    assert pending is not None
    body, info = pending.done.result(timeout=10)
    assert (body, info.etag, info.size, info.metadata) == (b"small body", etag, 10, {"s3c-a": "1"})
    assert store.requests.get("get") == 1  # counted like any request
    store.put("big", os.urandom(MIB + 1000), {})
    for key, limit, kind in (
        ("missing", MIB, "HttpError"),  # (get_bounded says ObjectNotFound)
        ("big", 2 * MIB, "_Incomplete"),  # past the first read: a second request is needed
        ("big", 1000, "ObjectTooLarge"),  # refused at its headers (its connection closed)
    ):
        store.head("k")
        pending = store.get_bounded_start(key, limit, "file")
        assert pending is not None
        error = pending.done.exception(timeout=10)
        assert type(error).__name__ == kind, (key, error)
    with pytest.raises(ObjectNotFound):
        store.get_bounded("missing", MIB, "file")
