"""Key operations with a real KMS (PyKMIP's server, mutual TLS) through the mount: init in KMS
mode, rotate/rewrap/retire, migrate from the password manager, and a KMS outage."""

from __future__ import annotations

import errno
import json

import pytest
from kmip_server import KmipServer, make_pki
from servers import LOOPBACK, TcpProxy

from s3cryptfs.format import metadata as md
from tests.test_key_ops import admin, assert_files, envelope_versions, write_files

CLIENT = "s3cryptfs-client"
FILES = {"a.txt": b"alpha " * 1000, "sub/b.bin": bytes(range(256)) * 40, "c": b"c"}


@pytest.fixture(scope="module")
def kmip(tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("ops-kmip-pki"), [CLIENT])
    server = KmipServer(tmp_path_factory.mktemp("ops-kmip"), pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(kmip):
    p = TcpProxy(LOOPBACK, kmip.port)
    yield p
    p.stop()


def kms_config(path, kmip, port: int) -> str:
    pair = kmip.pki.clients[CLIENT]
    path.write_text(
        "[key_manager]\n"
        'provider = "kmip"\n'
        f'host = "{LOOPBACK}"\n'
        f"port = {port}\n"
        f'ca = "{kmip.pki.ca}"\n'
        f'cert = "{pair.cert}"\n'
        f'key = "{pair.key}"\n'
        "timeout = 5\n"
    )
    return str(path)


def mount_without_password(vol, *extra):
    """s3cryptfs mount with no password offered at all (KMS mode)."""
    vol.env = {k: v for k, v in vol.env.items() if k != "S3CRYPTFS_PASSWORD"}
    vol.run(
        "mount",
        vol.url,
        vol.mountpoint,
        "--endpoint-url",
        vol.endpoint_url,
        "--cache-dir",
        vol.cache_dir,
        *map(str, extra),
        require_detached=True,
    )
    assert vol.is_mounted()


def test_migrate_password_to_kmip_keeps_every_file_readable(volume, kmip, s3client, tmp_path):
    cfg = kms_config(tmp_path / "kms.toml", kmip, kmip.port)
    volume.init()
    volume.mount("--kms-config", cfg, "--descriptor-refresh", "1")
    write_files(volume.mountpoint, FILES)
    volume.remount()
    before = envelope_versions(s3client, volume.bucket, volume.prefix)
    assert set(before.values()) == {("s3cryptfs-password", "1")}

    audit = tmp_path / "audit.jsonl"
    out = admin(volume, "migrate", "--to", "kmip", "--kms-config", cfg, "--audit-log", audit)
    assert "active key manager: kmip (previous: s3cryptfs-password)" in out.stdout
    assert f"{len(FILES)} re-wrapped" in out.stdout
    assert "previous key manager(s) dropped" in out.stdout
    after = envelope_versions(s3client, volume.bucket, volume.prefix)
    assert set(after.values()) == {("kmip", "1")}
    desc = json.loads(
        s3client.get_object(Bucket=volume.bucket, Key=f"{volume.prefix}.s3cryptfs/volume.json")[
            "Body"
        ].read()
    )
    assert desc["key_manager"]["provider"] == "kmip" and "previous_key_managers" not in desc
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    events = [r["event"] for r in records]
    files = [r for r in records if r["event"] == "rewrap" and "/.s3cryptfs/" not in r["object"]]
    assert len(files) == len(FILES) and "migrate" in events  # (directory indexes besides)

    # The mount that ran throughout still reads everything and now writes under the KMS.
    assert_files(volume.mountpoint, FILES)
    (volume.mountpoint / "new.txt").write_bytes(b"after the migration")
    volume.umount()
    meta = s3client.head_object(Bucket=volume.bucket, Key=f"{volume.prefix}new.txt")["Metadata"]
    assert meta[md.KMS_PROVIDER] == "kmip"

    # A rerun is a no-op; a KMS-only mount needs no password at all.
    again = admin(volume, "migrate", "--to", "kmip", "--kms-config", cfg)
    assert "0 re-wrapped" in again.stdout
    mount_without_password(volume, "--kms-config", cfg)
    assert_files(volume.mountpoint, {**FILES, "new.txt": b"after the migration"})


@pytest.mark.expect_log_errors(r"KMIP server \S+ is unreachable")
def test_kms_volume_rotate_rewrap_retire_and_outage(volume, kmip, proxy, s3client, tmp_path):
    cfg = kms_config(tmp_path / "kms.toml", kmip, proxy.port)
    volume.init("--key-manager", "kmip", "--kms-config", cfg)
    log = tmp_path / "mount.log"
    mount_without_password(volume, "--kms-config", cfg, "--dek-cache-ttl", "0", "--log-file", log)
    write_files(volume.mountpoint, FILES)
    volume.umount()
    assert set(envelope_versions(s3client, volume.bucket, volume.prefix).values()) == {
        ("kmip", "1")
    }
    rotated = admin(volume, "keys", "rotate", "--kms-config", cfg).stdout
    assert "kmip: new active key version 2" in rotated
    status = admin(volume, "keys", "status", "--count", "--kms-config", cfg).stdout
    assert "active: kmip version 2" in status and f"objects: {len(FILES)}" in status
    refused = admin(volume, "keys", "retire", "1", "--kms-config", cfg, check=False)
    assert refused.returncode == 6
    assert f"{len(FILES)} re-wrapped" in admin(volume, "rewrap", "--kms-config", cfg).stdout
    admin(volume, "keys", "retire", "1", "--kms-config", cfg)
    assert set(envelope_versions(s3client, volume.bucket, volume.prefix).values()) == {
        ("kmip", "2")
    }
    # init, rotate and retire published the key identity only: how this machine reaches its
    # KMIP server (host, port, certificates) stays in its --kms-config.
    raw = s3client.get_object(Bucket=volume.bucket, Key=f"{volume.prefix}.s3cryptfs/volume.json")
    settings = json.loads(raw["Body"].read())["key_manager"]["settings"]
    assert set(settings) <= {"keys", "wrap_mode"} and len(settings["keys"]) == 2, settings

    mount_without_password(volume, "--kms-config", cfg, "--dek-cache-ttl", "0", "--log-file", log)
    assert (volume.mountpoint / "a.txt").read_bytes() == FILES["a.txt"]
    proxy.set_mode("reset")  # the KMS goes away
    with pytest.raises(OSError) as info:
        (volume.mountpoint / "sub" / "b.bin").read_bytes()
    assert info.value.errno == errno.EIO
    lines = [line for line in log.read_text().splitlines() if f"{volume.prefix}sub/b.bin" in line]
    assert any("cannot unwrap its data key" in line for line in lines), log.read_text()
    assert volume.is_mounted()
    proxy.set_mode("pass")  # it comes back: the same mount reads the file
    assert (volume.mountpoint / "sub" / "b.bin").read_bytes() == FILES["sub/b.bin"]
    volume.umount()
