"""The database key store manager: conformance and KeyAdmin on SQLite and a real PostgreSQL."""

from __future__ import annotations

import os
import threading
import uuid

import pytest
from kms_servers import Postgres
from servers import LOOPBACK, free_port

from s3cryptfs.errors import (
    ConfigError,
    KeyAccessDenied,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    ProviderUnavailable,
    UnwrapFailed,
    WrongPasswordError,
)
from s3cryptfs.keys.base import KeyAdmin
from s3cryptfs.keys.keystore import KeyStore, KeystoreKeyManager, create_settings
from s3cryptfs.keys.registry import load_key_manager
from tests.keymanager_conformance import CONTEXT, Conformance

PASSPHRASE = "keystore master passphrase"
FAST = {"n": 2**14, "r": 8, "p": 1}  # the smallest cost worth testing; volumes use 2**17


@pytest.fixture(scope="session")
def postgres():
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> tuple[dict, dict]:
    """(options, secrets) reaching an empty database of each kind."""
    if request.param == "sqlite":
        return {"database": str(tmp_path / "keys.db"), "timeout": 5}, {"passphrase": PASSPHRASE}
    pg = request.getfixturevalue("postgres")
    return (
        {"database": pg.url, "timeout": 5},
        {"passphrase": PASSPHRASE, "db_password": pg.password},
    )


@pytest.fixture
def make_manager(backend):
    options, secrets = backend
    ring = f"ring-{uuid.uuid4().hex[:8]}"
    descriptor = create_settings({**options, "ring": ring, "scrypt": FAST}, secrets)
    settings = {**descriptor, **options}
    made: list[KeystoreKeyManager] = []

    def make(**overrides) -> KeystoreKeyManager:
        m = KeystoreKeyManager(settings, {**secrets, **overrides})
        made.append(m)
        return m

    make.settings = settings
    make.descriptor = descriptor
    yield make
    for m in made:
        m.close()


@pytest.fixture
def manager(make_manager):
    return make_manager()


@pytest.fixture
def unreachable_manager(backend):
    options, secrets = backend
    if not options["database"].startswith("postgresql"):
        yield None  # a local file: nothing can be unreachable
        return
    port = free_port()
    m = KeystoreKeyManager(
        {
            "database": f"postgresql://postgres@{LOOPBACK}:{port}/postgres",
            "ring": "r",
            "timeout": 2,
        },
        secrets,
    )
    yield m
    m.close()


class TestKeystoreManager(Conformance):
    def test_registered(self, make_manager, backend) -> None:
        m = load_key_manager("keystore", make_manager.settings, backend[1])
        assert isinstance(m, KeystoreKeyManager) and isinstance(m, KeyAdmin)
        m.close()

    def test_descriptor_keeps_only_the_ring(self, make_manager) -> None:
        assert set(make_manager.descriptor) == {"ring"}

    def test_wrong_passphrase_fails_clearly(self, make_manager) -> None:
        with pytest.raises(WrongPasswordError, match="wrong master passphrase"):
            make_manager(passphrase="not the passphrase").wrap_key(os.urandom(32), CONTEXT)

    def test_volume_id_is_bound(self, manager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises(UnwrapFailed):
            manager.unwrap_key(env, {"volume_id": "another-volume"})

    def test_rotate_dual_read_and_retire(self, manager, make_manager) -> None:
        dek1 = os.urandom(32)
        old = manager.wrap_key(dek1, CONTEXT)
        assert old.key_version == 1
        assert manager.rotate() == make_manager.descriptor
        assert manager.active_key_version() == 2
        new = manager.wrap_key(os.urandom(32), CONTEXT)
        assert new.key_version == 2
        assert manager.unwrap_key(old, CONTEXT) == dek1
        assert [(i.version, i.state) for i in manager.versions()] == [
            (1, "decrypt-only"),
            (2, "active"),
        ]
        with pytest.raises(KeyManagerError):
            manager.retire(2)
        other = make_manager()
        assert other.unwrap_key(old, CONTEXT) == dek1  # it has version 1's key cached now
        manager.retire(1)
        with pytest.raises(KeyRetired):
            manager.unwrap_key(old, CONTEXT)
        with pytest.raises(KeyRetired):
            other.unwrap_key(old, CONTEXT)  # the state is read from the database each time
        assert other.unwrap_key(new, CONTEXT) == manager.unwrap_key(new, CONTEXT)
        with pytest.raises(KeyNotFound):
            manager.retire(9)

    def test_concurrent_rotates_keep_one_active(self, make_manager) -> None:
        managers = [make_manager() for _ in range(4)]
        errors: list[BaseException] = []

        def rotate(m) -> None:
            try:
                for _ in range(3):
                    m.rotate()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=rotate, args=(m,)) for m in managers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]
        infos = managers[0].versions()
        assert [i.version for i in infos] == list(range(1, 14))
        assert [i.state for i in infos].count("active") == 1 and infos[-1].state == "active"

    def test_admin_functions_without_a_volume(self, backend) -> None:
        options, secrets = backend
        store = KeyStore(options, secrets)
        try:
            ring = f"admin-{uuid.uuid4().hex[:8]}"
            assert store.create_ring(ring, FAST) is True
            assert store.create_ring(ring, FAST) is False
            assert store.rotate(ring) == 2
            store.deactivate(ring, 1)
            assert [(i.version, i.state) for i in store.list_versions(ring)] == [
                (1, "retired"),
                (2, "active"),
            ]
            with pytest.raises(KeyNotFound):
                store.list_versions("no-such-ring")
        finally:
            store.close()

    def test_master_key_file(self, backend, tmp_path) -> None:
        options, secrets = backend
        key_file = tmp_path / "master.key"
        key_file.write_bytes(os.urandom(32))
        opts = {**options, "master_key_file": str(key_file)}
        db_secrets = {k: v for k, v in secrets.items() if k != "passphrase"}
        settings = {**create_settings({**opts, "volume_id": uuid.uuid4().hex}, db_secrets), **opts}
        m = KeystoreKeyManager(settings, db_secrets)
        dek = os.urandom(32)
        assert m.unwrap_key(m.wrap_key(dek, CONTEXT), CONTEXT) == dek
        m.close()
        key_file.write_bytes(os.urandom(32))
        with pytest.raises(WrongPasswordError):
            KeystoreKeyManager(settings, db_secrets)
        with pytest.raises(ConfigError):
            KeystoreKeyManager({**settings, "master_key_file": None}, db_secrets)


def test_postgres_wrong_db_password(postgres) -> None:
    with pytest.raises(KeyAccessDenied):
        KeystoreKeyManager(
            {"database": postgres.url, "ring": "r", "timeout": 5},
            {"passphrase": PASSPHRASE, "db_password": "wrong"},
        )


def test_unreachable_is_bounded(postgres) -> None:
    import socket
    import time

    with socket.socket() as listener:  # accepts, never answers
        listener.bind((LOOPBACK, 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        m = KeystoreKeyManager(
            {
                "database": f"postgresql://postgres@{LOOPBACK}:{port}/postgres",
                "ring": "r",
                "timeout": 1,
            },
            {"passphrase": PASSPHRASE, "db_password": "x"},
        )
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable):
            m.wrap_key(os.urandom(32), CONTEXT)
        assert time.monotonic() - start < 10
        m.close()


# --- a volume whose key manager is the key store, through a real mount ------------------------

FILES = {"a.txt": b"alpha " * 2000, "sub/b.bin": bytes(range(256)) * 64, "empty": b""}


def keystore_config(path, database: str, db_password: str | None) -> str:
    secret = path.parent / "keystore-passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    lines = [
        "[key_manager]",
        'provider = "keystore"',
        f'database = "{database}"',
        f'passphrase_file = "{secret}"',
        "timeout = 5",
        "scrypt = { n = 16384, r = 8, p = 1 }",
    ]
    if db_password:
        lines.append(f'[key_manager.secrets]\ndb_password = "{db_password}"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_keystore_volume_init_write_remount_rotate(kind, volume, s3client, tmp_path, request):
    from kms_volume import envelopes, mount_kms
    from test_key_ops import admin, assert_files, write_files

    if kind == "sqlite":
        database, db_password = f"sqlite:///{tmp_path / 'keys.db'}", None
    else:
        pg = request.getfixturevalue("postgres")
        database, db_password = pg.url, pg.password
    cfg = keystore_config(tmp_path / "kms.toml", database, db_password)
    assert (
        "key manager keystore"
        in volume.init("--key-manager", "keystore", "--kms-config", cfg).stdout
    )
    mount_kms(volume, cfg)
    write_files(volume.mountpoint, FILES)
    volume.umount()
    found = envelopes(s3client, volume.bucket, volume.prefix)
    assert set(found) == set(FILES)
    ((provider, ring, version),) = set(found.values())
    assert provider == "keystore" and ring.startswith("s3cryptfs-") and version == "1"

    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    assert_files(volume.mountpoint, FILES)
    volume.umount()

    out = admin(volume, "keys", "rotate", "--kms-config", cfg).stdout
    assert "keystore: new active key version 2" in out
    listing = admin(volume, "keys", "list", "--kms-config", cfg).stdout
    assert "version 1  decrypt-only" in listing and "version 2  active" in listing
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    (volume.mountpoint / "new.txt").write_bytes(b"under version 2")
    assert_files(volume.mountpoint, FILES)
    volume.umount()
    assert envelopes(s3client, volume.bucket, volume.prefix)["new.txt"] == ("keystore", ring, "2")

    assert admin(volume, "keys", "retire", "1", "--kms-config", cfg, check=False).returncode == 6
    assert f"{len(FILES)} re-wrapped" in admin(volume, "rewrap", "--kms-config", cfg).stdout
    admin(volume, "keys", "retire", "1", "--kms-config", cfg)
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")
    assert_files(volume.mountpoint, {**FILES, "new.txt": b"under version 2"})
    volume.umount()

    # The wrong master passphrase fails the mount at once, with a clear message.
    (tmp_path / "keystore-passphrase").write_text("not the passphrase\n")
    volume.env = {k: v for k, v in volume.env.items() if k != "S3CRYPTFS_PASSWORD"}
    failed = volume.run(
        "mount",
        volume.url,
        volume.mountpoint,
        "--endpoint-url",
        volume.endpoint_url,
        "--cache-dir",
        volume.cache_dir,
        "--kms-config",
        cfg,
        check=False,
    )
    assert failed.returncode != 0 and not volume.is_mounted()
    assert "wrong master passphrase" in failed.stderr


def test_migrate_password_volume_to_keystore(volume, s3client, tmp_path) -> None:
    from kms_volume import envelopes, mount_kms
    from test_key_ops import admin, assert_files, write_files

    cfg = keystore_config(tmp_path / "kms.toml", str(tmp_path / "keys.db"), None)
    volume.init()
    volume.mount()
    write_files(volume.mountpoint, FILES)
    volume.umount()
    out = admin(volume, "migrate", "--to", "keystore", "--kms-config", cfg).stdout
    assert "active key manager: keystore" in out and f"{len(FILES)} re-wrapped" in out
    assert {v[0] for v in envelopes(s3client, volume.bucket, volume.prefix).values()} == {
        "keystore"
    }
    status = admin(volume, "keys", "status", "--kms-config", cfg).stdout
    assert "active: keystore version 1" in status
    mount_kms(volume, cfg, "--dek-cache-ttl", "0")  # no password any more
    assert_files(volume.mountpoint, FILES)
    volume.umount()
