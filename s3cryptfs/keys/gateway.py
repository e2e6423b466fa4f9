"""The S3 Encryption Gateway's own key modes as key managers: ``password`` and ``memory``.

Neither is a provider of the volume descriptor: the gateway names them in each object's
envelope, and their secrets are this machine's (the volume's password, the master key of
``--gateway-master-key-file``). ``GatewayKeys`` holds the two for a codec, which reaches them by
provider name as it reaches the key ring's managers, so that gateway objects share the one
unwrap path (the DEK cache, the audit log, the errors that name the object).

As the gateway does (docs/INTEROP.md §3.2, §3.3), they open an
envelope whatever key id and version it names (the blob carries what is needed) and wrap under
version 1. A manager whose secret was not given still exists: it raises KeyNotFound, saying
which secret is missing. The bytes are format/gateway/keywrap.py's.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from s3cryptfs.errors import (
    FormatError,
    InvalidEnvelope,
    KeyNotFound,
    UnwrapFailed,
    WrongPasswordError,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.keys.base import KeyEnvelope, KeyManager

VERSION = 1  # the only key version of either mode
MEMORY_KEY_ID = "memory-v1"

NO_PASSWORD = "this gateway-format volume needs its password"
NO_MASTER_KEY = (
    "this gateway-format volume wraps keys with the gateway's memory master key: give it with "
    "--gateway-master-key-file"
)


def _check_provider(envelope: KeyEnvelope, provider: str) -> None:
    if envelope.provider != provider:
        raise InvalidEnvelope(f"envelope is for provider {envelope.provider!r}")


class GatewayPasswordKeyManager:
    """The gateway's single-password mode: provider-``password`` blobs and password-direct
    objects (derivation envelopes, see format/gateway/metadata.py ``key_envelope``).

    New keys are wrapped under one salt per manager, the password stretched at the first wrap
    (format/gateway/keywrap.py ``PasswordKek``); each unwrap stretches it over the object's own
    salt, cached per (password, salt, iterations)."""

    provider = gw.PASSWORD

    def __init__(
        self, password: str | bytes | None, iterations: int = gw.DEFAULT_ITERATIONS
    ) -> None:
        self._password = password
        self.iterations = iterations  # of new blobs only: a blob records its own
        self._lock = threading.Lock()
        self._kek: gw.PasswordKek | None = None

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        with self._lock:  # one PBKDF2, however many threads wrap at once
            if self._kek is None:
                if self._password is None:
                    raise KeyNotFound(NO_PASSWORD)
                self._kek = gw.PasswordKek(self._password, self.iterations)
            kek = self._kek
        return KeyEnvelope("", VERSION, gw.PASSWORD, kek.wrap(dek))

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        _check_provider(envelope, gw.PASSWORD)
        if self._password is None and gw.is_derivation(envelope):
            raise KeyNotFound("gateway: password-direct object but no password given")
        if self._password is None:
            raise KeyNotFound("gateway: object is password-wrapped but no password given")
        try:
            return gw.password_data_key(envelope, self._password)
        except WrongPasswordError as exc:  # the contract's kind for "does not authenticate"
            raise UnwrapFailed(str(exc)) from None
        except FormatError as exc:  # a derivation envelope's iterations or salt
            raise InvalidEnvelope(str(exc)) from None

    def active_key_version(self) -> int:
        return VERSION

    def health_check(self) -> None:
        if self._password is None:
            raise KeyNotFound(NO_PASSWORD)

    def close(self) -> None:
        with self._lock:
            self._kek = None


class GatewayMemoryKeyManager:
    """The gateway's ``memory`` provider: RFC 3394 under a master key, parsed as the gateway
    parses its configuration (format/gateway/keywrap.py ``parse_master_key``) at first use, so
    that a bad key fails the objects that need it, as any missing key does."""

    provider = gw.MEMORY

    def __init__(self, master_key: str | bytes | None) -> None:
        self._material = master_key
        self._lock = threading.Lock()
        self._kek: bytes | None = None

    def _master_key(self) -> bytes | None:
        """The parsed master key; None when none was given."""
        if self._material is None:
            return None
        with self._lock:
            if self._kek is None:
                self._kek = gw.parse_master_key(self._material)
            return self._kek

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        kek = self._master_key()
        if kek is None:
            raise KeyNotFound(NO_MASTER_KEY)
        return KeyEnvelope(MEMORY_KEY_ID, VERSION, gw.MEMORY, gw.wrap_memory_dek(dek, kek))

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        _check_provider(envelope, gw.MEMORY)
        kek = self._master_key()
        if kek is None:
            raise KeyNotFound("gateway: object is memory-wrapped but no master key given")
        return gw.unwrap_memory_dek(envelope.ciphertext, kek)

    def active_key_version(self) -> int:
        return VERSION

    def health_check(self) -> None:
        if self._master_key() is None:
            raise KeyNotFound(NO_MASTER_KEY)

    def close(self) -> None:
        with self._lock:
            self._kek = None


class GatewayKeys:
    """The gateway's two key managers of one codec, from this machine's secrets.

    ``manager`` answers for the providers objects name; ``writer`` for the mode a gateway-format
    volume writes with. A volume's write settings can change with its descriptor, so the
    password writer is made again when the iteration count does (a new salt, one PBKDF2)."""

    def __init__(self, password: str | bytes | None, master_key: str | bytes | None) -> None:
        self._password = password
        self._managers: dict[str, KeyManager] = {
            gw.PASSWORD: GatewayPasswordKeyManager(password),
            gw.MEMORY: GatewayMemoryKeyManager(master_key),
        }
        self._lock = threading.Lock()
        self._writer: GatewayPasswordKeyManager | None = None

    def manager(self, provider: str) -> KeyManager | None:
        """The manager of *provider*, or None when it is not one of the gateway's own."""
        return self._managers.get(provider)

    def writer(self, provider: str, iterations: int) -> KeyManager:
        """The manager that wraps new keys for a volume writing with *provider*."""
        if provider != gw.PASSWORD:
            found = self._managers.get(provider)
            if found is None:
                raise KeyNotFound(f"gateway: unsupported key provider {provider!r}")
            return found
        with self._lock:
            if self._writer is None or self._writer.iterations != iterations:
                self._writer = GatewayPasswordKeyManager(self._password, iterations)
            return self._writer

    def close(self) -> None:
        with self._lock:
            managers = [*self._managers.values(), *([self._writer] if self._writer else [])]
        for manager in managers:
            manager.close()
