"""KMIP key manager over PyKMIP with mutual TLS (providers ``kmip`` and ``cosmian-kmip``).

Settings (volume descriptor, possibly overlaid by machine-local options)::

    host, port            the KMIP server (port defaults to 5696)
    ca, cert, key         PEM paths: CA that signed the server, our client certificate and key
    server_name           name the server certificate must carry (default: host)
    keys                  [{"id": <KMIP unique id>, "version": N, "state"?: "retired"}, ...]
                          the first is active; the others only unwrap (unless retired)
    wrap_mode             "aes-gcm-local" (kmip default) or "nist-keywrap" (cosmian-kmip)
    timeout               seconds for each network step (default 10)
    pool_size             concurrent connections (default 4)

Secrets: ``key_password`` when the client key file is encrypted. The wrap formats are in
``kmip_wrap``; connections and error translation in ``kmip_transport``.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any

from kmip.core import enums
from kmip.pie.client import ProxyKmipClient
from kmip.pie.exceptions import KmipOperationFailure

from s3cryptfs.errors import (
    ConfigError,
    InvalidEnvelope,
    KeyAccessDenied,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    UnwrapFailed,
)
from s3cryptfs.keys import kmip_wrap as wrap
from s3cryptfs.keys.base import KeyEnvelope, KeyVersionInfo
from s3cryptfs.keys.kmip_transport import ConnectionPool, tls_context

PROVIDER = "kmip"
COSMIAN_PROVIDER = "cosmian-kmip"
DEFAULT_PORT = 5696
DEFAULT_TIMEOUT = 10.0
DEFAULT_POOL = 4
RETIRED = "retired"

_AES = enums.CryptographicAlgorithm.AES
_CBC_PARAMS = {
    "cryptographic_algorithm": _AES,
    "block_cipher_mode": enums.BlockCipherMode.CBC,
    "padding_method": enums.PaddingMethod.PKCS5,
}
_KEYWRAP_PARAMS = {
    "cryptographic_algorithm": _AES,
    "block_cipher_mode": enums.BlockCipherMode.NIST_KEY_WRAP,
}
_REFUSALS = (
    enums.ResultReason.PERMISSION_DENIED,
    enums.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL,
)


def _keys_from(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = settings.get("keys")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("kmip: settings need a non-empty 'keys' list")
    keys, seen = [], set()
    for entry in raw:
        try:
            key_id, version = str(entry["id"]), int(entry["version"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError("kmip: each key needs an 'id' and an integer 'version'") from None
        if not key_id or version < 1 or version in seen:
            raise ConfigError(f"kmip: key version {version} is invalid or listed twice")
        seen.add(version)
        keys.append({**entry, "id": key_id, "version": version})
    if keys[0].get("state") == RETIRED:
        raise ConfigError("kmip: the active (first) key is marked retired")
    return keys


class KmipKeyManager:
    """Wraps DEKs with keys held by a KMIP server. Also a KeyAdmin."""

    provider = PROVIDER
    default_wrap_mode = wrap.AES_GCM_LOCAL
    allowed_wrap_modes: tuple[str, ...] = wrap.WRAP_MODES

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        self._settings = copy.deepcopy(dict(settings))
        self._keys = _keys_from(settings)
        self._by_version = {k["version"]: k for k in self._keys}
        self._by_id = {k["id"]: k for k in self._keys}
        self._mode = str(settings.get("wrap_mode") or self.default_wrap_mode)
        if self._mode not in self.allowed_wrap_modes:
            raise ConfigError(
                f"{self.provider}: wrap_mode {self._mode!r} is not one of "
                f"{', '.join(self.allowed_wrap_modes)}"
            )
        self._pool = _pool_from(settings, secrets)
        self._lock = threading.Lock()
        self._closed = False

    # -- KeyManager ----------------------------------------------------------------------------
    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        dek = bytes(dek)
        if len(dek) != wrap.DEK_LEN:
            raise InvalidEnvelope(f"data keys are {wrap.DEK_LEN} bytes, not {len(dek)}")
        active = self._keys[0]
        key_id, version = active["id"], active["version"]
        if self._mode == wrap.NIST_KEYWRAP:
            blob = self._server(
                key_id,
                lambda c: c.encrypt(
                    dek,
                    uid=key_id,
                    cryptographic_parameters=_KEYWRAP_PARAMS,
                    iv_counter_nonce=wrap.KEYWRAP_IV,
                )[0],
                wrapping=True,
            )
            if blob is None or len(blob) != wrap.KEYWRAP_LEN:
                raise KeyManagerError("the KMIP server returned a malformed NIST key wrap")
        else:
            salt = wrap.new_salt()
            kek = wrap.derive_kek(self._prf(key_id, salt, wrapping=True), key_id, version)
            blob = wrap.seal(kek, salt, dek, _volume(context), key_id, version)
        return KeyEnvelope(key_id, version, self.provider, blob)

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        if envelope.provider != self.provider:
            raise InvalidEnvelope(
                f"envelope is for provider {envelope.provider!r}, not {self.provider!r}"
            )
        entry = self._entry_for(envelope)
        key_id, version = entry["id"], entry["version"]
        if entry.get("state") == RETIRED:
            raise KeyRetired(f"key version {version} ({key_id}) is retired")
        blob = envelope.ciphertext
        # The lengths of the two formats differ (40 and 92), so a volume that changed its
        # wrap_mode still reads what it wrote before.
        if len(blob) == wrap.KEYWRAP_LEN:
            dek = self._server(
                key_id,
                lambda c: c.decrypt(
                    blob,
                    uid=key_id,
                    cryptographic_parameters=_KEYWRAP_PARAMS,
                    iv_counter_nonce=wrap.KEYWRAP_IV,
                ),
                wrapping=False,
            )
            return wrap.check_unwrapped(dek)
        if self.allowed_wrap_modes == (wrap.NIST_KEYWRAP,):
            wrap.check_keywrap_blob(blob)  # raises: this provider only knows key wrap
        salt = wrap.split_salt(blob)
        kek = wrap.derive_kek(self._prf(key_id, salt, wrapping=False), key_id, version)
        return wrap.open_sealed(kek, blob, _volume(context), key_id, version)

    def active_key_version(self) -> int:
        return int(self._keys[0]["version"])

    def health_check(self) -> None:
        """Connects, authenticates, and checks that the active key exists and is Active."""
        key_id = self._keys[0]["id"]
        state = self._server(key_id, lambda c: _state_of(c, key_id), wrapping=True)
        if state != enums.State.ACTIVE:
            raise KeyRetired(f"KMIP key {key_id} is {state.name}, not ACTIVE")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()

    # -- KeyAdmin ------------------------------------------------------------------------------
    def versions(self) -> list[KeyVersionInfo]:
        active = self._keys[0]["version"]
        infos = [
            KeyVersionInfo(
                version=k["version"],
                key_id=k["id"],
                state="active"
                if k["version"] == active
                else (RETIRED if k.get("state") == RETIRED else "decrypt-only"),
            )
            for k in self._keys
        ]
        return sorted(infos, key=lambda i: i.version)

    def rotate(self) -> dict[str, Any]:
        """A new AES-256 key on the server, activated, first in ``keys`` (version max+1).
        This manager keeps using the settings it was made with; the caller saves the result."""
        version = max(self._by_version) + 1
        key_id = self._server("", lambda c: _create_active_key(c, version), wrapping=True)
        settings = copy.deepcopy(self._settings)
        settings["keys"] = [{"id": key_id, "version": version}] + copy.deepcopy(
            list(settings["keys"])
        )
        return settings

    def retire(self, version: int) -> dict[str, Any]:
        """Revokes the key on the server (it stops encrypting and decrypting) and marks it."""
        entry = self._by_version.get(int(version))
        if entry is None:
            raise KeyNotFound(f"no key version {version} in this volume")
        if entry is self._keys[0]:
            raise ConfigError("the active key version cannot be retired; rotate first")
        key_id = entry["id"]

        def revoke(client: ProxyKmipClient) -> None:
            if _state_of(client, key_id) == enums.State.ACTIVE:
                client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, key_id)

        self._server(key_id, revoke, wrapping=True)
        settings = copy.deepcopy(self._settings)
        for item in settings["keys"]:
            if int(item["version"]) == entry["version"]:
                item["state"] = RETIRED
        return settings

    # -- internals -----------------------------------------------------------------------------
    def _entry_for(self, envelope: KeyEnvelope) -> dict[str, Any]:
        entry = self._by_id.get(envelope.key_id) if envelope.key_id else None
        if envelope.key_id and entry is None:
            raise KeyNotFound(f"KMIP key {envelope.key_id!r} is not configured for this volume")
        if entry is None:
            entry = self._by_version.get(envelope.key_version)
        elif envelope.key_version and envelope.key_version != entry["version"]:
            raise KeyNotFound(
                f"envelope says version {envelope.key_version} for KMIP key "
                f"{envelope.key_id!r}, configured as version {entry['version']}"
            )
        if entry is None:
            raise KeyNotFound(f"key version {envelope.key_version} is not configured")
        return entry

    def _prf(self, key_id: str, salt: bytes, *, wrapping: bool) -> bytes:
        out = self._server(
            key_id,
            lambda c: c.encrypt(
                salt,
                uid=key_id,
                cryptographic_parameters=_CBC_PARAMS,
                iv_counter_nonce=wrap.CBC_ZERO_IV,
            )[0],
            wrapping=wrapping,
        )
        return bytes(out or b"")

    def _server(self, key_id: str, fn: Any, *, wrapping: bool) -> Any:
        """Run *fn* on a pooled client, turning KMIP refusals into our error kinds."""
        if self._closed:
            raise KeyManagerError("the KMIP key manager is closed")
        try:
            return self._pool.call(fn)
        except KmipOperationFailure as exc:
            raise self._translate(exc, key_id, wrapping) from None

    def _translate(self, exc: KmipOperationFailure, key_id: str, wrapping: bool) -> Exception:
        reason, message = exc.reason, getattr(exc, "message", "") or str(exc)
        if reason == enums.ResultReason.ITEM_NOT_FOUND:
            return KeyNotFound(f"KMIP key {key_id!r} does not exist on the server")
        if reason in _REFUSALS:
            if key_id and reason == enums.ResultReason.PERMISSION_DENIED:
                state = self._state_if_visible(key_id)
                if state is not None and state != enums.State.ACTIVE:
                    return KeyRetired(f"KMIP key {key_id!r} is {state.name} (revoked)")
            return KeyAccessDenied(f"KMIP server refused the operation on {key_id!r}: {message}")
        if wrapping:
            return ConfigError(
                f"{self.provider}: the KMIP server cannot wrap in mode {self._mode!r}: {message}"
            )
        return UnwrapFailed(f"the KMIP server could not unwrap the key: {reason}")

    def _state_if_visible(self, key_id: str) -> enums.State | None:
        try:
            return self._pool.call(lambda c: _state_of(c, key_id))
        except (KmipOperationFailure, KeyManagerError):
            return None


class CosmianKmipKeyManager(KmipKeyManager):
    """Provider ``cosmian-kmip``: the Go gateway's envelopes (NIST key wrap on the server)."""

    provider = COSMIAN_PROVIDER
    default_wrap_mode = wrap.NIST_KEYWRAP
    allowed_wrap_modes = (wrap.NIST_KEYWRAP,)


def _volume(context: Mapping[str, str]) -> str:
    return str(context.get("volume_id", ""))


def _state_of(client: ProxyKmipClient, key_id: str) -> enums.State:
    _uid, attributes = client.get_attributes(key_id, ["State"])
    for attribute in attributes:
        if attribute.attribute_name.value == "State":
            return attribute.attribute_value.value
    raise KeyNotFound(f"KMIP key {key_id!r} has no State attribute")


def _create_active_key(client: ProxyKmipClient, version: int) -> str:
    key_id = client.create(
        _AES,
        256,
        name=f"s3cryptfs key v{version}",
        cryptographic_usage_mask=[
            enums.CryptographicUsageMask.ENCRYPT,
            enums.CryptographicUsageMask.DECRYPT,
        ],
    )
    client.activate(key_id)
    return str(key_id)


def _pool_from(settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> ConnectionPool:
    host = str(settings.get("host") or "")
    if not host:
        raise ConfigError("kmip: settings need 'host'")
    try:
        port = int(settings.get("port") or DEFAULT_PORT)
        timeout = float(settings.get("timeout") or DEFAULT_TIMEOUT)
        size = int(settings.get("pool_size") or DEFAULT_POOL)
    except (TypeError, ValueError):
        raise ConfigError("kmip: port, timeout and pool_size must be numbers") from None
    if timeout <= 0 or size < 1:
        raise ConfigError("kmip: timeout must be > 0 and pool_size >= 1")
    context = tls_context(
        str(settings.get("ca") or ""),
        str(settings.get("cert") or ""),
        str(settings.get("key") or ""),
        secrets.get("key_password"),
    )
    server_name = str(settings.get("server_name") or host)
    return ConnectionPool(host, port, context, server_name=server_name, timeout=timeout, size=size)


_CONNECTION_FIELDS = (
    "host",
    "port",
    "ca",
    "cert",
    "key",
    "server_name",
    "timeout",
    "pool_size",
    "wrap_mode",
)


def create_settings(options: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """Settings for a new volume (``s3cryptfs init``). Without ``keys`` in *options*, creates
    and activates an AES-256 key on the server and makes it version 1."""
    settings = {k: options[k] for k in _CONNECTION_FIELDS if options.get(k) not in (None, "")}
    if options.get("keys"):
        settings["keys"] = _keys_from(options)
        return settings
    pool = _pool_from(settings, secrets)
    try:
        try:
            key_id = pool.call(lambda c: _create_active_key(c, 1))
        except KmipOperationFailure as exc:
            raise KeyAccessDenied(f"KMIP server refused to create a key: {exc}") from None
    finally:
        pool.close()
    settings["keys"] = [{"id": key_id, "version": 1}]
    return settings
