"""The gateway's `password` and `memory` modes as key managers (s3cryptfs/keys/gateway.py): the
shared KeyManager conformance suite, the known-answer vectors (docs/INTEROP.md §7) through them,
and their refusals.
Pure and fast: no servers."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

from s3cryptfs.audit import AuditLog
from s3cryptfs.codec import GatewaySecrets, ObjectCodec
from s3cryptfs.errors import FormatError, InvalidEnvelope, KeyNotFound, UnwrapFailed
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import metadata as md
from s3cryptfs.format.descriptor import Descriptor
from s3cryptfs.format.gateway import keywrap
from s3cryptfs.keys.base import KeyEnvelope
from s3cryptfs.keys.gateway import (
    GatewayKeys,
    GatewayMemoryKeyManager,
    GatewayPasswordKeyManager,
)
from s3cryptfs.keys.ring import KeyRing, LocalKeys
from tests.keymanager_conformance import CONTEXT, Conformance
from tests.test_gateway_format import BODY_A, BODY_B, DEK_B, HELLO, PW, WK_OLD, md_a, md_b

FAST = gw.LEGACY_ITERATIONS  # the smallest count the gateway reads keeps this module fast
MASTER_KEY = bytes(range(32))
PW_BYTES = PW.encode()  # as a mount reads it from its password file


@pytest.fixture
def unreachable_manager():
    return None  # neither mode has a server


class GatewayRules:
    """What the gateway does differently from our own managers (docs/INTEROP.md §3.2, §3.3): the
    blob carries everything, so an envelope opens whatever key id and version it names."""

    def test_unknown_version(self, manager) -> None:
        dek = os.urandom(32)
        env = manager.wrap_key(dek, CONTEXT)
        assert manager.unwrap_key(replace(env, key_version=env.key_version + 1000), CONTEXT) == dek

    def test_wrong_key_id(self, manager) -> None:
        dek = os.urandom(32)
        env = manager.wrap_key(dek, CONTEXT)
        assert manager.unwrap_key(replace(env, key_id=env.key_id + "-nope"), CONTEXT) == dek


class TestPasswordMode(GatewayRules, Conformance):
    @pytest.fixture
    def make_manager(self):
        return lambda: GatewayPasswordKeyManager(PW, FAST)

    @pytest.fixture
    def manager(self, make_manager):
        m = make_manager()
        yield m
        m.close()

    def test_reference_vectors(self, manager) -> None:
        """Objects A (password-direct), B (the 96 B blob) and the 92 B blob of 0.6-0.7."""
        direct = gw.key_envelope(md_a())
        assert (direct.provider, direct.key_id, direct.key_version) == (
            "password",
            "pbkdf2-sha256:600000",
            0,
        )
        assert manager.unwrap_key(direct, CONTEXT) == gw.data_key(md_a(), password=PW)
        assert manager.unwrap_key(gw.key_envelope(md_b()), CONTEXT) == DEK_B
        old = KeyEnvelope("", 1, "password", base64.b64decode(WK_OLD))
        assert manager.unwrap_key(old, CONTEXT) == DEK_B

    def test_wrong_password_is_unwrap_failed(self) -> None:
        other = GatewayPasswordKeyManager("not-the-password", FAST)
        with pytest.raises(UnwrapFailed, match="password does not unwrap the data key"):
            other.unwrap_key(gw.key_envelope(md_b()), CONTEXT)

    def test_one_salt_per_manager_and_a_fresh_nonce_per_key(self, manager) -> None:
        a, b = (manager.wrap_key(bytes(32), CONTEXT).ciphertext for _ in range(2))
        assert len(a) == 96 and a[:4] == FAST.to_bytes(4, "big")
        assert a[4:36] == b[4:36]  # one salt (one PBKDF2) per manager
        assert a[36:48] != b[36:48]
        assert gw.unwrap_password_dek(a, PW) == bytes(32)
        other = GatewayPasswordKeyManager(PW, FAST).wrap_key(bytes(32), CONTEXT).ciphertext
        assert other[4:36] != a[4:36]

    def test_without_a_password(self) -> None:
        m = GatewayPasswordKeyManager(None)
        with pytest.raises(KeyNotFound, match="password-direct object but no password"):
            m.unwrap_key(gw.key_envelope(md_a()), CONTEXT)
        with pytest.raises(KeyNotFound, match="password-wrapped but no password"):
            m.unwrap_key(gw.key_envelope(md_b()), CONTEXT)
        with pytest.raises(KeyNotFound, match="needs its password"):
            m.wrap_key(bytes(32), CONTEXT)
        with pytest.raises(KeyNotFound):
            m.health_check()

    def test_derivation_beyond_bound_refused_before_deriving(self, manager, monkeypatch) -> None:
        monkeypatch.setattr(keywrap, "pbkdf2", lambda *a: pytest.fail("derived"))
        too_many = KeyEnvelope("pbkdf2-sha256:3000000", 0, "password", bytes(32))
        with pytest.raises(InvalidEnvelope, match="kdf iterations 3000000 out of range"):
            manager.unwrap_key(too_many, CONTEXT)
        with pytest.raises(InvalidEnvelope, match="salt must be 32 B"):
            manager.unwrap_key(KeyEnvelope("pbkdf2-sha256:100000", 0, "password", b"s"), CONTEXT)


class TestMemoryMode(GatewayRules, Conformance):
    @pytest.fixture
    def make_manager(self):
        return lambda: GatewayMemoryKeyManager(MASTER_KEY.hex())

    @pytest.fixture
    def manager(self, make_manager):
        m = make_manager()
        yield m
        m.close()

    def test_fresh_wrap_each_time(self, manager) -> None:
        """RFC 3394 is deterministic (the gateway's format): only a new data key, which every
        object has, gives a new wrapped key."""
        dek = os.urandom(32)
        a, b = (manager.wrap_key(dek, CONTEXT) for _ in range(2))
        assert a.ciphertext == b.ciphertext
        assert manager.wrap_key(os.urandom(32), CONTEXT).ciphertext != a.ciphertext
        assert manager.unwrap_key(a, CONTEXT) == dek

    def test_envelope_is_the_gateways(self, manager) -> None:
        dek = os.urandom(32)
        env = manager.wrap_key(dek, CONTEXT)
        assert (env.provider, env.key_id, env.key_version) == ("memory", "memory-v1", 1)
        assert aes_key_unwrap(MASTER_KEY, env.ciphertext) == dek  # RFC 3394, §3.3

    def test_master_key_parsed_as_the_gateway_does(self) -> None:
        wrapped = aes_key_wrap(bytes(16), DEK_B)
        env = KeyEnvelope("memory-v1", 1, "memory", wrapped)
        # 32 hex characters are an AES-128 key to the gateway, for reading and writing alike
        assert GatewayMemoryKeyManager("00" * 16).unwrap_key(env, CONTEXT) == DEK_B
        assert GatewayMemoryKeyManager(b"00" * 16).unwrap_key(env, CONTEXT) == DEK_B

    def test_bad_or_missing_master_key(self) -> None:
        env = KeyEnvelope("memory-v1", 1, "memory", aes_key_wrap(MASTER_KEY, DEK_B))
        with pytest.raises(InvalidEnvelope, match="16/24/32 B"):
            GatewayMemoryKeyManager("short").unwrap_key(env, CONTEXT)
        missing = GatewayMemoryKeyManager(None)
        with pytest.raises(KeyNotFound, match="memory-wrapped but no master key"):
            missing.unwrap_key(env, CONTEXT)
        with pytest.raises(KeyNotFound, match="--gateway-master-key-file"):
            missing.wrap_key(DEK_B, CONTEXT)
        with pytest.raises(UnwrapFailed):
            GatewayMemoryKeyManager(bytes(32)).unwrap_key(env, CONTEXT)


def test_gateway_keys_reach_the_two_modes_only() -> None:
    keys = GatewayKeys(PW, MASTER_KEY)
    assert keys.manager("password").provider == "password"
    assert keys.manager("memory").provider == "memory"
    assert keys.manager("cosmian-kmip") is None  # the key ring's
    writer = keys.writer("password", FAST)
    assert keys.writer("password", FAST) is writer  # one salt, one PBKDF2 per mount
    assert keys.writer("password", FAST + 1) is not writer  # the descriptor's count changed
    assert keys.writer("memory", FAST) is keys.manager("memory")
    keys.close()
    keys.close()


def test_key_envelope_of_gateway_objects() -> None:
    """The envelope names of a wrapped key; a version the gateway would read as 0 is 0."""
    env = gw.key_envelope({**md_b(), "encryption-key-version": "x"})
    assert (env.provider, env.key_id, env.key_version) == ("password", "", 0)
    with pytest.raises(InvalidEnvelope):
        gw.key_envelope({**md_b(), "encryption-wrapped-key": "!!"})
    with pytest.raises(FormatError):  # another provider: parsed as our own envelopes
        vault = {"encryption-kms-provider": "vault", "encryption-key-version": "x"}
        gw.key_envelope({**md_b(), **vault})
    with pytest.raises(FormatError):
        gw.key_envelope(md_a(**{"encryption-kdf-params": "pbkdf2-sha256:3000000"}))


# --- through the codec: the one unwrap path ----------------------------------------------------


def gateway_codec(tmp_path, wrap="password", password=PW_BYTES, master_key=None, refresh=None):
    desc = Descriptor("0123456789abcdef0123456789abcdef", object_format="gateway")
    desc.gateway = {"wrap": wrap, "iterations": FAST}
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    codec = ObjectCodec(
        desc,
        KeyRing(desc, LocalKeys()),
        refresh=refresh,
        audit=audit,
        gateway=GatewaySecrets(password=password, master_key=master_key),
    )
    return codec, lambda: [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]


def test_codec_unwraps_gateway_objects_as_any_other(tmp_path) -> None:
    """Password-direct and password-wrapped objects are opened by the gateway's manager: audited
    once with the envelope's names, then served from the DEK cache; errors name the object."""
    codec, lines = gateway_codec(tmp_path)
    for _ in range(2):
        assert codec.decrypt_whole(md_a(), BODY_A, "vol/a") == HELLO
        assert codec.decrypt_whole(md_b(), BODY_B, "vol/b") == HELLO
    audited = [(e["event"], e["provider"], e.get("key_id"), e["object"]) for e in lines()]
    assert audited == [
        ("unwrap", "password", "pbkdf2-sha256:600000", "vol/a"),
        ("unwrap", "password", "", "vol/b"),  # the gateway writes no key id for it
    ]
    (tmp_path / "w").mkdir()
    wrong, _ = gateway_codec(tmp_path / "w", password=b"not the password")
    with pytest.raises(UnwrapFailed, match="^vol/b: gateway: password does not unwrap"):
        wrong.decrypt_whole(md_b(), BODY_B, "vol/b")


def test_codec_never_rereads_the_descriptor_for_a_missing_gateway_secret(tmp_path) -> None:
    """A descriptor cannot bring the gateway's password: no re-read, the object is named."""

    def refresh() -> Descriptor:
        raise AssertionError("the descriptor was re-read")

    codec, lines = gateway_codec(tmp_path, password=None, refresh=refresh)
    with pytest.raises(KeyNotFound, match="^vol/a: gateway: password-direct object but no"):
        codec.decrypt_whole(md_a(), BODY_A, "vol/a")
    assert [e["outcome"] for e in lines()] == ["KeyNotFound"]


@pytest.mark.parametrize("wrap", ["password", "memory"])
def test_codec_writes_with_the_gateways_managers(tmp_path, wrap) -> None:
    """What a gateway-format volume writes: the gateway's envelope names, audited as a wrap,
    and the key cached, so reading the file back unwraps nothing."""
    codec, lines = gateway_codec(tmp_path, wrap=wrap, master_key=MASTER_KEY.hex().encode())
    codec._trip_breaker("awskms")  # the volume's KMS just timed out: not the gateway's modes
    body, meta = codec.seal_bytes(b"new file", md.PosixAttrs(), "vol/new", content=True)
    assert meta["encryption-kms-provider"] == wrap
    assert meta["encryption-key-version"] == "1"
    assert meta.get("encryption-kms-id") == ("memory-v1" if wrap == "memory" else None)
    assert codec.decrypt_whole(meta, body, "vol/new") == b"new file"
    assert [(e["event"], e["provider"]) for e in lines()] == [("wrap", wrap)]
