"""The vault (OpenBao Transit) key manager: conformance, KeyAdmin, refusals, and a volume."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from kms_servers import OpenBao
from servers import LOOPBACK, free_port

from s3cryptfs.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    ProviderUnavailable,
)
from s3cryptfs.keys.base import KeyAdmin
from s3cryptfs.keys.registry import load_key_manager
from s3cryptfs.keys.vault import VaultKeyManager, create_settings
from tests.keymanager_conformance import CONTEXT, Conformance


@pytest.fixture(scope="session")
def bao(tmp_path_factory):
    server = OpenBao(tmp_path_factory.mktemp("openbao"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def fresh_key(bao) -> dict:
    """Descriptor settings of a new transit key (made through create_settings, as init does)."""
    return create_settings(
        {"address": bao.address, "volume_id": os.urandom(16).hex(), "timeout": 5},
        {"token": bao.root_token},
    )


@pytest.fixture
def make_manager(bao):
    settings = {**fresh_key(bao), "address": bao.address, "timeout": 5}
    made: list[VaultKeyManager] = []

    def make(token: str | None = None) -> VaultKeyManager:
        m = VaultKeyManager(settings, {"token": token or bao.root_token})
        made.append(m)
        return m

    make.settings = settings
    yield make
    for m in made:
        m.close()


@pytest.fixture
def manager(make_manager):
    return make_manager()


@pytest.fixture
def unreachable_manager():
    port = free_port()  # nothing listens there
    m = VaultKeyManager(
        {"address": f"http://{LOOPBACK}:{port}", "key": "k", "timeout": 2}, {"token": "t"}
    )
    yield m
    m.close()


class TestVaultManager(Conformance):
    def test_registered(self, make_manager) -> None:
        m = load_key_manager("vault", make_manager.settings, {"token": "x"})
        assert isinstance(m, VaultKeyManager) and isinstance(m, KeyAdmin)
        m.close()

    def test_create_settings_keeps_identity_only(self, bao) -> None:
        settings = fresh_key(bao)
        assert set(settings) == {"mount", "key"} and settings["key"].startswith("s3cryptfs-")
        info = bao.api("GET", f"/v1/transit/keys/{settings['key']}")["data"]
        assert info["type"] == "aes256-gcm96" and info["latest_version"] == 1
        # Run again on the same key (a second init with key = ...): the key is reused.
        again = create_settings(
            {"address": bao.address, "key": settings["key"]}, {"token": bao.root_token}
        )
        assert again == settings

    def test_create_settings_without_transit_engine(self, bao) -> None:
        with pytest.raises(ConfigError, match="no transit engine"):
            create_settings(
                {"address": bao.address, "key": "k", "mount": "not-mounted"},
                {"token": bao.root_token},
            )

    def test_volume_id_is_bound(self, manager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises(KeyManagerError):
            manager.unwrap_key(env, {"volume_id": "another-volume"})

    def test_ciphertext_is_the_transit_string(self, manager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        assert env.ciphertext.startswith(b"vault:v1:") and env.key_version == 1

    def test_rotate_dual_read_and_retire(self, manager, make_manager) -> None:
        dek1 = os.urandom(32)
        old = manager.wrap_key(dek1, CONTEXT)
        assert manager.rotate() == {k: make_manager.settings[k] for k in ("mount", "key")}
        assert manager.active_key_version() == 2
        new = manager.wrap_key(os.urandom(32), CONTEXT)
        assert new.key_version == 2 and new.ciphertext.startswith(b"vault:v2:")
        assert manager.unwrap_key(old, CONTEXT) == dek1  # dual read
        states = [(i.version, i.state) for i in manager.versions()]
        assert states == [(1, "decrypt-only"), (2, "active")]
        with pytest.raises(KeyManagerError):
            manager.retire(2)  # the active one
        manager.retire(1)
        assert [(i.version, i.state) for i in manager.versions()] == [
            (1, "retired"),
            (2, "active"),
        ]
        with pytest.raises(KeyRetired):
            manager.unwrap_key(old, CONTEXT)
        other = make_manager()  # a client that never saw the retire
        with pytest.raises(KeyRetired):
            other.unwrap_key(old, CONTEXT)
        assert other.unwrap_key(new, CONTEXT) == manager.unwrap_key(new, CONTEXT)

    def test_retire_unknown_version(self, manager) -> None:
        with pytest.raises(KeyNotFound):
            manager.retire(7)

    def test_encrypt_only_token_cannot_decrypt(self, bao, make_manager) -> None:
        key = make_manager.settings["key"]
        token = bao.token_with_policy(
            f"enc-{key}", f'path "transit/encrypt/{key}" {{ capabilities = ["update"] }}'
        )
        restricted = make_manager(token)
        dek = os.urandom(32)
        env = restricted.wrap_key(dek, CONTEXT)
        assert env.key_version == 1
        with pytest.raises(KeyAccessDenied):
            restricted.unwrap_key(env, CONTEXT)
        with pytest.raises(KeyAccessDenied):
            restricted.rotate()
        assert make_manager().unwrap_key(env, CONTEXT) == dek

    def test_bad_token_is_refused(self, make_manager) -> None:
        with pytest.raises(KeyAccessDenied):
            make_manager("not-a-token").wrap_key(os.urandom(32), CONTEXT)

    def test_unknown_key(self, bao) -> None:
        m = VaultKeyManager(
            {"address": bao.address, "key": "no-such-key"}, {"token": bao.root_token}
        )
        try:
            with pytest.raises(KeyNotFound):
                m.health_check()
        finally:
            m.close()

    def test_wrong_version_in_envelope(self, manager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises(KeyManagerError):
            manager.unwrap_key(replace(env, key_version=2), CONTEXT)

    def test_hung_server_times_out(self) -> None:
        import socket
        import time

        with socket.socket() as listener:
            listener.bind((LOOPBACK, 0))
            listener.listen(8)  # accepts connections, never answers
            port = listener.getsockname()[1]
            m = VaultKeyManager(
                {"address": f"http://{LOOPBACK}:{port}", "key": "k", "timeout": 1},
                {"token": "t"},
            )
            start = time.monotonic()
            with pytest.raises(ProviderUnavailable):
                m.wrap_key(os.urandom(32), CONTEXT)
            assert time.monotonic() - start < 10
            m.close()


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"data": {}}', "encrypt with no ciphertext"),
        (b'{"data": {"ciphertext": "not-vault:1:abc"}}', "ciphertext in an unknown format"),
        (b"<html>a proxy's login page</html>", "encrypt with a reply that is not JSON"),
    ],
)
def test_malformed_reply_is_not_reported_as_an_outage(body: bytes, expected: str) -> None:
    """Something answered, wrongly: a KeyManagerError that says so, not 'unavailable' (which
    would send the user looking for a server that is up)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    m = VaultKeyManager(
        {"address": f"http://{LOOPBACK}:{server.server_address[1]}", "key": "k", "timeout": 2},
        {"token": "t"},
    )
    try:
        with pytest.raises(KeyManagerError) as info:
            m.wrap_key(os.urandom(32), CONTEXT)
        assert not isinstance(info.value, ProviderUnavailable)
        assert expected in str(info.value)
    finally:
        m.close()
        server.shutdown()
        server.server_close()


# --- a volume whose key manager is vault, through a real mount --------------------------------

FILES = {"a.txt": b"alpha " * 2000, "sub/b.bin": bytes(range(256)) * 64, "empty": b""}


def vault_config(path, bao, token: str) -> str:
    token_file = path.parent / "vault-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    path.write_text(
        "[key_manager]\n"
        'provider = "vault"\n'
        f'address = "{bao.address}"\n'
        f'token_file = "{token_file}"\n'
        "timeout = 5\n"
    )
    return str(path)


def test_vault_volume_init_write_remount_rotate(volume, bao, s3client, tmp_path) -> None:
    from kms_volume import envelopes, mount_kms
    from test_key_ops import admin, assert_files, write_files

    cfg = vault_config(tmp_path / "kms.toml", bao, bao.root_token)
    out = volume.init("--key-manager", "vault", "--kms-config", cfg).stdout
    assert "key manager vault" in out
    desc = s3client.get_object(Bucket=volume.bucket, Key=f"{volume.prefix}.s3cryptfs/volume.json")
    text = desc["Body"].read().decode()
    assert bao.root_token not in text and bao.address not in text  # identity only
    mount_kms(volume, cfg)
    write_files(volume.mountpoint, FILES)
    volume.umount()
    found = envelopes(s3client, volume.bucket, volume.prefix)
    assert {n for n in found} == set(FILES)
    ((provider, key, version),) = set(found.values())
    assert provider == "vault" and key.startswith("s3cryptfs-") and version == "1"
    assert bao.api("GET", f"/v1/transit/keys/{key}")["data"]["latest_version"] == 1

    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    assert_files(volume.mountpoint, FILES)
    volume.umount()

    assert (
        "vault: new active key version 2"
        in admin(volume, "keys", "rotate", "--kms-config", cfg).stdout
    )
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    (volume.mountpoint / "new.txt").write_bytes(b"under version 2")
    assert_files(volume.mountpoint, FILES)
    volume.umount()
    assert envelopes(s3client, volume.bucket, volume.prefix)["new.txt"] == ("vault", key, "2")

    assert f"{len(FILES)} re-wrapped" in admin(volume, "rewrap", "--kms-config", cfg).stdout
    admin(volume, "keys", "retire", "1", "--kms-config", cfg)
    info = bao.api("GET", f"/v1/transit/keys/{key}")["data"]
    assert info["min_decryption_version"] == 2
    assert {v[2] for v in envelopes(s3client, volume.bucket, volume.prefix).values()} == {"2"}
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    assert_files(volume.mountpoint, {**FILES, "new.txt": b"under version 2"})
    volume.umount()


@pytest.mark.expect_log_errors(r"vault refused decrypt")
def test_vault_volume_without_decrypt_permission(volume, bao, tmp_path) -> None:
    import errno

    from kms_volume import mount_kms
    from test_key_ops import write_files

    cfg = vault_config(tmp_path / "kms.toml", bao, bao.root_token)
    volume.init("--key-manager", "vault", "--kms-config", cfg)
    mount_kms(volume, cfg)
    write_files(volume.mountpoint, {"secret.txt": b"top secret"})
    volume.umount()
    token = bao.token_with_policy(
        "encrypt-only-all",
        'path "transit/encrypt/*" { capabilities = ["update"] }\n'
        'path "transit/keys/*" { capabilities = ["read"] }',
    )
    weak = vault_config(tmp_path / "weak.toml", bao, token)
    mount_kms(volume, weak, "--dek-cache-ttl", "0")
    with pytest.raises(OSError) as info:
        (volume.mountpoint / "secret.txt").read_bytes()
    assert info.value.errno in (errno.EIO, errno.EACCES, errno.EPERM)
    volume.umount()


@pytest.mark.expect_log_errors(r"vault at \S+ did not answer")
def test_vault_down_at_mount_warns_and_commands_exit_7(volume, bao, tmp_path) -> None:
    """A key manager that cannot be reached: the mount comes up (it may be back in a minute)
    but says so at once; files that need it fail with EIO; a command fails with exit 7, its
    own code, so that scripts can tell it from a wrong password or a missing bucket."""
    import errno

    from kms_volume import mount_kms

    cfg = vault_config(tmp_path / "kms.toml", bao, bao.root_token)
    volume.init("--key-manager", "vault", "--kms-config", cfg)
    mount_kms(volume, cfg)
    (volume.mountpoint / "a.txt").write_bytes(b"needs vault")
    volume.umount()
    down = tmp_path / "down.toml"
    text = Path(cfg).read_text().replace(bao.address, f"http://{LOOPBACK}:{free_port()}")
    down.write_text(text.replace("timeout = 5", "timeout = 2"))
    down.chmod(0o600)
    common = ["--endpoint-url", volume.endpoint_url, "--cache-dir", volume.cache_dir]
    up = volume.run(
        "mount", volume.url, volume.mountpoint, *common, "--kms-config", down, check=False
    )
    assert up.returncode == 0 and volume.is_mounted(), up.stderr
    assert "warning: key manager vault does not answer" in up.stderr, up.stderr
    with pytest.raises(OSError) as info:
        (volume.mountpoint / "a.txt").read_bytes()
    assert info.value.errno == errno.EIO
    volume.umount()
    cat = volume.run(
        "cat",
        f"{volume.url}a.txt",
        "--endpoint-url",
        volume.endpoint_url,
        "--kms-config",
        down,
        check=False,
    )
    assert cat.returncode == 7 and "Traceback" not in cat.stderr, cat.stderr
    assert cat.stdout == ""


@pytest.mark.expect_log_errors(r"vault refused decrypt")
def test_kms_config_mistakes_and_a_refused_token_are_named(volume, bao, tmp_path) -> None:
    """A provider typo was reported as a missing 'address', a token under [key_manager] was
    ignored, and a token OpenBao refuses (403) was reported as "does not answer"."""
    import errno

    from kms_volume import mount_kms

    cfg = vault_config(tmp_path / "kms.toml", bao, bao.root_token)
    volume.init("--key-manager", "vault", "--kms-config", cfg)
    mount_kms(volume, cfg)
    (volume.mountpoint / "a.txt").write_bytes(b"needs vault")
    volume.umount()
    common = ["--endpoint-url", volume.endpoint_url]
    mount_args = ["mount", volume.url, volume.mountpoint, *common, "--cache-dir", volume.cache_dir]

    def refused(proc, *words: str) -> str:
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert all(w in line for w in words), line
        return line

    typo = tmp_path / "typo.toml"
    typo.write_text(Path(cfg).read_text().replace('"vault"', '"valut"'))
    for proc in (
        volume.run("cat", f"{volume.url}a.txt", *common, "--kms-config", typo, check=False),
        volume.run(*mount_args, "--kms-config", typo, check=False),
    ):
        line = refused(proc, "unknown provider 'valut'")
        assert "vault" in line.partition("known: ")[2] and "address" not in line
    assert not volume.is_mounted()

    inline = tmp_path / "inline.toml"
    inline.write_text(
        f'[key_manager]\nprovider = "vault"\naddress = "{bao.address}"\n'
        f'token = "{bao.root_token}"\n'
    )
    line = refused(volume.run(*mount_args, "--kms-config", inline, check=False), "[key_manager]")
    assert "(token)" in line and "[key_manager.secrets]" in line and bao.root_token not in line

    (tmp_path / "bad").mkdir()
    bad = vault_config(tmp_path / "bad" / "kms.toml", bao, "not-a-token")
    up = volume.run(*mount_args, "--kms-config", bad, check=False, require_detached=True)
    assert up.returncode == 0 and volume.is_mounted(), up.stderr
    assert "warning: key manager vault refused the credentials (KeyAccessDenied" in up.stderr
    assert "does not answer" not in up.stderr
    with pytest.raises(OSError) as info:
        (volume.mountpoint / "a.txt").read_bytes()
    assert info.value.errno == errno.EIO
    status = volume.run("status", volume.mountpoint).stdout
    assert "key manager:  vault: KeyAccessDenied" in status
    volume.umount()
