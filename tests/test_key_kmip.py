"""The KMIP key manager against a real PyKMIP server over mutual TLS."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from kmip.core import enums
from kmip_server import KmipServer, SilentListener, make_pki
from servers import LOOPBACK, TcpProxy, free_port

from s3cryptfs.errors import (
    ConfigError,
    InvalidEnvelope,
    KeyAccessDenied,
    KeyNotFound,
    KeyRetired,
    ProviderUnavailable,
    UnwrapFailed,
)
from s3cryptfs.keys import kmip_wrap
from s3cryptfs.keys.base import KeyAdmin, KeyEnvelope
from s3cryptfs.keys.kmip import CosmianKmipKeyManager, KmipKeyManager, create_settings
from s3cryptfs.keys.kmip_transport import open_client
from s3cryptfs.keys.registry import load_key_manager
from tests.keymanager_conformance import CONTEXT, Conformance

CLIENT = "s3cryptfs-client"
OTHER = "other-client"  # same CA, another identity: owns none of our keys


@pytest.fixture(scope="session")
def kmip_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("kmip-pki"), [CLIENT, OTHER])


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory):
    """Another CA, with a client of the same name: the server must not trust it."""
    return make_pki(tmp_path_factory.mktemp("kmip-foreign"), [CLIENT], ca_name="foreign CA")


@pytest.fixture(scope="session")
def kmip_server(tmp_path_factory, kmip_pki):
    server = KmipServer(tmp_path_factory.mktemp("kmip-server"), kmip_pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connection(server: KmipServer, client: str = CLIENT, pki=None, **extra) -> dict:
    pki = pki or server.pki
    pair = pki.clients[client]
    return {
        "host": LOOPBACK,
        "port": server.port,
        "ca": str(pki.ca),
        "cert": str(pair.cert),
        "key": str(pair.key),
        "timeout": 10,
        **extra,
    }


@pytest.fixture(scope="session")
def kmip_settings(kmip_server) -> dict:
    """A volume's settings with one fresh key made by create_settings."""
    return create_settings(connection(kmip_server), {})


@pytest.fixture
def fresh_settings(kmip_server) -> dict:
    """Settings with a key of their own, for tests that rotate, revoke or destroy."""
    return create_settings(connection(kmip_server), {})


@pytest.fixture
def managers():
    made: list[KmipKeyManager] = []

    def make(settings: dict, cls=KmipKeyManager) -> KmipKeyManager:
        m = cls(settings, {})
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def make_manager(kmip_settings, managers):
    return lambda: managers(kmip_settings)


@pytest.fixture
def manager(make_manager):
    return make_manager()


@pytest.fixture(params=["refused", "silent"])
def unreachable_manager(request, kmip_server, kmip_settings, managers):
    """Nothing listens on the port, or something accepts TCP and never speaks TLS."""
    if request.param == "refused":
        port = free_port()
    else:
        listener = SilentListener()
        request.addfinalizer(listener.stop)
        port = listener.port
    return managers({**kmip_settings, "port": port, "timeout": 1})


class TestKmip(Conformance):
    pass


# --------------------------------------------------------------------------------------------
# Setup, registry, timeouts


def test_create_settings_makes_an_active_key(kmip_settings, manager) -> None:
    assert [k["version"] for k in kmip_settings["keys"]] == [1]
    assert kmip_settings["keys"][0]["id"]
    manager.health_check()  # the key exists on the server and is Active
    assert isinstance(manager, KeyAdmin)
    assert [(v.version, v.state) for v in manager.versions()] == [(1, "active")]


def test_create_settings_keeps_given_keys(kmip_server) -> None:
    settings = create_settings({**connection(kmip_server), "keys": [{"id": "7", "version": 3}]}, {})
    assert settings["keys"] == [{"id": "7", "version": 3}]


def test_registry_loads_both_providers(kmip_settings) -> None:
    m = load_key_manager("kmip", kmip_settings, {})
    c = load_key_manager("cosmian-kmip", kmip_settings, {})
    try:
        assert type(m) is KmipKeyManager and m.provider == "kmip"
        assert type(c) is CosmianKmipKeyManager and c.provider == "cosmian-kmip"
    finally:
        m.close()
        c.close()


def test_silent_server_fails_within_the_timeout(kmip_settings, managers) -> None:
    listener = SilentListener()
    try:
        m = managers({**kmip_settings, "port": listener.port, "timeout": 1})
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="did not answer in time"):
            m.unwrap_key(m.wrap_key(os.urandom(32), CONTEXT), CONTEXT)
        assert time.monotonic() - start < 5
    finally:
        listener.stop()


def test_bad_settings_are_config_errors(kmip_settings, tmp_path) -> None:
    with pytest.raises(ConfigError):
        KmipKeyManager({**kmip_settings, "ca": str(tmp_path / "missing.pem")}, {})
    with pytest.raises(ConfigError):
        KmipKeyManager({**kmip_settings, "wrap_mode": "aes-cbc"}, {})
    with pytest.raises(ConfigError):
        KmipKeyManager({**kmip_settings, "keys": []}, {})
    with pytest.raises(ConfigError):
        CosmianKmipKeyManager({**kmip_settings, "wrap_mode": "aes-gcm-local"}, {})


# --------------------------------------------------------------------------------------------
# The aes-gcm-local format


def test_envelope_binds_the_volume(manager) -> None:
    env = manager.wrap_key(os.urandom(32), CONTEXT)
    assert len(env.ciphertext) == kmip_wrap.GCM_LOCAL_LEN
    with pytest.raises(UnwrapFailed):
        manager.unwrap_key(env, {"volume_id": "another volume"})


def test_salt_tampering_fails(manager) -> None:
    env = manager.wrap_key(os.urandom(32), CONTEXT)
    ct = bytearray(env.ciphertext)
    ct[0] ^= 0x80  # the salt sent to the server: another KEK comes back
    with pytest.raises(UnwrapFailed):
        manager.unwrap_key(replace(env, ciphertext=bytes(ct)), CONTEXT)


def test_no_key_material_in_logs(manager, caplog) -> None:
    dek = os.urandom(32)
    with caplog.at_level(logging.DEBUG):
        env = manager.wrap_key(dek, CONTEXT)
        assert manager.unwrap_key(env, CONTEXT) == dek
    text = caplog.text.lower()
    assert dek.hex() not in text and env.ciphertext.hex() not in text


def test_second_client_from_settings_reads_after_a_wrap_mode_change(
    kmip_settings, manager, managers
) -> None:
    dek = os.urandom(32)
    env = manager.wrap_key(dek, CONTEXT)
    other = managers({**kmip_settings, "wrap_mode": "nist-keywrap"})
    assert other.unwrap_key(env, CONTEXT) == dek  # the 92-byte format is recognised by length


# --------------------------------------------------------------------------------------------
# Rotation, dual read, retirement, revoked and destroyed keys


def test_rotate_dual_read_retire(fresh_settings, managers) -> None:
    v1 = managers(fresh_settings)
    dek1 = os.urandom(32)
    env1 = v1.wrap_key(dek1, CONTEXT)

    rotated = v1.rotate()
    assert [k["version"] for k in rotated["keys"]] == [2, 1]
    assert rotated["keys"][0]["id"] != rotated["keys"][1]["id"]
    assert v1.active_key_version() == 1  # the caller saves the descriptor, then reloads
    v2 = managers(rotated)
    v2.health_check()  # the new key was activated
    assert v2.active_key_version() == 2
    dek2 = os.urandom(32)
    env2 = v2.wrap_key(dek2, CONTEXT)
    assert env2.key_version == 2 and env2.key_id == rotated["keys"][0]["id"]
    assert v2.unwrap_key(env1, CONTEXT) == dek1  # dual read
    assert v2.unwrap_key(env2, CONTEXT) == dek2
    assert [(v.version, v.state) for v in v2.versions()] == [(1, "decrypt-only"), (2, "active")]

    with pytest.raises(ConfigError):
        v2.retire(2)
    with pytest.raises(KeyNotFound):
        v2.retire(9)
    retired = v2.retire(1)
    assert retired["keys"][1]["state"] == "retired"
    v3 = managers(retired)
    assert [(v.version, v.state) for v in v3.versions()] == [(1, "retired"), (2, "active")]
    with pytest.raises(KeyRetired):
        v3.unwrap_key(env1, CONTEXT)
    assert v3.unwrap_key(env2, CONTEXT) == dek2
    # A client still holding the old settings is refused by the server itself (key revoked).
    with pytest.raises(KeyRetired):
        v2.unwrap_key(env1, CONTEXT)
    assert v2.retire(1)["keys"][1]["state"] == "retired"  # idempotent on the server


def test_revoked_active_key_refuses(fresh_settings, managers, kmip_server) -> None:
    m = managers(fresh_settings)
    env = m.wrap_key(os.urandom(32), CONTEXT)
    key_id = fresh_settings["keys"][0]["id"]
    admin = _raw_client(kmip_server)
    try:
        admin.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, key_id)
    finally:
        admin.close()
    for call in (
        lambda: m.unwrap_key(env, CONTEXT),
        lambda: m.wrap_key(os.urandom(32), CONTEXT),
        m.health_check,
    ):
        with pytest.raises(KeyRetired):
            call()


def test_destroyed_key_is_not_found(fresh_settings, managers, kmip_server) -> None:
    m = managers(fresh_settings)
    env = m.wrap_key(os.urandom(32), CONTEXT)
    key_id = fresh_settings["keys"][0]["id"]
    admin = _raw_client(kmip_server)
    try:
        admin.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, key_id)
        admin.destroy(key_id)
    finally:
        admin.close()
    with pytest.raises(KeyNotFound):
        m.unwrap_key(env, CONTEXT)


def _raw_client(server: KmipServer):
    s = connection(server)
    m = KmipKeyManager({**s, "keys": [{"id": "x", "version": 1}]}, {})
    context = m._pool._context  # the same TLS setup the manager uses
    m.close()
    return open_client(LOOPBACK, server.port, context, LOOPBACK, 10)


# --------------------------------------------------------------------------------------------
# Certificates and permissions


def test_other_identity_is_refused(kmip_server, kmip_settings, manager, managers) -> None:
    env = manager.wrap_key(os.urandom(32), CONTEXT)
    stranger = managers({**kmip_settings, **connection(kmip_server, OTHER)})
    with pytest.raises(KeyAccessDenied):
        stranger.unwrap_key(env, CONTEXT)
    with pytest.raises(KeyAccessDenied):
        stranger.wrap_key(os.urandom(32), CONTEXT)


def test_client_cert_from_another_ca_is_refused(
    kmip_server, kmip_settings, foreign_pki, managers
) -> None:
    foreign_client = foreign_pki.clients[CLIENT]
    m = managers(
        {**kmip_settings, "cert": str(foreign_client.cert), "key": str(foreign_client.key)}
    )
    with pytest.raises(KeyAccessDenied, match="refused our client certificate"):
        m.health_check()


def test_server_cert_not_from_our_ca_is_refused(kmip_settings, foreign_pki, managers) -> None:
    m = managers({**kmip_settings, "ca": str(foreign_pki.ca)})
    with pytest.raises(KeyAccessDenied, match="does not verify"):
        m.health_check()


def test_server_name_is_checked(kmip_settings, managers) -> None:
    m = managers({**kmip_settings, "server_name": "kms.example.org"})
    with pytest.raises(KeyAccessDenied, match="does not verify"):
        m.health_check()


# --------------------------------------------------------------------------------------------
# nist-keywrap (the Go gateway's cosmian-kmip format)

# RFC 3394 section 4.6: 256 bits of key data wrapped with a 256-bit KEK.
RFC3394_KEK = bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
RFC3394_DATA = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
RFC3394_WRAPPED = bytes.fromhex(
    "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
)


def test_nist_keywrap_known_answer() -> None:
    assert aes_key_wrap(RFC3394_KEK, RFC3394_DATA) == RFC3394_WRAPPED
    assert kmip_wrap.check_keywrap_blob(RFC3394_WRAPPED) == RFC3394_WRAPPED
    assert aes_key_unwrap(RFC3394_KEK, RFC3394_WRAPPED) == RFC3394_DATA
    for bad in (RFC3394_WRAPPED[:-8], RFC3394_WRAPPED + bytes(8), RFC3394_WRAPPED[:-1], b""):
        with pytest.raises(InvalidEnvelope):
            kmip_wrap.check_keywrap_blob(bad)


def test_cosmian_envelope_shape_is_checked_before_the_server(kmip_settings, managers) -> None:
    m = managers(kmip_settings, CosmianKmipKeyManager)
    key = kmip_settings["keys"][0]
    env92 = replace(
        managers(kmip_settings).wrap_key(os.urandom(32), CONTEXT), provider="cosmian-kmip"
    )
    with pytest.raises(InvalidEnvelope):
        m.unwrap_key(env92, CONTEXT)  # only 40-byte key wraps are cosmian-kmip envelopes
    with pytest.raises(KeyNotFound):
        m.unwrap_key(replace(env92, key_id=key["id"] + "0", ciphertext=RFC3394_WRAPPED), CONTEXT)


def test_stock_pykmip_refuses_nist_keywrap_clearly(kmip_settings, managers) -> None:
    """PyKMIP's server implements no NISTKeyWrap in Encrypt: a configuration error, said so."""
    m = managers(kmip_settings, CosmianKmipKeyManager)
    with pytest.raises(ConfigError, match="nist-keywrap"):
        m.wrap_key(os.urandom(32), CONTEXT)


# --------------------------------------------------------------------------------------------
# Connections that die or hang under a live manager


def test_dropped_connections_are_replaced_and_hangs_time_out(kmip_settings, managers) -> None:
    proxy = TcpProxy(LOOPBACK, kmip_settings["port"])
    try:
        m = managers({**kmip_settings, "port": proxy.port, "timeout": 2})
        dek = os.urandom(32)
        env = m.wrap_key(dek, CONTEXT)  # leaves an idle pooled connection
        proxy.set_mode("reset")  # the server side drops it
        proxy.set_mode("pass")
        assert m.unwrap_key(env, CONTEXT) == dek  # retried once on a fresh connection
        proxy.set_mode("blackhole")  # the server stops answering mid-session
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable):
            m.unwrap_key(env, CONTEXT)
        assert time.monotonic() - start < 10
        proxy.set_mode("pass")
        assert m.unwrap_key(env, CONTEXT) == dek  # the hung connection was not reused
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------------
# nist-keywrap against a server that implements NIST key wrap in Encrypt/Decrypt


@pytest.fixture(scope="session")
def keywrap_server(tmp_path_factory, kmip_pki):
    launcher = [sys.executable, str(Path(__file__).with_name("kmip_keywrap_server.py"))]
    server = KmipServer(tmp_path_factory.mktemp("kmip-keywrap"), kmip_pki, command=launcher)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def keywrap_settings(keywrap_server) -> dict:
    return create_settings({**connection(keywrap_server), "wrap_mode": "nist-keywrap"}, {})


class TestCosmianKmip(Conformance):
    """The gateway-compatible provider passes the same suite, except one documented property."""

    @pytest.fixture
    def make_manager(self, keywrap_settings, managers):
        return lambda: managers(keywrap_settings, CosmianKmipKeyManager)

    @pytest.fixture
    def unreachable_manager(self, keywrap_settings, managers):
        return managers({**keywrap_settings, "port": free_port(), "timeout": 1})

    def test_fresh_wrap_each_time(self, manager) -> None:
        """RFC 3394 is deterministic by design: wrapping the same DEK twice gives the same bytes
        (it reveals only that two objects share a DEK, which random per-object DEKs never do)."""
        dek = os.urandom(32)
        a = manager.wrap_key(dek, CONTEXT)
        assert a.ciphertext == manager.wrap_key(dek, CONTEXT).ciphertext
        assert a.ciphertext != manager.wrap_key(os.urandom(32), CONTEXT).ciphertext
        assert manager.unwrap_key(a, CONTEXT) == dek


def _key_material(server: KmipServer, key_id: str) -> bytes:
    client = _raw_client(server)
    try:
        return bytes(client.get(key_id).value)
    finally:
        client.close()


def test_nist_keywrap_is_rfc3394_both_ways(keywrap_server, keywrap_settings, managers) -> None:
    """What we send is a real RFC 3394 wrap under the KMIP key, and one made elsewhere (the Go
    gateway through Cosmian) unwraps through us."""
    m = managers(keywrap_settings, CosmianKmipKeyManager)
    key = keywrap_settings["keys"][0]
    kek = _key_material(keywrap_server, key["id"])
    dek = os.urandom(32)
    env = m.wrap_key(dek, CONTEXT)
    assert (env.provider, env.key_id, env.key_version) == ("cosmian-kmip", key["id"], 1)
    assert len(env.ciphertext) == kmip_wrap.KEYWRAP_LEN
    assert aes_key_unwrap(kek, env.ciphertext) == dek

    foreign = os.urandom(32)
    gateway_env = KeyEnvelope(key["id"], key["version"], "cosmian-kmip", aes_key_wrap(kek, foreign))
    assert m.unwrap_key(gateway_env, {}) == foreign  # no context is bound in this format
    wrong_kek = aes_key_wrap(os.urandom(32), foreign)
    with pytest.raises(UnwrapFailed):
        m.unwrap_key(replace(gateway_env, ciphertext=wrong_kek), {})


def test_kmip_provider_in_nist_keywrap_mode(keywrap_settings, managers) -> None:
    m = managers(keywrap_settings)  # provider "kmip", wrap_mode from the settings
    dek = os.urandom(32)
    env = m.wrap_key(dek, CONTEXT)
    assert env.provider == "kmip" and len(env.ciphertext) == kmip_wrap.KEYWRAP_LEN
    assert m.unwrap_key(env, CONTEXT) == dek
    gcm = managers({**keywrap_settings, "wrap_mode": "aes-gcm-local"})
    assert gcm.unwrap_key(env, CONTEXT) == dek  # both formats read in either mode
    env92 = gcm.wrap_key(dek, CONTEXT)
    assert m.unwrap_key(env92, CONTEXT) == dek
