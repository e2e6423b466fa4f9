"""The test infrastructure itself: real SeaweedFS instances and the fault-injecting proxy."""

import os
import socket
import time

import botocore.exceptions
import pytest
from conftest import AUTH_ACCESS_KEY, AUTH_SECRET_KEY, PASSWORD, is_mounted, run_cli
from servers import SeaweedFS, TcpProxy, free_port, free_port_pair, s3_client


def test_seaweed_round_trips_data_and_user_metadata(seaweed, s3client, bucket):
    s3client.put_object(
        Bucket=bucket, Key="dir/obj", Body=b"hello", Metadata={"s3cryptfs-mode": "0644"}
    )
    head = s3client.head_object(Bucket=bucket, Key="dir/obj")
    assert head["Metadata"] == {"s3cryptfs-mode": "0644"}
    assert head["ContentLength"] == 5
    assert s3client.get_object(Bucket=bucket, Key="dir/obj")["Body"].read() == b"hello"
    listing = s3client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [o["Key"] for o in listing["Contents"]] == ["dir/obj"]
    assert seaweed.proc.poll() is None


def test_bucket_fixture_gives_fresh_empty_buckets(s3client, bucket):
    assert len(bucket) >= 3 and bucket == bucket.lower()
    assert s3client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_seaweed_without_identities_accepts_any_credentials(seaweed, bucket):
    client = seaweed.client("whoever", "whatever")
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"x"


def test_seaweed_auth_refuses_bad_keys_and_accepts_good_ones(seaweed_auth):
    good = seaweed_auth.client(AUTH_ACCESS_KEY, AUTH_SECRET_KEY)
    good.create_bucket(Bucket="authz")
    good.put_object(Bucket="authz", Key="k", Body=b"secret")
    assert good.get_object(Bucket="authz", Key="k")["Body"].read() == b"secret"

    for access, secret in [
        (AUTH_ACCESS_KEY, "wrong-secret"),
        ("unknown-key", AUTH_SECRET_KEY),
    ]:
        bad = seaweed_auth.client(access, secret, retries={"total_max_attempts": 1})
        with pytest.raises(botocore.exceptions.ClientError) as info:
            bad.get_object(Bucket="authz", Key="k")
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3env_points_subprocesses_at_seaweed(seaweed, s3env):
    assert s3env["AWS_ACCESS_KEY_ID"] == seaweed.access_key
    assert s3env["AWS_SECRET_ACCESS_KEY"] == seaweed.secret_key
    assert s3env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert s3env["PATH"] == os.environ["PATH"]


def test_password_file_is_private_and_exact(password_file):
    assert password_file.read_bytes() == PASSWORD.encode()
    assert password_file.stat().st_mode & 0o777 == 0o600


def test_free_ports_are_free_and_distinct():
    ports = {free_port() for _ in range(5)}
    assert len(ports) == 5
    base = free_port_pair()
    for port in (base, base + 10000, *ports):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.fixture
def proxy(seaweed):
    with TcpProxy("127.0.0.1", seaweed.s3_port) as p:
        yield p


def _proxied_client(seaweed, proxy, **config):
    config.setdefault("connect_timeout", 2)
    config.setdefault("read_timeout", 2)
    config.setdefault("retries", {"total_max_attempts": 1})
    return s3_client(proxy.endpoint_url, seaweed.access_key, seaweed.secret_key, **config)


def test_proxy_passes_traffic(seaweed, proxy, bucket):
    client = _proxied_client(seaweed, proxy)
    client.put_object(Bucket=bucket, Key="via-proxy", Body=b"p" * 200_000)
    body = client.get_object(Bucket=bucket, Key="via-proxy")["Body"].read()
    assert body == b"p" * 200_000
    assert proxy.accepted >= 1


def test_proxy_blackhole_times_out_then_recovers(seaweed, proxy, bucket):
    client = _proxied_client(seaweed, proxy)
    client.put_object(Bucket=bucket, Key="k", Body=b"v")  # a pooled connection now exists

    proxy.set_mode("blackhole")
    started = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        client.get_object(Bucket=bucket, Key="k")
    assert 1.5 < time.monotonic() - started < 10

    fresh = _proxied_client(seaweed, proxy)  # a new connection is accepted but never answered
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        fresh.head_object(Bucket=bucket, Key="k")

    proxy.set_mode("pass")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    assert fresh.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_proxy_reset_gives_connection_errors(seaweed, proxy, bucket):
    client = _proxied_client(seaweed, proxy)
    client.put_object(Bucket=bucket, Key="k", Body=b"v")

    proxy.set_mode("reset")
    for _ in range(2):  # the pooled connection, then a new one
        with pytest.raises(
            (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
        ):
            client.get_object(Bucket=bucket, Key="k")
    assert proxy.connections() == 0

    proxy.set_mode("pass")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_proxy_stop_closes_everything(seaweed, bucket):
    proxy = TcpProxy("127.0.0.1", seaweed.s3_port, mode="blackhole")
    socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    deadline = time.monotonic() + 5
    while proxy.connections() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.connections() == 3
    proxy.stop()
    for sock in socks:
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        sock.close()
    assert proxy.connections() == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", proxy.port), timeout=2):
        pass


def test_seaweed_stop_ends_the_process_and_frees_the_port(tmp_path):
    server = SeaweedFS(tmp_path / "weed")
    pid, port = server.pid, server.s3_port
    client = server.client(retries={"total_max_attempts": 1}, connect_timeout=1)
    client.create_bucket(Bucket="bye")
    server.stop()
    assert server.proc.returncode is not None
    assert not os.path.exists(f"/proc/{pid}")  # reaped
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    server.stop()  # idempotent


def test_run_cli_reports_usage_errors(s3env):
    proc = run_cli("no-such-subcommand", env=s3env)
    assert proc.returncode != 0
    assert proc.stderr


def test_volume_helper_builds_the_documented_command_lines(make_volume, bucket):
    vol = make_volume(bucket=bucket, prefix="")
    assert vol.url == f"s3://{bucket}"
    assert vol.mountpoint.is_dir() and vol.cache_dir.is_dir()
    assert not vol.is_mounted()
    assert make_volume(bucket=bucket, prefix="a/b/").url == f"s3://{bucket}/a/b/"
    assert not is_mounted(vol.mountpoint)
    assert vol.cleanup() == []
