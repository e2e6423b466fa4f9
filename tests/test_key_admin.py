"""Key administration without S3: the password manager's KeyAdmin side, the password policy,
the machine-local KMS configuration, the DEK cache and the audit log."""

from __future__ import annotations

import json
import os

import pytest

from s3cryptfs.audit import AuditLog
from s3cryptfs.errors import ConfigError, KeyNotFound, KeyRetired, VolumeError
from s3cryptfs.keys.base import KeyAdmin
from s3cryptfs.keys.config import load_kms_config, merge_settings
from s3cryptfs.keys.dekcache import DekCache, cache_key
from s3cryptfs.keys.password import PasswordKeyManager, check_new_password, new_settings

FAST = {"n": 2**14, "r": 8, "p": 1}
PASSWORD = b"correct horse battery staple"
VOLUME = "00112233445566778899aabbccddeeff"
CTX = {"volume_id": VOLUME}


@pytest.fixture
def manager():
    m = PasswordKeyManager(new_settings(PASSWORD, VOLUME, FAST), {"password": PASSWORD})
    yield m
    m.close()


def test_password_manager_is_a_key_admin(manager) -> None:
    assert isinstance(manager, KeyAdmin)
    assert [(v.version, v.state) for v in manager.versions()] == [(1, "active")]


def test_rotate_keeps_old_versions_readable_and_settings_reopen(manager) -> None:
    old = manager.wrap_key(b"k" * 32, CTX)
    settings = manager.rotate()
    assert settings["active_version"] == 2
    new = manager.wrap_key(b"n" * 32, CTX)
    assert (old.key_version, new.key_version) == (1, 2)
    assert manager.unwrap_key(old, CTX) == b"k" * 32
    # Another process opening the new settings with the same password reads both.
    other = PasswordKeyManager(settings, {"password": PASSWORD})
    assert other.unwrap_key(old, CTX) == b"k" * 32
    assert other.unwrap_key(new, CTX) == b"n" * 32
    assert [(v.version, v.state) for v in other.versions()] == [
        (1, "decrypt-only"),
        (2, "active"),
    ]
    # The new KEK is sealed, not stored in clear: the wrong password cannot open it.
    assert "sealed" in settings["keys"][1] and len(settings["keys"][1]) >= 2


def test_retire_removes_the_sealed_key(manager) -> None:
    old = manager.wrap_key(b"k" * 32, CTX)
    with pytest.raises(ConfigError, match="active"):
        manager.retire(1)
    manager.rotate()
    settings = manager.retire(1)
    assert "sealed" not in settings["keys"][0] and settings["keys"][0]["retired"]
    with pytest.raises(KeyRetired):
        manager.unwrap_key(old, CTX)
    reopened = PasswordKeyManager(settings, {"password": PASSWORD})
    with pytest.raises(KeyRetired):
        reopened.unwrap_key(old, CTX)
    assert [v.state for v in reopened.versions()] == ["retired", "active"]
    with pytest.raises(KeyNotFound):
        manager.retire(7)


def test_reload_takes_a_rotate_done_elsewhere(manager) -> None:
    other = PasswordKeyManager(manager._settings, {"password": PASSWORD})
    settings = other.rotate()
    env = other.wrap_key(b"z" * 32, CTX)
    with pytest.raises(KeyNotFound):
        manager.unwrap_key(env, CTX)
    manager.reload(settings)
    assert manager.unwrap_key(env, CTX) == b"z" * 32
    assert manager.active_key_version() == 2


def test_change_password_reseals(manager) -> None:
    env = manager.wrap_key(b"q" * 32, CTX)
    with pytest.raises(ConfigError, match="at least 12"):
        manager.change_password(b"short")
    settings = manager.change_password(b"a much longer new password")
    with pytest.raises(VolumeError):
        PasswordKeyManager(settings, {"password": PASSWORD})
    reopened = PasswordKeyManager(settings, {"password": b"a much longer new password"})
    assert reopened.unwrap_key(env, CTX) == b"q" * 32


def test_password_policy() -> None:
    with pytest.raises(ConfigError, match="12 characters"):
        check_new_password(b"elevenchars")
    check_new_password(b"twelve chars")


def test_kms_config_file_and_environment(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    os.chmod(token_file, 0o600)
    cfg = tmp_path / "kms.toml"
    cfg.write_text(
        '[key_manager]\nprovider = "vault"\naddress = "http://127.0.0.1:1"\n'
        f'token_file = "{token_file}"\ntimeout = 3\n'
    )
    provider, options, secrets = load_kms_config(str(cfg), {})
    assert provider == "vault"
    assert options == {"address": "http://127.0.0.1:1", "timeout": 3}
    assert secrets == {"token": "file-token"}
    _, _, secrets = load_kms_config(str(cfg), {"VAULT_TOKEN": "bare"})
    assert secrets["token"] == "file-token"  # the bare vault CLI variable does not override
    _, _, secrets = load_kms_config(str(cfg), {"S3CRYPTFS_VAULT_TOKEN": "env"})
    assert secrets["token"] == "env"
    # Secrets meant for another provider are not handed to this one.
    _, _, secrets = load_kms_config(str(cfg), {"S3CRYPTFS_KEYSTORE_PASSPHRASE": "x"})
    assert "passphrase" not in secrets
    assert merge_settings("vault", {"address": "old", "key": "k1"}, options) == {
        "address": "http://127.0.0.1:1",
        "key": "k1",
        "timeout": 3,
    }
    # How to reach the server and whether to check its certificate come from this machine
    # only: a descriptor (written anywhere, by anyone) does not get to say.
    shared = {"address": "https://elsewhere:8200", "verify": False, "key": "k1", "mount": "t"}
    assert merge_settings("vault", shared, {}) == {"key": "k1", "mount": "t"}
    assert merge_settings("kmip", {"keys": [], "host": "h", "ca": "/x"}, {"host": "me"}) == {
        "keys": [],
        "host": "me",
    }
    assert merge_settings("awskms", {"key_ids": ["k"], "endpoint_url": "http://evil"}, {}) == {
        "key_ids": ["k"]
    }


def test_kms_config_refuses_bad_files(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[key_manager\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_kms_config(str(bad), {})
    bad.write_text("[other]\n")
    with pytest.raises(ConfigError, match=r"\[key_manager\]"):
        load_kms_config(str(bad), {})
    bad.write_text('[key_manager]\nprovider = "vault"\n[key_manager.secrets]\ntoken = "t"\n')
    os.chmod(bad, 0o644)
    with pytest.raises(ConfigError, match="readable by group"):
        load_kms_config(str(bad), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_kms_config(str(tmp_path / "missing.toml"), {})


def test_kms_config_names_a_provider_typo_and_misplaced_secrets(tmp_path) -> None:
    """A typo in provider used to reach no manager (the volume's own then said "setting
    'address' is required"); a token under [key_manager] was silently dropped."""
    cfg = tmp_path / "kms.toml"
    cfg.write_text('[key_manager]\nprovider = "valut"\naddress = "http://127.0.0.1:1"\n')
    with pytest.raises(ConfigError) as info:
        load_kms_config(str(cfg), {})
    assert "unknown provider 'valut'" in str(info.value)
    assert "vault" in str(info.value).partition("known: ")[2]
    cfg.write_text('[key_manager]\nprovider = "vault"\ntoken = "s.secret"\n')
    os.chmod(cfg, 0o644)
    with pytest.raises(ConfigError) as info:
        load_kms_config(str(cfg), {})
    assert "(token)" in str(info.value) and "[key_manager.secrets]" in str(info.value)
    assert "s.secret" not in str(info.value)
    # Where the message sends the token, it is taken, and only from a 0600 file.
    cfg.write_text('[key_manager]\nprovider = "vault"\n[key_manager.secrets]\ntoken = "s.x"\n')
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_kms_config(str(cfg), {})
    os.chmod(cfg, 0o600)
    assert load_kms_config(str(cfg), {})[2] == {"token": "s.x"}


def test_dek_cache_bounds_and_ttl(manager) -> None:
    cache = DekCache(max_entries=2, ttl=60)
    envs = [manager.wrap_key(bytes([i]) * 32, CTX) for i in range(3)]
    for i, env in enumerate(envs):
        cache.put(cache_key(env), bytes([i]) * 32)
    assert len(cache) == 2
    assert cache.get(cache_key(envs[0])) is None  # evicted, oldest first
    assert cache.get(cache_key(envs[2])) == b"\x02" * 32
    expired = DekCache(ttl=-1)
    expired.put(cache_key(envs[0]), b"x" * 32)
    assert expired.get(cache_key(envs[0])) is None
    cache.forget_provider(envs[2].provider)
    assert len(cache) == 0


def test_a_codec_drops_cached_keys_of_a_version_retired_elsewhere(manager, monkeypatch) -> None:
    """A mount's codec re-reads the descriptor before an unwrap once its view is older than
    min(refresh interval, DEK cache TTL): the retire is learned, and the data key it cached
    when it wrote under that version no longer serves (before: served for the whole TTL)."""
    from s3cryptfs import codec as codec_module
    from s3cryptfs.codec import ObjectCodec
    from s3cryptfs.format import metadata as md
    from s3cryptfs.format.descriptor import Descriptor
    from s3cryptfs.keys.ring import KeyRing, LocalKeys

    in_bucket = [Descriptor(VOLUME, key_settings=manager.settings())]
    ring = KeyRing(in_bucket[0], LocalKeys(password=PASSWORD))
    cache = DekCache(ttl=300)
    codec = ObjectCodec(
        in_bucket[0], ring, refresh=lambda: in_bucket[0], dek_cache=cache, refresh_interval=0
    )
    body, meta = codec.seal_bytes(b"written under version 1", md.PosixAttrs())
    assert len(cache) == 1  # the wrap seeded the cache
    admin = PasswordKeyManager(manager.settings(), {"password": PASSWORD})
    admin.rotate()
    in_bucket[0] = Descriptor(VOLUME, key_settings=admin.retire(1), generation=1)
    admin.close()
    monkeypatch.setattr(codec_module, "REFRESH_MIN_INTERVAL", 0.0)  # no waiting in a unit test
    with pytest.raises(KeyRetired):
        codec.decrypt_whole(meta, body, "vol/a")
    assert len(cache) == 0
    assert codec.ring.active().active_key_version() == 2
    ring.close()


def test_audit_log_lines(tmp_path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    log.event("unwrap", provider="p", key_version=3, object="vol/a", key_id=None)
    log.event("unwrap", "KeyRetired", provider="p", key_version=1, object="vol/b")
    log.close()
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r["outcome"], r["object"]) for r in lines] == [
        ("unwrap", "ok", "vol/a"),
        ("unwrap", "KeyRetired", "vol/b"),
    ]
    assert "key_id" not in lines[0] and lines[0]["time"].endswith("+00:00")
    assert os.stat(path).st_mode & 0o077 == 0


def test_checkpoint_moves_only_past_finished_keys(tmp_path) -> None:
    from s3cryptfs.ops.checkpoint import Checkpoint

    path = str(tmp_path / "sub" / "cp")
    cp = Checkpoint(path, ("p", 2))
    for key in "abcde":
        cp.submitted(key)
    cp.finished("b", True)
    assert cp.after is None  # "a" still running
    cp.finished("a", True)
    assert cp.after == "b"
    cp.finished("d", True)
    cp.finished("c", False)  # skipped: the next run must visit it again
    cp.finished("e", True)
    assert cp.after == "b"
    cp.save()
    assert Checkpoint(path, ("p", 2)).load() == "b"
    assert Checkpoint(path, ("p", 3)).load() is None
    assert os.stat(path).st_mode & 0o077 == 0
    cp.remove()
    cp.remove()
    assert Checkpoint(path, ("p", 2)).load() is None


def test_checkpoint_is_saved_every_few_seconds(tmp_path, monkeypatch) -> None:
    """Not only every SAVE_EVERY keys: a slow walk saves on time too."""
    from s3cryptfs.ops import checkpoint

    path = str(tmp_path / "cp")
    cp = checkpoint.Checkpoint(path, ("p", 2))
    for key in "abc":
        cp.submitted(key)
    cp.finished("a", True)
    assert checkpoint.Checkpoint(path, ("p", 2)).load() is None  # 1 key, well within the time
    monkeypatch.setattr(checkpoint, "SAVE_INTERVAL", 0.0)
    cp.finished("b", True)
    assert checkpoint.Checkpoint(path, ("p", 2)).load() == "b"


def test_interruptible_turns_sigterm_into_an_exception() -> None:
    import signal
    import time

    from s3cryptfs.ops.checkpoint import Interrupted, interruptible

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info, interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises at once, whatever the main thread is doing
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before  # restored
