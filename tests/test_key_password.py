"""The password key manager against the shared KeyManager conformance suite."""

from __future__ import annotations

import pytest

from s3cryptfs.errors import WrongPasswordError
from s3cryptfs.keys.password import PasswordKeyManager, new_settings
from tests.keymanager_conformance import Conformance

# The smallest scrypt cost the manager accepts keeps this module fast; volumes use 2**17.
FAST = {"n": 2**14, "r": 8, "p": 1}
PASSWORD = b"correct horse battery staple"


@pytest.fixture(scope="module")
def settings() -> dict:
    return new_settings(PASSWORD, "0123456789abcdef0123456789abcdef", FAST)


@pytest.fixture
def make_manager(settings):
    made: list[PasswordKeyManager] = []

    def make() -> PasswordKeyManager:
        m = PasswordKeyManager(settings, {"password": PASSWORD})
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def manager(make_manager):
    return make_manager()


@pytest.fixture
def unreachable_manager():
    return None


class TestPasswordManager(Conformance):
    def test_wrong_password_is_refused(self, settings) -> None:
        with pytest.raises(WrongPasswordError):
            PasswordKeyManager(settings, {"password": b"not the password at all"})
