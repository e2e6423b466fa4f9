"""The conformance suite every KeyManager passes (docs/KMS.md, "Writing a plugin").

A provider's test module subclasses ``Conformance`` and supplies three fixtures:

- ``manager``: a fresh, working manager (closed by the fixture afterwards);
- ``make_manager``: a callable returning another manager on the same keys (a second client);
- ``unreachable_manager``: a manager configured against a server that does not answer, or
  ``None`` when the provider has no server (the password manager).

Every test here asserts behaviour from the KeyManager contract in s3cryptfs/keys/base.py.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest

from s3cryptfs.errors import (
    InvalidEnvelope,
    KeyManagerError,
    KeyNotFound,
    ProviderUnavailable,
    UnwrapFailed,
)
from s3cryptfs.keys.base import KeyEnvelope, KeyManager

CONTEXT = {"volume_id": "0123456789abcdef0123456789abcdef"}


class Conformance:
    def test_is_a_key_manager(self, manager: KeyManager) -> None:
        assert isinstance(manager, KeyManager)
        assert isinstance(manager.provider, str) and manager.provider

    def test_round_trip(self, manager: KeyManager) -> None:
        dek = os.urandom(32)
        env = manager.wrap_key(dek, CONTEXT)
        assert env.provider == manager.provider
        assert env.key_version == manager.active_key_version()
        assert dek not in env.ciphertext
        assert manager.unwrap_key(env, CONTEXT) == dek

    def test_fresh_wrap_each_time(self, manager: KeyManager) -> None:
        dek = os.urandom(32)
        a = manager.wrap_key(dek, CONTEXT)
        b = manager.wrap_key(dek, CONTEXT)
        assert a.ciphertext != b.ciphertext  # randomized wrapping
        assert manager.unwrap_key(a, CONTEXT) == manager.unwrap_key(b, CONTEXT) == dek

    def test_second_client_reads(self, manager: KeyManager, make_manager) -> None:
        dek = os.urandom(32)
        env = manager.wrap_key(dek, CONTEXT)
        other = make_manager()
        try:
            assert other.unwrap_key(env, CONTEXT) == dek
        finally:
            other.close()

    def test_tampered_ciphertext(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        ct = bytearray(env.ciphertext)
        ct[len(ct) // 2] ^= 0x01
        with pytest.raises((UnwrapFailed, InvalidEnvelope)):
            manager.unwrap_key(replace(env, ciphertext=bytes(ct)), CONTEXT)

    def test_truncated_ciphertext(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises((UnwrapFailed, InvalidEnvelope)):
            manager.unwrap_key(replace(env, ciphertext=env.ciphertext[:-5]), CONTEXT)

    def test_empty_ciphertext(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises((UnwrapFailed, InvalidEnvelope)):
            manager.unwrap_key(replace(env, ciphertext=b""), CONTEXT)

    def test_unknown_version(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises(KeyNotFound):
            manager.unwrap_key(replace(env, key_version=env.key_version + 1000), CONTEXT)

    def test_wrong_key_id(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises((KeyNotFound, UnwrapFailed)):
            manager.unwrap_key(replace(env, key_id=env.key_id + "-nope"), CONTEXT)

    def test_other_provider_refused(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        with pytest.raises(KeyManagerError):
            manager.unwrap_key(replace(env, provider=manager.provider + "-other"), CONTEXT)

    def test_concurrent_use(self, manager: KeyManager) -> None:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(10):
                    dek = os.urandom(32)
                    assert manager.unwrap_key(manager.wrap_key(dek, CONTEXT), CONTEXT) == dek
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors[0]

    def test_health_check_ok(self, manager: KeyManager) -> None:
        manager.health_check()

    def test_close_is_idempotent(self, make_manager) -> None:
        m = make_manager()
        m.close()
        m.close()

    def test_envelope_repr_hides_bytes(self, manager: KeyManager) -> None:
        env = manager.wrap_key(os.urandom(32), CONTEXT)
        assert env.ciphertext.hex() not in repr(env)
        assert isinstance(env, KeyEnvelope)

    def test_unreachable_server(self, unreachable_manager) -> None:
        if unreachable_manager is None:
            return  # no server behind this provider: nothing can be unreachable
        with pytest.raises(ProviderUnavailable):
            unreachable_manager.health_check()
        with pytest.raises(ProviderUnavailable):
            unreachable_manager.wrap_key(os.urandom(32), CONTEXT)
