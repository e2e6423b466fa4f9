"""Vault / OpenBao Transit key manager (provider ``vault``), over hvac.

Settings: ``address`` (e.g. https://127.0.0.1:8200), ``mount`` (default ``transit``), ``key``
(the transit key name), ``namespace`` (optional), ``timeout`` (seconds, default 10), ``verify``
(CA bundle path or bool, default true). Secrets: ``token``.

The wrapped DEK is the transit ciphertext string (``vault:vN:...``) as bytes; the version is
parsed from it. The volume id is bound as transit ``associated_data`` (an aes256-gcm96 key).
Versions live on the server: rotate/retire change the server and return the descriptor settings
unchanged.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import hvac
import hvac.exceptions as hexc
import requests

from s3cryptfs.errors import (
    ConfigError,
    InvalidEnvelope,
    KeyAccessDenied,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    ProviderUnavailable,
    UnwrapFailed,
)
from s3cryptfs.keys.base import KeyEnvelope, KeyVersionInfo

PROVIDER = "vault"
DEFAULT_MOUNT = "transit"
DEFAULT_TIMEOUT = 10.0
KEY_TYPE = "aes256-gcm96"  # supports associated_data without a derived key
# Fields that identify the key: what the volume descriptor keeps (connection fields stay local).
DESCRIPTOR_FIELDS = ("mount", "key", "namespace")
_CIPHERTEXT = re.compile(rb"^vault:v([0-9]+):[A-Za-z0-9+/=]+$")
_INFO_TTL = 5.0  # seconds a read of the key's versions is reused by active_key_version()

T = TypeVar("T")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _context_data(context: Mapping[str, str]) -> str:
    volume_id = context.get("volume_id", "")
    return _b64(f"s3cryptfs-volume:{volume_id}".encode())


def _connection(settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    address = settings.get("address")
    if not isinstance(address, str) or not address:
        raise ConfigError("vault key manager: setting 'address' is required (in --kms-config)")
    token = secrets.get("token")
    if not token:
        raise ConfigError(
            "vault key manager: no token (set S3CRYPTFS_VAULT_TOKEN, VAULT_TOKEN or token_file)"
        )
    verify = settings.get("verify", True)
    return {
        "url": address,
        "token": token.decode() if isinstance(token, bytes) else str(token),
        "namespace": settings.get("namespace") or None,
        "timeout": float(settings.get("timeout", DEFAULT_TIMEOUT)),
        "verify": verify,
    }


class _Transit:
    """One transit key reached with one token; translates hvac/requests failures."""

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        self.conn = _connection(settings, secrets)
        self.mount = str(settings.get("mount") or DEFAULT_MOUNT).strip("/")
        key = settings.get("key")
        if not isinstance(key, str) or not key:
            raise ConfigError("vault key manager: setting 'key' (transit key name) is required")
        self.key = key
        self._local = threading.local()
        self._clients: list[hvac.Client] = []
        self._lock = threading.Lock()
        self._closed = False

    def _client(self) -> hvac.Client:
        # requests sessions are not documented thread-safe: one client per thread.
        client = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if self._closed:
                    raise ProviderUnavailable("vault key manager is closed")
                client = hvac.Client(**self.conn)
                self._clients.append(client)
            self._local.client = client
        return client

    def call(
        self,
        what: str,
        fn: Callable[[hvac.Client], T],
        bad_request: type[KeyManagerError] = KeyManagerError,
    ) -> T:
        try:
            return fn(self._client())
        except hexc.InvalidRequest as exc:
            raise bad_request(f"vault refused {what}: {_first(exc)}") from None
        except hexc.Forbidden:
            raise KeyAccessDenied(
                f"vault refused {what} on {self.mount}/{self.key}: permission denied (the token "
                "is invalid or expired, or its policy does not allow this)"
            ) from None
        except hexc.Unauthorized:
            raise KeyAccessDenied(f"vault refused the token for {what}") from None
        except hexc.InvalidPath:
            raise KeyNotFound(f"vault has no transit key {self.mount}/{self.key}") from None
        except (hexc.VaultDown, hexc.InternalServerError, hexc.BadGateway) as exc:
            raise ProviderUnavailable(f"vault cannot serve {what}: {_first(exc)}") from None
        except requests.exceptions.InvalidJSONError:
            # It answered, so it is not unavailable: something (a proxy?) answered wrongly.
            raise KeyManagerError(f"vault answered {what} with a reply that is not JSON") from None
        except requests.exceptions.RequestException as exc:
            raise ProviderUnavailable(
                f"vault at {self.conn['url']} did not answer ({type(exc).__name__})"
            ) from None
        except hexc.VaultError as exc:
            raise KeyManagerError(f"vault failed {what}: {_first(exc)}") from None

    def path(self, op: str) -> str:
        return f"/v1/{self.mount}/{op}/{self.key}"

    def read_key(self) -> dict[str, Any]:
        reply = self.call("read key", lambda c: c.adapter.get(self.path("keys")))
        info = _data(reply, "read key")
        try:
            int(info["latest_version"])
        except (KeyError, TypeError, ValueError):
            raise KeyManagerError("vault answered read key with no latest_version") from None
        return info

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            client.adapter.close()


def _data(reply: Any, what: str) -> dict[str, Any]:
    """The "data" of a JSON reply. hvac hands back the raw response when the body is not JSON."""
    if not isinstance(reply, dict):
        raise KeyManagerError(f"vault answered {what} with a reply that is not JSON")
    data = reply.get("data")
    if not isinstance(data, dict):
        raise KeyManagerError(f"vault answered {what} with no data")
    return data


def _first(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return str(errors[0])[:200]
    return type(exc).__name__


class VaultKeyManager:
    """KeyManager and KeyAdmin over one Transit key."""

    provider = PROVIDER

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        self._settings = {k: settings[k] for k in DESCRIPTOR_FIELDS if settings.get(k)}
        self._settings.setdefault("mount", DEFAULT_MOUNT)
        self._transit = _Transit(settings, secrets)
        self._info_lock = threading.Lock()
        self._info: tuple[float, dict[str, Any]] | None = None

    # --- key information ----------------------------------------------------------------

    def _key_info(self, fresh: bool = False) -> dict[str, Any]:
        with self._info_lock:
            cached = self._info
        if cached is not None and not fresh and time.monotonic() - cached[0] < _INFO_TTL:
            return cached[1]
        info = self._transit.read_key()
        with self._info_lock:
            self._info = (time.monotonic(), info)
        return info

    def active_key_version(self) -> int:
        return int(self._key_info()["latest_version"])

    def health_check(self) -> None:
        self._key_info(fresh=True)

    # --- wrap / unwrap ------------------------------------------------------------------

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        body = {"plaintext": _b64(dek), "associated_data": _context_data(context)}
        t = self._transit
        reply = t.call("encrypt", lambda c: c.adapter.post(t.path("encrypt"), json=body))
        try:
            ciphertext = str(_data(reply, "encrypt")["ciphertext"]).encode("ascii")
        except (KeyError, UnicodeEncodeError):
            raise KeyManagerError("vault answered encrypt with no ciphertext") from None
        match = _CIPHERTEXT.match(ciphertext)
        if match is None:
            raise KeyManagerError("vault returned a ciphertext in an unknown format")
        return KeyEnvelope(t.key, int(match.group(1)), PROVIDER, ciphertext)

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        t = self._transit
        if envelope.provider != PROVIDER:
            raise InvalidEnvelope(f"envelope of provider {envelope.provider!r}, not {PROVIDER}")
        if envelope.key_id != t.key:
            raise KeyNotFound(f"transit key {envelope.key_id!r} is not this volume's ({t.key})")
        match = _CIPHERTEXT.match(envelope.ciphertext)
        if match is None:
            raise InvalidEnvelope("wrapped key is not a vault transit ciphertext")
        version = int(match.group(1))
        self._check_version(envelope.key_version)
        if version != envelope.key_version:
            raise InvalidEnvelope(
                f"envelope says version {envelope.key_version}, ciphertext says {version}"
            )
        body = {
            "ciphertext": envelope.ciphertext.decode("ascii"),
            "associated_data": _context_data(context),
        }
        try:
            reply = t.call(
                "decrypt",
                lambda c: c.adapter.post(t.path("decrypt"), json=body),
                bad_request=UnwrapFailed,
            )
        except UnwrapFailed:
            # Perhaps retired elsewhere since the last read of the key: ask again.
            self._check_version(version, fresh=True)
            raise
        try:
            return base64.b64decode(reply["data"]["plaintext"], validate=True)
        except (KeyError, ValueError, TypeError):
            raise UnwrapFailed("vault returned no plaintext") from None

    def _check_version(self, version: int, fresh: bool = False) -> None:
        try:
            info = self._key_info(fresh=fresh)
        except KeyAccessDenied:
            return  # a decrypt-only token may not read the key; the decrypt decides
        if version > int(info["latest_version"]) and not fresh:
            info = self._key_info(fresh=True)  # perhaps rotated since the last read
        if version > int(info["latest_version"]) or version < 1:
            raise KeyNotFound(f"transit key {self._transit.key} has no version {version}")
        if version < int(info.get("min_decryption_version", 1)):
            raise KeyRetired(f"transit key {self._transit.key} version {version} is retired")

    # --- KeyAdmin -----------------------------------------------------------------------

    def versions(self) -> list[KeyVersionInfo]:
        info = self._key_info(fresh=True)
        latest = int(info["latest_version"])
        floor = int(info.get("min_decryption_version", 1))
        created = {int(k): v for k, v in info.get("keys", {}).items()}
        out = []
        # Versions below the floor may have been trimmed from "keys": still list them, retired.
        for v in range(1, latest + 1):
            state = "active" if v == latest else "decrypt-only" if v >= floor else "retired"
            when = created.get(v)
            when = float(when) if isinstance(when, int | float) else None
            out.append(KeyVersionInfo(v, self._transit.key, state, when))
        return out

    def rotate(self) -> dict[str, Any]:
        t = self._transit
        t.call("rotate", lambda c: c.adapter.post(f"/v1/{t.mount}/keys/{t.key}/rotate"))
        self._key_info(fresh=True)
        return dict(self._settings)

    def retire(self, version: int) -> dict[str, Any]:
        info = self._key_info(fresh=True)
        latest = int(info["latest_version"])
        if version >= latest:
            if version == latest:
                raise KeyManagerError(f"version {version} is the active one; rotate first")
            raise KeyNotFound(f"transit key {self._transit.key} has no version {version}")
        # Transit can only raise a floor: retiring v retires every version below it too.
        if version >= int(info.get("min_decryption_version", 1)):
            t = self._transit
            body = {"min_decryption_version": version + 1}
            t.call(
                "retire",
                lambda c: c.adapter.post(f"/v1/{t.mount}/keys/{t.key}/config", json=body),
            )
            self._key_info(fresh=True)
        return dict(self._settings)

    def close(self) -> None:
        self._transit.close()


def create_settings(options: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """Descriptor settings for a new volume; creates the transit key when it does not exist.

    The key name defaults to ``s3cryptfs-<volume_id>``. An existing key must be of a type that
    takes associated data (aes256-gcm96 or chacha20-poly1305).
    """
    settings = dict(options)
    if not settings.get("key"):
        volume_id = settings.get("volume_id")
        if not volume_id:
            raise ConfigError("vault key manager: set 'key' (the transit key name)")
        settings["key"] = f"s3cryptfs-{volume_id}"
    transit = _Transit(settings, secrets)
    try:
        try:
            info = transit.read_key()
        except KeyNotFound:
            body = {"type": KEY_TYPE}
            try:
                transit.call(
                    "create key",
                    lambda c: c.adapter.post(f"/v1/{transit.mount}/keys/{transit.key}", json=body),
                )
            except KeyNotFound:
                raise ConfigError(
                    f"vault has no transit engine at {transit.mount}/ (enable it, or set mount)"
                ) from None
            info = transit.read_key()
        if info.get("type") not in (KEY_TYPE, "chacha20-poly1305") or info.get("derived"):
            raise ConfigError(
                f"transit key {transit.key} is of type {info.get('type')}: s3cryptfs needs a "
                f"non-derived {KEY_TYPE} key (it binds the volume id as associated data)"
            )
    finally:
        transit.close()
    out = {k: settings[k] for k in DESCRIPTOR_FIELDS if settings.get(k)}
    out.setdefault("mount", DEFAULT_MOUNT)
    return out
