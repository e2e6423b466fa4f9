"""Robustness through the real CLI and a real mount: bad credentials and endpoints, tampering,
crashes, big files and concurrent writers."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import time

import pytest

PLAINTEXT = b"S3CRYPTFS-PLAINTEXT-CANARY-7f3a9c1e-do-not-leak"
CHUNK = 64 * 1024
HEADER = 28
TAG = 16


def objects(s3client, bucket: str) -> dict[str, str]:
    """key -> ETag of every object in the bucket."""
    out = {}
    for page in s3client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["ETag"]
    return out


def get_body(s3client, bucket: str, key: str) -> bytes:
    return s3client.get_object(Bucket=bucket, Key=key)["Body"].read()


def replace_body(s3client, bucket: str, key: str, body: bytes) -> None:
    head = s3client.head_object(Bucket=bucket, Key=key)
    s3client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=head["Metadata"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_eio(path) -> None:
    with pytest.raises(OSError) as info:
        with open(path, "rb") as f:
            f.read()
    assert info.value.errno == errno.EIO, info.value


# --------------------------------------------------------------------------------------------
# Bad configuration


def test_wrong_password_refused_without_writing(volume, s3client, tmp_path):
    volume.init()
    before = objects(s3client, volume.bucket)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    wrong.chmod(0o600)
    proc = volume.run(
        "mount",
        volume.url,
        volume.mountpoint,
        "--endpoint-url",
        volume.endpoint_url,
        "--password-file",
        wrong,
        "--cache-dir",
        volume.cache_dir,
        check=False,
    )
    assert proc.returncode == 3, proc
    assert "wrong password" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert not volume.is_mounted()
    assert objects(s3client, volume.bucket) == before


def test_missing_bucket(make_volume):
    vol = make_volume(bucket="t-missing-bucket-0000")
    proc = vol.init(check=False)
    assert proc.returncode == 4  # an S3 error (docs/CLI.md)
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vol.mount(check=False)
    assert proc.returncode == 4
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not vol.is_mounted()


def test_unreachable_endpoint(make_volume, bucket):
    vol = make_volume(bucket=bucket, endpoint_url=f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    proc = vol.mount("--s3-timeout", "3", check=False)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert proc.stderr.strip(), proc
    assert "Traceback" not in proc.stderr
    assert not vol.is_mounted()
    start = time.monotonic()
    proc = vol.init(check=False)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert proc.stderr.strip(), proc
    assert "Traceback" not in proc.stderr


def test_a_refused_first_contact_fails_the_mount_at_once(make_volume, bucket):
    """Connection refused is not worth the whole --s3-timeout (45 s by default) at mount: the
    mount fails within seconds, with the S3 exit code and the reason."""
    vol = make_volume(bucket=bucket, endpoint_url=f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    proc = vol.mount(check=False)
    took = time.monotonic() - start
    assert proc.returncode == 4, proc
    assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    assert took < 15, took  # not the 45 s deadline (5 s when the machine is idle)
    assert not vol.is_mounted()


def test_a_silent_endpoint_is_still_retried_until_the_deadline(make_volume, bucket):
    """An endpoint that accepts connections and does not answer may be a server under load:
    that is retried for --s3-timeout, as before."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        vol = make_volume(bucket=bucket, endpoint_url=f"http://127.0.0.1:{port}")
        start = time.monotonic()
        proc = vol.mount("--s3-timeout", "6", check=False)
        took = time.monotonic() - start
    assert proc.returncode == 4, proc
    assert took >= 6, took
    assert not vol.is_mounted()


def test_password_file_readable_by_others_refused(volume, password_file):
    password_file.chmod(0o644)
    proc = volume.init(check=False)
    assert proc.returncode != 0
    assert "chmod 600" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Confidentiality and integrity


def test_no_plaintext_in_bucket(mounted, s3client):
    mnt = mounted.mountpoint
    (mnt / "small.txt").write_bytes(PLAINTEXT)
    (mnt / "big.bin").write_bytes(PLAINTEXT * 5000)
    (mnt / "sub").mkdir()
    (mnt / "sub" / "nested.txt").write_bytes(b"x" * 100 + PLAINTEXT + b"y" * 100)
    mounted.umount()
    keys = objects(s3client, mounted.bucket)
    assert len(keys) >= 3
    for key in keys:
        assert PLAINTEXT not in get_body(s3client, mounted.bucket, key), key


def _key(vol, name: str) -> str:
    return vol.prefix + name


def _setup_two_files(mounted, size_a=1000, size_b=1000):
    mnt = mounted.mountpoint
    a, b = os.urandom(size_a), os.urandom(size_b)
    (mnt / "a.bin").write_bytes(a)
    (mnt / "b.bin").write_bytes(b)
    (mnt / "ok.txt").write_bytes(b"still fine")
    mounted.umount()
    return a, b


def _check_alive(mounted) -> None:
    assert (mounted.mountpoint / "ok.txt").read_bytes() == b"still fine"
    assert mounted.is_mounted()


@pytest.mark.expect_log_errors(r"failed authentication")
def test_tamper_flipped_byte(mounted, s3client):
    _setup_two_files(mounted)
    key = _key(mounted, "a.bin")
    body = bytearray(get_body(s3client, mounted.bucket, key))
    body[HEADER + 10] ^= 0x01
    replace_body(s3client, mounted.bucket, key, bytes(body))
    mounted.mount()
    assert_eio(mounted.mountpoint / "a.bin")
    _check_alive(mounted)


@pytest.mark.expect_log_errors(r"failed authentication")
def test_tamper_dropped_last_chunk(mounted, s3client):
    _setup_two_files(mounted, size_a=200 * 1024)
    key = _key(mounted, "a.bin")
    body = get_body(s3client, mounted.bucket, key)
    assert len(body) == HEADER + 200 * 1024 + 4 * TAG
    cut = HEADER + 3 * (CHUNK + TAG)  # three full chunks, the final 8 KiB chunk dropped
    replace_body(s3client, mounted.bucket, key, body[:cut])
    mounted.mount()
    assert_eio(mounted.mountpoint / "a.bin")
    _check_alive(mounted)


@pytest.mark.expect_log_errors(r"failed authentication")
def test_tamper_swapped_bodies(mounted, s3client):
    _setup_two_files(mounted)
    ka, kb = _key(mounted, "a.bin"), _key(mounted, "b.bin")
    body_a = get_body(s3client, mounted.bucket, ka)
    body_b = get_body(s3client, mounted.bucket, kb)
    replace_body(s3client, mounted.bucket, ka, body_b)
    replace_body(s3client, mounted.bucket, kb, body_a)
    mounted.mount()
    assert_eio(mounted.mountpoint / "a.bin")
    assert_eio(mounted.mountpoint / "b.bin")
    _check_alive(mounted)


# --------------------------------------------------------------------------------------------
# Crashes, size, concurrency


def test_256mib_file_survives_remount(mounted):
    path = mounted.mountpoint / "big.bin"
    h = hashlib.sha256()
    block = 4 * 1024 * 1024
    with open(path, "wb") as f:
        for _ in range(256 * 1024 * 1024 // block):
            chunk = os.urandom(block)
            h.update(chunk)
            f.write(chunk)
    expected = h.hexdigest()

    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        return h.hexdigest()

    assert digest() == expected
    mounted.remount()
    assert os.stat(path).st_size == 256 * 1024 * 1024
    assert digest() == expected


@pytest.mark.expect_log_errors(r"was changed by another writer")
def test_concurrent_external_change_not_overwritten(mounted, s3client):
    path = mounted.mountpoint / "shared.txt"
    key = _key(mounted, "shared.txt")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"first version from the mount")
        os.fsync(fd)
        assert key in objects(s3client, mounted.bucket)
        external = b"raw bytes written by another client"
        s3client.put_object(Bucket=mounted.bucket, Key=key, Body=external)
        os.pwrite(fd, b"second version from the mount", 0)
        fsync_failed = False
        try:
            os.fsync(fd)
        except OSError:
            fsync_failed = True
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    if not fsync_failed:
        mounted.umount()
    assert get_body(s3client, mounted.bucket, key) == external
    if not fsync_failed:
        conflicts = [
            k for k in objects(s3client, mounted.bucket) if k.startswith(key + ".conflict-")
        ]
        assert conflicts, objects(s3client, mounted.bucket)
        mounted.mount()
        name = conflicts[0][len(mounted.prefix) :]
        assert (mounted.mountpoint / name).read_bytes() == b"second version from the mount"


def test_password_file_mode_check_is_strict(volume, password_file):
    password_file.chmod(0o640)
    proc = volume.init(check=False)
    assert proc.returncode != 0
    assert "chmod 600" in proc.stderr
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o640
