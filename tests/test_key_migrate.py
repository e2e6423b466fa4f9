"""migrate: a password volume with files moves to the database key store and to Vault/OpenBao
Transit, with every file readable at every step and the running mount kept working."""

from __future__ import annotations

import json

import pytest
from kms_volume import envelopes, mount_kms
from test_key_keystore import keystore_config
from test_key_ops import FILES, admin, assert_files, write_files
from test_key_vault import bao, vault_config  # noqa: F401 - bao is a fixture


def descriptor(s3client, vol) -> dict:
    key = f"{vol.prefix}.s3cryptfs/volume.json"
    return json.loads(s3client.get_object(Bucket=vol.bucket, Key=key)["Body"].read())


@pytest.mark.parametrize("target", ["keystore", "vault"])
def test_migrate_password_volume(target, volume, s3client, tmp_path, request):
    if target == "keystore":
        cfg = keystore_config(tmp_path / "kms.toml", f"sqlite:///{tmp_path / 'keys.db'}", None)
    else:
        server = request.getfixturevalue("bao")
        cfg = vault_config(tmp_path / "kms.toml", server, server.root_token)
    volume.init()
    volume.mount("--kms-config", cfg, "--descriptor-refresh", "1")
    write_files(volume.mountpoint, FILES)
    volume.remount()
    before = envelopes(s3client, volume.bucket, volume.prefix)
    assert {p for p, _, _ in before.values()} == {"s3cryptfs-password"}

    out = admin(volume, "migrate", "--to", target, "--kms-config", cfg).stdout
    assert f"{len(FILES)} re-wrapped" in out, out
    after = envelopes(s3client, volume.bucket, volume.prefix)
    assert {p for p, _, _ in after.values()} == {target}
    desc = descriptor(s3client, volume)
    assert desc["key_manager"]["provider"] == target and "previous_key_managers" not in desc

    # the mount that ran throughout still reads everything and writes under the new manager
    assert_files(volume.mountpoint, FILES)
    (volume.mountpoint / "after.txt").write_bytes(b"written after the migration")
    volume.umount()
    assert envelopes(s3client, volume.bucket, volume.prefix)["after.txt"][0] == target

    # no password is needed any more
    mount_kms(volume, cfg)
    assert_files(volume.mountpoint, {**FILES, "after.txt": b"written after the migration"})
