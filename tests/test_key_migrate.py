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


def test_a_file_sealed_under_the_old_manager_after_the_pass_is_caught_up(
    volume, s3client, tmp_path, monkeypatch, capsys
):
    """A mount that has not read the new descriptor yet may seal a file, or rewrite a directory
    index, under the old manager after migrate's pass went by. Once the mounts follow the new
    descriptor, migrate re-wraps what they left and drops the old manager: it does not stop
    with "still used by objects"."""
    from s3cryptfs import cli
    from s3cryptfs.ops import commands

    cfg = keystore_config(tmp_path / "kms.toml", f"sqlite:///{tmp_path / 'keys.db'}", None)
    volume.init()
    volume.mount()
    write_files(volume.mountpoint, FILES)
    volume.umount()
    late = volume.prefix + "dir/f2.txt"
    sealed = s3client.get_object(Bucket=volume.bucket, Key=late)
    body, meta = sealed["Body"].read(), sealed["Metadata"]
    assert meta["encryption-kms-provider"] == "s3cryptfs-password"
    real, passes = commands.rewrap_volume, []

    def pass_then_a_late_write(*args, **kwargs):
        report = real(*args, **kwargs)
        if not passes:  # what a mount that lags one descriptor refresh behind would upload
            s3client.put_object(Bucket=volume.bucket, Key=late, Body=body, Metadata=meta)
        passes.append(report)
        return report

    monkeypatch.setattr(commands, "rewrap_volume", pass_then_a_late_write)
    for name, value in volume.env.items():
        monkeypatch.setenv(name, value)
    argv = ["migrate", volume.url, *volume.common_args(), "--to", "keystore"]
    code = cli.main([*argv, "--kms-config", str(cfg), "--cache-dir", str(volume.cache_dir)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(passes) == 2 and passes[1].rewrapped == 1
    assert "re-wrapped 1 object(s) written during the migration" in out.out
    assert "previous key manager(s) dropped" in out.out
    assert "previous_key_managers" not in descriptor(s3client, volume)
    after = envelopes(s3client, volume.bucket, volume.prefix)
    assert {p for p, _, _ in after.values()} == {"keystore"}
    mount_kms(volume, cfg)
    assert_files(volume.mountpoint, FILES)
