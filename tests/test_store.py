"""The object store layer against SeaweedFS: part-by-part copies of objects above the CopyObject
limit (lowered here so the test stays small), through the store and through the mount."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from s3cryptfs.errors import ObjectTooLarge, PreconditionFailed
from s3cryptfs.store.s3 import S3Store, StoreSettings

MIB = 1024 * 1024


@pytest.fixture
def store(seaweed, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    s = S3Store(
        StoreSettings(
            bucket=bucket,
            endpoint_url=seaweed.endpoint_url,
            region="us-east-1",
            copy_threshold=1 * MIB,
            copy_part_size=5 * MIB,
        )
    )
    return s


def test_multipart_copy_keeps_bytes_and_metadata(store):
    body = os.urandom(12 * MIB + 12345)
    etag = store.put("src", body, {"a": "1", "b": "two"})
    new = store.copy("src", "dst", src_etag=etag, size=len(body))
    data, info = store.get_bounded("dst", 64 * MIB, "test object")
    assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
    assert info.metadata == {"a": "1", "b": "two"}
    assert info.etag == new


def test_multipart_copy_replaces_metadata(store):
    body = os.urandom(6 * MIB)
    etag = store.put("src", body, {"a": "1"})
    store.copy("src", "src", {"a": "2"}, src_etag=etag, size=len(body))
    data, info = store.get_bounded("src", 64 * MIB, "test object")
    assert data == body
    assert info.metadata == {"a": "2"}


def test_multipart_copy_refuses_a_changed_source(store):
    body = os.urandom(6 * MIB)
    store.put("src", body, {})
    with pytest.raises(PreconditionFailed):
        store.copy("src", "dst", src_etag='"0123456789abcdef0123456789abcdef"', size=len(body))


def test_get_bounded_refuses_a_larger_object_without_reading_its_body(store, monkeypatch):
    """One request: the size comes from the GET's own Content-Length, and the body of a
    larger object is never read."""
    from botocore.response import StreamingBody

    read: list[int] = []
    original = StreamingBody.read

    def counted(self, amt=None):
        data = original(self, amt)
        read.append(len(data))
        return data

    monkeypatch.setattr(StreamingBody, "read", counted)
    store.put("small", b"s" * 1000, {"k": "v"})
    store.put("large", os.urandom(3 * MIB), {})
    data, info = store.get_bounded("small", 1000, "test object")
    assert (data, info.metadata, info.size) == (b"s" * 1000, {"k": "v"}, 1000)
    read.clear()
    before = dict(store.requests)
    with pytest.raises(ObjectTooLarge) as exc:
        store.get_bounded("large", MIB, "directory index")
    assert str(exc.value) == (
        f"directory index large is {3 * MIB} bytes, more than the 1 MiB allowed: not read"
    )
    assert sum(read) == 0
    assert store.requests.get("get", 0) == before.get("get", 0) + 1
    assert store.requests.get("head", 0) == before.get("head", 0)


def test_rename_of_a_large_file_through_the_mount(make_volume, bucket):
    vol = make_volume(bucket=bucket)
    vol.env = {**vol.env, "S3CRYPTFS_COPY_THRESHOLD": "6M"}
    vol.init()
    vol.mount("--upload-delay", "0")  # uploaded at close: the chmod and rename copy in S3
    m = vol.mountpoint
    body = os.urandom(14 * MIB)
    (m / "d").mkdir()
    (m / "big").write_bytes(body)
    os.chmod(m / "big", 0o600)  # a metadata-only self-copy, part by part
    os.rename(m / "big", m / "d" / "moved")
    os.rename(m / "d", m / "e")  # and the directory rename path
    stats = json.loads(os.getxattr(m, "user.s3cryptfs.stats"))
    assert stats["requests"].get("upload_part_copy", 0) >= 3, stats  # chmod, rename, dir rename
    vol.remount()
    assert (m / "e" / "moved").read_bytes() == body
    assert os.stat(m / "e" / "moved").st_mode & 0o777 == 0o600
    assert not (m / "big").exists()


def test_cached_user_agent_is_the_one_botocore_builds(store):
    """The User-Agent is built once per feature set (store/s3.py): each request still carries
    exactly what botocore would have built for it."""
    creator = store._client._user_agent_creator
    seen: list[tuple[bytes, str]] = []

    def check(request, **kwargs):  # type: ignore[no-untyped-def]
        sent = request.headers.get("User-Agent")
        seen.append(
            (sent if isinstance(sent, bytes) else sent.encode(), type(creator).to_string(creator))
        )

    store._client.meta.events.register("before-send.s3", check)
    etag = store.put("ua/a", b"one", {})
    store.put("ua/b", b"two", {}, if_none_match=True)
    store.head("ua/a")
    store.get("ua/a", 0, 2, if_match=etag)
    assert len(seen) >= 4
    for sent, built in seen:
        assert sent == built.encode()
