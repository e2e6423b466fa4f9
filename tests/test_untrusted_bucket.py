"""A bucket writer (boto3 with the bucket's credentials, never the password) attacks the volume
descriptor: key redirection, plaintext and format downgrade, rollback, replacement. The mount,
the admin commands and the offline tools must refuse what does not authenticate, and send
nothing to the endpoint the attacker names. docs/SECURITY.md."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kms_volume import mount_kms
from servers import LOOPBACK, free_port
from test_key_vault import bao, vault_config  # noqa: F401 - bao is a fixture

from s3cryptfs.format import metadata as md
from tests.conftest import PASSWORD

DESCRIPTOR = ".s3cryptfs/volume.json"


class Listener:
    """An HTTP endpoint on loopback that records every request it gets (and fails them)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                listener.requests.append(f"{self.command} {self.path}")
                self.send_response(500)
                self.end_headers()

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    found = Listener()
    yield found
    found.close()


def read_descriptor(s3client, vol) -> tuple[bytes, dict]:
    raw = s3client.get_object(Bucket=vol.bucket, Key=vol.prefix + DESCRIPTOR)["Body"].read()
    return raw, json.loads(raw)


def plant_descriptor(s3client, vol, doc_or_raw) -> None:
    body = doc_or_raw if isinstance(doc_or_raw, bytes) else json.dumps(doc_or_raw).encode()
    s3client.put_object(Bucket=vol.bucket, Key=vol.prefix + DESCRIPTOR, Body=body)


def redirect_to(doc: dict, endpoint: str) -> dict:
    """The attack of the review: new data keys to the attacker's KMS, the password manager
    kept as a "previous" one so old files still open and nobody notices."""
    evil = json.loads(json.dumps(doc))
    evil["previous_key_managers"] = [dict(evil["key_manager"])]
    evil["key_manager"] = {
        "provider": "awskms",
        "settings": {"key_ids": ["arn:aws:kms:us-east-1:111122223333:key/x"], "region": "us-east-1",
                     "endpoint_url": endpoint},
    }
    evil["auth"]["kms"] = {"provider": "awskms", "key_id": "x", "key_version": 1,
                           "wrapped": "AAAA"}
    return evil


def mount_log(vol) -> str:
    return "".join(p.read_text() for p in vol.cache_dir.glob("*/mount.log"))


def refused_after_a_write(vol) -> bool:
    """Writes a file (a wrap re-reads the descriptor once the refresh interval has passed) and
    tells whether the mount has logged that it refused the descriptor in the bucket."""
    (vol.mountpoint / "nudge.txt").write_bytes(b"x")
    return "descriptor in the bucket is refused" in mount_log(vol)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.mark.expect_log_errors(
    r"volume descriptor in the bucket is refused",
    r"volume descriptor does not authenticate",
    r"is not one of this volume's key managers",
)
def test_redirected_key_wrapping_is_refused_everywhere(mounted, s3client, listener):
    vol = mounted
    vol.remount("--descriptor-refresh", "1")
    (vol.mountpoint / "old.txt").write_bytes(b"written before the attack")
    _, doc = read_descriptor(s3client, vol)
    plant_descriptor(s3client, vol, redirect_to(doc, listener.url))
    # An object naming a key version the mount does not know makes it re-read at once.
    s3client.put_object(
        Bucket=vol.bucket,
        Key=vol.prefix + "lure.txt",
        Body=b"x" * 60,
        Metadata={md.FORMAT: "1", md.KMS_PROVIDER: "awskms", md.KEY_VERSION: "1",
                  md.WRAPPED_KEY: "AAAA"},
    )
    with pytest.raises(OSError) as info:
        (vol.mountpoint / "lure.txt").read_bytes()
    assert info.value.errno == errno.EIO
    assert wait_for(lambda: "descriptor in the bucket is refused" in mount_log(vol))
    vol.wait_heartbeats(s3client)  # the periodic re-read has refused it too
    (vol.mountpoint / "new.txt").write_bytes(b"written after the attack")
    os.sync()
    vol.umount()
    meta = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + "new.txt")["Metadata"]
    assert meta[md.KMS_PROVIDER] == "s3cryptfs-password"  # still wrapped by the volume's keys
    # A new mount, rewrap (which would send every data key), fsck and cat all refuse it.
    for words in (
        ("rewrap", vol.url, *vol.common_args()),
        ("fsck", "--full", vol.url, *vol.common_args()),
        ("cat", f"s3://{vol.bucket}/{vol.prefix}old.txt", *vol.common_args()),
    ):
        refused = vol.run(*words, check=False)
        assert refused.returncode == 8, refused.stderr
        assert "does not authenticate" in refused.stderr
    refused = vol.mount(check=False)
    assert refused.returncode == 8 and "does not authenticate" in refused.stderr
    assert not vol.is_mounted()
    assert listener.requests == []


@pytest.mark.expect_log_errors(
    r"volume descriptor in the bucket is refused",
    r"not encrypted \(this volume does not allow",
)
def test_plaintext_and_format_downgrades_are_refused(mounted, s3client):
    vol = mounted
    vol.remount("--descriptor-refresh", "1")
    _, doc = read_descriptor(s3client, vol)
    doc["allow_plaintext"] = True
    doc["object_format"] = "gateway"
    doc["gateway"] = {"wrap": "password", "iterations": 100000, "algorithm": "AES256-GCM",
                      "chunk_size": 65536}
    plant_descriptor(s3client, vol, doc)
    s3client.put_object(Bucket=vol.bucket, Key=vol.prefix + "planted.txt", Body=b"trust me")
    assert wait_for(lambda: refused_after_a_write(vol))
    with pytest.raises(OSError) as info:
        (vol.mountpoint / "planted.txt").read_bytes()
    assert info.value.errno == errno.EIO
    (vol.mountpoint / "after.txt").write_bytes(b"still our format")
    vol.umount()
    meta = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + "after.txt")["Metadata"]
    assert meta.get(md.FORMAT) == "1" and "encrypted" not in meta
    refused = vol.mount(check=False)
    assert refused.returncode == 8 and "does not authenticate" in refused.stderr


def test_a_descriptor_put_back_from_the_past_is_refused(mounted, s3client):
    vol = mounted
    old_raw, old = read_descriptor(s3client, vol)
    vol.run("keys", "rotate", vol.url, *vol.common_args())
    _, new = read_descriptor(s3client, vol)
    assert new["generation"] > old["generation"]
    plant_descriptor(s3client, vol, old_raw)  # a valid MAC, an older generation
    vol.umount()
    refused = vol.mount(check=False)
    assert refused.returncode == 8 and "rolled back" in refused.stderr
    refused = vol.run("keys", "status", vol.url, *vol.common_args(), check=False)
    assert refused.returncode == 8 and "rolled back" in refused.stderr


def test_a_descriptor_of_another_volume_does_not_open_with_our_password(
    make_volume, s3client, tmp_path
):
    ours, theirs = make_volume(), make_volume()
    ours.init()
    other_pw = tmp_path / "other-password"
    other_pw.write_text("the attacker's own long password")
    other_pw.chmod(0o600)
    theirs.password_file = other_pw
    theirs.init()
    raw, _ = read_descriptor(s3client, theirs)
    plant_descriptor(s3client, ours, raw)
    refused = ours.mount(check=False)
    assert refused.returncode in (3, 8), refused.stderr
    assert not ours.is_mounted()


def test_upgrade_of_a_version_1_volume(make_volume, s3client, seaweed):
    vol = make_volume()
    vol.init()
    vol.mount()
    (vol.mountpoint / "kept.txt").write_bytes(b"made before the upgrade")
    vol.umount()
    # What an older s3cryptfs wrote: no generation, no auth, a float time.
    _, doc = read_descriptor(s3client, vol)
    legacy = {k: v for k, v in doc.items() if k not in ("auth", "generation")}
    legacy["version"] = 1
    legacy["rotation"] = {"max_age_days": 0, "last": 1700000000.5}
    legacy["key_manager"]["settings"]["keys"][0]["created"] = 1700000000.25
    plant_descriptor(s3client, vol, legacy)

    fresh = dict(vol.env, S3CRYPTFS_STATE_DIR=str(vol.workdir / "state"))
    vol.env = fresh  # a machine that has never seen the signed descriptor
    refused = vol.mount(check=False)
    assert refused.returncode == 5 and "s3cryptfs upgrade" in refused.stderr
    out = vol.run("upgrade", vol.url, *vol.common_args()).stdout
    assert "descriptor version 1 -> 2" in out and "s3cryptfs-password" in out
    assert "plaintext:      refused" in out and "volume fingerprint:" in out
    _, doc = read_descriptor(s3client, vol)
    assert doc["version"] == 2 and doc["generation"] == 1 and "mac" in doc["auth"]
    assert doc["rotation"]["last"] == 1700000000
    again = vol.run("upgrade", vol.url, *vol.common_args()).stdout
    assert "already authenticated" in again
    vol.mount()
    assert (vol.mountpoint / "kept.txt").read_bytes() == b"made before the upgrade"
    vol.umount()
    # Here a version 1 descriptor appearing now is a replacement, not an old volume.
    plant_descriptor(s3client, vol, legacy)
    refused = vol.run("upgrade", vol.url, *vol.common_args(), check=False)
    assert refused.returncode == 8 and "was replaced" in refused.stderr


def test_passwd_rotate_makes_the_old_password_and_descriptor_useless(
    mounted, s3client, seaweed, tmp_path
):
    from s3cryptfs.format.descriptor import Descriptor
    from s3cryptfs.keys.password import PasswordKeyManager

    vol = mounted
    (vol.mountpoint / "a.txt").write_bytes(b"alpha")
    vol.umount()
    old_raw, _ = read_descriptor(s3client, vol)
    new_pw = tmp_path / "new-password"
    new_pw.write_text("a brand new long password")
    new_pw.chmod(0o600)
    out = vol.run(
        "keys", "passwd", "--rotate", vol.url, *vol.common_args(), "--new-password-file", new_pw
    ).stdout
    assert "new active key version 2" in out and "1 re-wrapped" in out, out
    assert "version 1 retired" in out and "new volume fingerprint" in out
    vol.password_file = new_pw
    vol.mount()
    (vol.mountpoint / "b.txt").write_bytes(b"beta")
    assert (vol.mountpoint / "a.txt").read_bytes() == b"alpha"
    vol.umount()
    # The old descriptor and the old password open only key version 1, which wraps nothing now.
    old = Descriptor.decode(old_raw)
    manager = PasswordKeyManager(old.key_settings, {"password": PASSWORD.encode()})
    for name in ("a.txt", "b.txt"):
        meta = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + name)["Metadata"]
        assert meta[md.KEY_VERSION] == "2", name
        with pytest.raises(Exception, match="not in this volume"):
            manager.unwrap_key(md.decode_envelope(meta), {})
    status = vol.run("keys", "list", vol.url, *vol.common_args()).stdout
    assert "version 1  retired" in status and "version 2  active" in status


def test_a_kms_volume_is_pinned_at_first_contact(make_volume, request, s3client, tmp_path):
    server = request.getfixturevalue("bao")
    cfg = vault_config(tmp_path / "kms.toml", server, server.root_token)
    ours, theirs = make_volume(), make_volume()
    fingerprint = ours.init("--key-manager", "vault", "--kms-config", cfg).stdout
    fingerprint = fingerprint.split("volume fingerprint: ")[1].strip()
    theirs.init("--key-manager", "vault", "--kms-config", cfg)
    mount_kms(ours, cfg)
    (ours.mountpoint / "f.txt").write_bytes(b"ours")
    ours.umount()
    our_raw, _ = read_descriptor(s3client, ours)

    # Signed, but by another volume's key (one the attacker made through the same KMS).
    their_raw, _ = read_descriptor(s3client, theirs)
    plant_descriptor(s3client, ours, their_raw)
    refused = mount_kms(ours, cfg, check=False)
    assert refused.returncode == 8 and not ours.is_mounted()
    assert "was replaced" in refused.stderr and fingerprint in refused.stderr
    wrong = ours.run("keys", "trust", ours.url, "--endpoint-url", ours.endpoint_url,
                     "--kms-config", cfg, "--fingerprint", fingerprint, check=False)
    assert wrong.returncode == 8 and "not by" in wrong.stderr
    plant_descriptor(s3client, ours, our_raw)
    mount_kms(ours, cfg)
    assert (ours.mountpoint / "f.txt").read_bytes() == b"ours"
    ours.umount()

    # A machine that never saw the volume trusts it on first contact, and says so.
    ours.env = dict(ours.env, S3CRYPTFS_STATE_DIR=str(tmp_path / "new-machine"))
    first = mount_kms(ours, cfg)
    assert "first contact" in first.stderr and fingerprint in first.stderr
    ours.umount()
    # Such a machine cannot check anything while the KMS is away: it says so (exit 7)...
    down = tmp_path / "down.toml"
    text = Path(cfg).read_text()
    down.write_text(text.replace(server.address, f"http://{LOOPBACK}:{free_port()}"))
    down.chmod(0o600)
    ours.env = dict(ours.env, S3CRYPTFS_STATE_DIR=str(tmp_path / "third-machine"))
    refused = mount_kms(ours, down, check=False)
    assert refused.returncode == 7 and "needs its key manager once" in refused.stderr
    # ...while one that has checked this descriptor before mounts without asking the KMS.
    ours.env = dict(ours.env, S3CRYPTFS_STATE_DIR=str(tmp_path / "new-machine"))
    mount_kms(ours, down)
    ours.umount()
