"""Single-password key manager (the default).

The password is stretched ONCE per mount with scrypt into a master unlock key (MUK). The volume
descriptor holds random 256-bit key-encryption keys (KEKs), one per key version, each sealed under
the MUK with AES-256-GCM. Data keys are wrapped under the active KEK with AES-256-GCM.

So: a wrong password fails to unseal the KEKs (a clear error before anything is written); a new
key version is a new random KEK (no object needs the password again); changing the password only
re-seals the KEKs. See docs/FORMAT.md, "Password key manager".
"""

from __future__ import annotations

import base64
import copy
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from s3cryptfs import limits
from s3cryptfs.errors import (
    ConfigError,
    DescriptorAuthError,
    InvalidEnvelope,
    KeyNotFound,
    KeyRetired,
    UnwrapFailed,
    VolumeError,
    WrongPasswordError,
)
from s3cryptfs.keys.base import KeyEnvelope, KeyVersionInfo

PROVIDER = "s3cryptfs-password"
KEY_LEN = 32
NONCE_LEN = 12

MIN_PASSWORD_LEN = 12

# Everything of this manager lives in the descriptor (and is authenticated there).
DESCRIPTOR_FIELDS = ("volume_id", "kdf", "active_version", "keys")

# OWASP's scrypt recommendation (128 MiB, about half a second here); descriptors carry their own.
DEFAULT_SCRYPT = {"n": 2**17, "r": 8, "p": 1}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise VolumeError(f"volume descriptor: {what} is not valid base64") from exc


def check_new_password(password: bytes) -> None:
    """Policy for a password being set (init, change): refuse short ones with a clear message."""
    if len(password.decode("utf-8", "replace")) < MIN_PASSWORD_LEN:
        raise ConfigError(
            f"the new password is too short: use at least {MIN_PASSWORD_LEN} characters "
            "(a few random words make a good one)"
        )


def derive_muk(password: bytes, kdf: Mapping[str, Any]) -> bytes:
    """The slow step: scrypt(password) with the descriptor's parameters."""
    if kdf.get("name") != "scrypt":
        raise VolumeError(f"volume descriptor: unsupported KDF {kdf.get('name')!r}")
    salt = _unb64(kdf["salt"], "kdf salt")
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    if n < 2**14 or n & (n - 1) or r < 1 or p < 1:
        raise VolumeError("volume descriptor: scrypt parameters are out of range")
    # Whoever can write to the bucket can set these: bounded before scrypt takes the memory.
    limits.check_scrypt(n, r, p, "volume descriptor", VolumeError)
    return Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(password)


def _kek_aad(volume_id: str, version: int) -> bytes:
    return b"s3cryptfs kek\x00" + volume_id.encode() + b"\x00" + version.to_bytes(4, "big")


def _dek_aad(volume_id: str, version: int) -> bytes:
    return b"s3cryptfs dek\x00" + volume_id.encode() + b"\x00" + version.to_bytes(4, "big")


def _dak_aad(volume_id: str) -> bytes:
    return b"s3cryptfs dak\x00" + volume_id.encode()


def seal_kek(muk: bytes, kek: bytes, volume_id: str, version: int) -> str:
    nonce = os.urandom(NONCE_LEN)
    return _b64(nonce + AESGCM(muk).encrypt(nonce, kek, _kek_aad(volume_id, version)))


def create_settings(options: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """The registry's init hook: options carry ``volume_id`` (and optionally ``scrypt``)."""
    password = secrets.get("password")
    if not isinstance(password, bytes | bytearray) or not password:
        raise ConfigError("the password key manager needs a password")
    check_new_password(bytes(password))
    return new_settings(bytes(password), str(options["volume_id"]), options.get("scrypt"))


def new_settings(
    password: bytes, volume_id: str, scrypt: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Settings for a new volume: a fresh salt and one KEK, version 1."""
    manager = PasswordKeyManager.create(password, volume_id, scrypt)
    try:
        return manager.settings()
    finally:
        manager.close()


class PasswordKeyManager:
    """KeyManager over the KEKs sealed in the volume descriptor."""

    provider = PROVIDER
    wraps_locally = True  # its KEKs are in memory once the password is derived (base.py)

    def __init__(
        self,
        settings: Mapping[str, Any],
        secrets: Mapping[str, Any],
        *,
        _muk: bytes | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._closed = False
        if _muk is None:
            password = secrets.get("password")
            if not isinstance(password, bytes | bytearray) or not password:
                raise VolumeError("the password key manager needs a password")
            _muk = derive_muk(bytes(password), settings["kdf"])
        # The MUK stays in memory for the manager's life (rotate and reload need it), never on
        # disk; close() drops it.
        self._muk = _muk
        self._load(settings)

    @classmethod
    def create(
        cls, password: bytes, volume_id: str, scrypt: Mapping[str, int] | None = None
    ) -> PasswordKeyManager:
        """A manager over the settings of a new volume, with the password stretched once."""
        params = dict(DEFAULT_SCRYPT if scrypt is None else scrypt)
        kdf = {"name": "scrypt", "salt": _b64(os.urandom(16)), **params}
        muk = derive_muk(password, kdf)
        kek = os.urandom(KEY_LEN)
        settings = {
            "volume_id": volume_id,
            "kdf": kdf,
            "active_version": 1,
            "keys": [{"version": 1, "sealed": seal_kek(muk, kek, volume_id, 1)}],
        }
        return cls(settings, {}, _muk=muk)

    def settings(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._settings)

    def _load(self, settings: Mapping[str, Any]) -> None:
        volume_id = str(settings["volume_id"])
        active = int(settings["active_version"])
        keks: dict[int, AESGCM] = {}
        retired: set[int] = set()
        for entry in settings["keys"]:
            version = int(entry["version"])
            if entry.get("retired") or "sealed" not in entry:
                retired.add(version)
                continue
            blob = _unb64(entry["sealed"], f"sealed key v{version}")
            try:
                kek = AESGCM(self._muk).decrypt(
                    blob[:NONCE_LEN], blob[NONCE_LEN:], _kek_aad(volume_id, version)
                )
            except InvalidTag:
                raise WrongPasswordError(
                    "wrong password: it does not open this volume's keys"
                ) from None
            keks[version] = AESGCM(kek)
        if active not in keks:
            raise VolumeError(f"volume descriptor: active key version {active} is missing")
        self._settings = copy.deepcopy(dict(settings))
        self._volume_id = volume_id
        self._active = active
        self._keks = keks
        self._retired = retired

    def reload(self, settings: Mapping[str, Any]) -> None:
        """Take newer descriptor settings (a rotate by another process) with the kept MUK."""
        if settings.get("kdf") != self._settings.get("kdf"):
            raise VolumeError("the volume password was changed: remount with the new password")
        with self._lock:
            self._load(settings)

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        with self._lock:
            version, aead = self._active, self._keks[self._active]
        nonce = os.urandom(NONCE_LEN)
        ct = aead.encrypt(nonce, bytes(dek), _dek_aad(self._volume_id, version))
        return KeyEnvelope(self._volume_id, version, PROVIDER, nonce + ct)

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        if envelope.provider != PROVIDER:
            raise InvalidEnvelope(f"envelope is for provider {envelope.provider!r}")
        if envelope.key_id and envelope.key_id != self._volume_id:
            raise KeyNotFound(f"envelope names another volume's key ({envelope.key_id})")
        aead = self._keks.get(envelope.key_version)
        if aead is None and envelope.key_version in self._retired:
            raise KeyRetired(f"key version {envelope.key_version} is retired")
        if aead is None:
            raise KeyNotFound(f"key version {envelope.key_version} is not in this volume")
        blob = envelope.ciphertext
        if len(blob) != NONCE_LEN + KEY_LEN + 16:
            raise InvalidEnvelope(f"wrapped key has {len(blob)} bytes, expected 60")
        try:
            return aead.decrypt(
                blob[:NONCE_LEN], blob[NONCE_LEN:], _dek_aad(self._volume_id, envelope.key_version)
            )
        except InvalidTag:
            raise UnwrapFailed("wrapped key does not authenticate") from None

    def active_key_version(self) -> int:
        return self._active

    def settings_kdf(self) -> Any:
        """The KDF parameters the kept MUK was derived with."""
        with self._lock:
            return copy.deepcopy(self._settings.get("kdf"))

    # --- the descriptor authentication key (docs/FORMAT.md section 5.5) ----------------------

    def seal_auth_key(self, dak: bytes) -> bytes:
        """*dak* sealed under the MUK itself, not under a KEK: it then survives key rotation and
        retirement, and only a password change re-seals it."""
        with self._lock:
            muk = self._muk
        nonce = os.urandom(NONCE_LEN)
        return nonce + AESGCM(muk).encrypt(nonce, dak, _dak_aad(self._volume_id))

    def open_auth_key(self, sealed: bytes) -> bytes:
        """The DAK, or DescriptorAuthError: the KEKs opened, so the password is right, and a
        seal that does not open was put there by someone else."""
        with self._lock:
            muk = self._muk
        if len(sealed) != NONCE_LEN + KEY_LEN + 16:
            raise DescriptorAuthError(
                f"volume descriptor: the password seal has {len(sealed)} bytes, expected 60"
            )
        try:
            return AESGCM(muk).decrypt(
                sealed[:NONCE_LEN], sealed[NONCE_LEN:], _dak_aad(self._volume_id)
            )
        except InvalidTag:
            raise DescriptorAuthError(
                "volume descriptor: its authentication key does not open with the password "
                "that opens its keys; someone changed the descriptor"
            ) from None

    def health_check(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._keks = {}
            self._muk = b""
            self._closed = True

    # --- KeyAdmin ------------------------------------------------------------------------

    def versions(self) -> list[KeyVersionInfo]:
        with self._lock:
            entries = sorted(self._settings["keys"], key=lambda e: int(e["version"]))
            active = self._active
        out = []
        for entry in entries:
            version = int(entry["version"])
            if entry.get("retired") or "sealed" not in entry:
                state = "retired"
            else:
                state = "active" if version == active else "decrypt-only"
            out.append(KeyVersionInfo(version, self._volume_id, state, entry.get("created")))
        return out

    def rotate(self) -> dict[str, Any]:
        """A new random KEK, sealed under the kept MUK, becomes active. Returns new settings."""
        with self._lock:
            if self._closed:
                raise VolumeError("the key manager is closed")
            settings = copy.deepcopy(self._settings)
            version = max(int(e["version"]) for e in settings["keys"]) + 1
            sealed = seal_kek(self._muk, os.urandom(KEY_LEN), self._volume_id, version)
            settings["keys"].append(
                {"version": version, "sealed": sealed, "created": int(time.time())}
            )
            settings["active_version"] = version
        self.reload(settings)
        return copy.deepcopy(settings)

    def retire(self, version: int) -> dict[str, Any]:
        """Drop the sealed KEK of *version* (crypto-erasure of what it wrapped)."""
        with self._lock:
            if version == self._active:
                raise ConfigError(f"key version {version} is the active one; rotate first")
            settings = copy.deepcopy(self._settings)
            for entry in settings["keys"]:
                if int(entry["version"]) == version:
                    entry.pop("sealed", None)
                    entry["retired"] = True
                    entry["retired_at"] = int(time.time())
                    break
            else:
                raise KeyNotFound(f"key version {version} is not in this volume")
        self.reload(settings)
        return copy.deepcopy(settings)

    def change_password(self, new_password: bytes) -> dict[str, Any]:
        """Re-seal every live KEK under a MUK from *new_password* (fresh salt)."""
        check_new_password(new_password)
        with self._lock:
            settings = copy.deepcopy(self._settings)
            kdf = {k: v for k, v in settings["kdf"].items()}
            kdf["salt"] = _b64(os.urandom(16))
            new_muk = derive_muk(new_password, kdf)
            for entry in settings["keys"]:
                if "sealed" not in entry or entry.get("retired"):
                    continue
                version = int(entry["version"])
                blob = _unb64(entry["sealed"], f"sealed key v{version}")
                kek = AESGCM(self._muk).decrypt(
                    blob[:NONCE_LEN], blob[NONCE_LEN:], _kek_aad(self._volume_id, version)
                )
                entry["sealed"] = seal_kek(new_muk, kek, self._volume_id, version)
            settings["kdf"] = kdf
            self._muk = new_muk
            self._settings = copy.deepcopy(settings)
        return settings
