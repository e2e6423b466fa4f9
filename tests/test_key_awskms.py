"""The AWS KMS key manager against moto's server (a MOCK of KMS: it binds EncryptionContext but
ignores key policies and key state; see docs/KMS.md)."""

from __future__ import annotations

import os

import pytest
from kms_servers import MotoServer
from servers import LOOPBACK, free_port

from s3cryptfs.errors import KeyManagerError, KeyNotFound, KeyRetired, UnwrapFailed
from s3cryptfs.keys.awskms import AwsKmsKeyManager, create_settings
from s3cryptfs.keys.base import KeyAdmin
from s3cryptfs.keys.registry import load_key_manager
from tests.keymanager_conformance import CONTEXT, Conformance

SECRETS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_manager(moto):
    local = {"endpoint_url": moto.endpoint_url, "timeout": 5}
    descriptor = create_settings({**local, "region": "us-east-1", "volume_id": "v"}, SECRETS)
    made: list[AwsKmsKeyManager] = []

    def make(settings=None) -> AwsKmsKeyManager:
        m = AwsKmsKeyManager({**(settings or descriptor), **local}, SECRETS)
        made.append(m)
        return m

    make.descriptor = descriptor
    yield make
    for m in made:
        m.close()


@pytest.fixture
def manager(make_manager):
    return make_manager()


@pytest.fixture
def unreachable_manager():
    m = AwsKmsKeyManager(
        {
            "key_ids": ["k"],
            "region": "us-east-1",
            "endpoint_url": f"http://{LOOPBACK}:{free_port()}",
            "timeout": 1,
        },
        SECRETS,
    )
    yield m
    m.close()


class TestAwsKmsManager(Conformance):
    def test_registered(self, make_manager) -> None:
        m = load_key_manager(
            "awskms", {**make_manager.descriptor, "endpoint_url": "http://x"}, SECRETS
        )
        assert isinstance(m, AwsKmsKeyManager) and isinstance(m, KeyAdmin)
        m.close()

    def test_descriptor_fields(self, make_manager) -> None:
        d = make_manager.descriptor
        assert set(d) == {"key_ids", "region"} and d["key_ids"][0].startswith("arn:aws:kms:")

    def test_encryption_context_is_bound(self, manager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises(UnwrapFailed):
            manager.unwrap_key(env, {"volume_id": "another-volume"})

    def test_rotate_dual_read_and_retire(self, manager, make_manager) -> None:
        dek = os.urandom(32)
        old = manager.wrap_key(dek, CONTEXT)
        rotated = manager.rotate()
        assert len(rotated["key_ids"]) == 2 and rotated["key_ids"][0] == old.key_id
        after = make_manager(rotated)
        assert after.active_key_version() == 2
        new = after.wrap_key(os.urandom(32), CONTEXT)
        assert new.key_version == 2 and new.key_id == rotated["key_ids"][1]
        assert after.unwrap_key(old, CONTEXT) == dek
        assert [(i.version, i.state) for i in after.versions()] == [
            (1, "decrypt-only"),
            (2, "active"),
        ]
        with pytest.raises(KeyManagerError):
            after.retire(2)
        retired = after.retire(1)
        assert retired["retired"] == [1]
        final = make_manager(retired)
        with pytest.raises(KeyRetired):
            final.unwrap_key(old, CONTEXT)
        assert final.unwrap_key(new, CONTEXT) == after.unwrap_key(new, CONTEXT)
        with pytest.raises(KeyNotFound):
            final.retire(5)


def test_awskms_volume_init_write_remount_rotate(volume, moto, s3client, tmp_path) -> None:
    from kms_volume import envelopes, mount_kms
    from test_key_ops import admin, assert_files, write_files

    files = {"a.txt": b"alpha " * 2000, "sub/b.bin": bytes(range(256)) * 64}
    cfg = tmp_path / "kms.toml"
    cfg.write_text(
        "[key_manager]\n"
        'provider = "awskms"\n'
        'region = "us-east-1"\n'
        f'endpoint_url = "{moto.endpoint_url}"\n'
        "timeout = 5\n"
        "[key_manager.secrets]\n"
        'aws_access_key_id = "testing"\n'
        'aws_secret_access_key = "testing"\n'
    )
    cfg.chmod(0o600)
    volume.init("--key-manager", "awskms", "--kms-config", cfg)
    mount_kms(volume, cfg)
    write_files(volume.mountpoint, files)
    volume.umount()
    ((provider, key, version),) = set(envelopes(s3client, volume.bucket, volume.prefix).values())
    assert provider == "awskms" and key.startswith("arn:aws:kms:") and version == "1"
    assert (
        "awskms: new active key version 2"
        in admin(volume, "keys", "rotate", "--kms-config", cfg).stdout
    )
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    assert_files(volume.mountpoint, files)
    (volume.mountpoint / "new.txt").write_bytes(b"v2")
    volume.umount()
    assert envelopes(s3client, volume.bucket, volume.prefix)["new.txt"][2] == "2"
    assert f"{len(files)} re-wrapped" in admin(volume, "rewrap", "--kms-config", cfg).stdout
    admin(volume, "keys", "retire", "1", "--kms-config", cfg)
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    assert_files(volume.mountpoint, {**files, "new.txt": b"v2"})
    volume.umount()
