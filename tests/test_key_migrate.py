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


def test_retiring_the_last_version_of_a_previous_manager_points_to_migrate(
    volume, s3client, tmp_path
):
    """After `migrate --keep-old`, the password manager is only kept for reading. Retiring its
    last version must not advise `keys rotate` (which only rotates the active manager)."""
    cfg = keystore_config(tmp_path / "kms.toml", f"sqlite:///{tmp_path / 'keys.db'}", None)
    volume.init()
    volume.mount()
    write_files(volume.mountpoint, FILES)
    volume.umount()
    admin(volume, "migrate", "--to", "keystore", "--kms-config", cfg, "--keep-old")
    desc = descriptor(s3client, volume)
    assert [m["provider"] for m in desc["previous_key_managers"]] == ["s3cryptfs-password"]
    refused = admin(
        volume,
        "keys",
        "retire",
        "1",
        "--provider",
        "s3cryptfs-password",
        "--kms-config",
        cfg,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr
    assert "rotate first" not in refused.stderr
    assert "s3cryptfs migrate" in refused.stderr and "--to keystore" in refused.stderr
    # and the advice works: migrating again drops the previous manager, nothing is lost
    admin(volume, "migrate", "--to", "keystore", "--kms-config", cfg)
    assert "previous_key_managers" not in descriptor(s3client, volume)
    mount_kms(volume, cfg)
    assert_files(volume.mountpoint, FILES)
    volume.umount()
