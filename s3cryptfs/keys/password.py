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
import os
import threading
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from s3cryptfs.errors import (
    InvalidEnvelope,
    KeyNotFound,
    UnwrapFailed,
    VolumeError,
    WrongPasswordError,
)
from s3cryptfs.keys.base import KeyEnvelope

PROVIDER = "s3cryptfs-password"
KEY_LEN = 32
NONCE_LEN = 12

# OWASP's scrypt recommendation (128 MiB, about half a second here); descriptors carry their own.
DEFAULT_SCRYPT = {"n": 2**17, "r": 8, "p": 1}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise VolumeError(f"volume descriptor: {what} is not valid base64") from exc


def derive_muk(password: bytes, kdf: Mapping[str, Any]) -> bytes:
    """The slow step: scrypt(password) with the descriptor's parameters."""
    if kdf.get("name") != "scrypt":
        raise VolumeError(f"volume descriptor: unsupported KDF {kdf.get('name')!r}")
    salt = _unb64(kdf["salt"], "kdf salt")
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    if n < 2**14 or n & (n - 1) or r < 1 or p < 1:
        raise VolumeError("volume descriptor: scrypt parameters are out of range")
    return Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(password)


def _kek_aad(volume_id: str, version: int) -> bytes:
    return b"s3cryptfs kek\x00" + volume_id.encode() + b"\x00" + version.to_bytes(4, "big")


def _dek_aad(volume_id: str, version: int) -> bytes:
    return b"s3cryptfs dek\x00" + volume_id.encode() + b"\x00" + version.to_bytes(4, "big")


def seal_kek(muk: bytes, kek: bytes, volume_id: str, version: int) -> str:
    nonce = os.urandom(NONCE_LEN)
    return _b64(nonce + AESGCM(muk).encrypt(nonce, kek, _kek_aad(volume_id, version)))


def new_settings(
    password: bytes, volume_id: str, scrypt: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Settings for a new volume: a fresh salt and one KEK, version 1."""
    params = dict(DEFAULT_SCRYPT if scrypt is None else scrypt)
    kdf = {"name": "scrypt", "salt": _b64(os.urandom(16)), **params}
    muk = derive_muk(password, kdf)
    kek = os.urandom(KEY_LEN)
    return {
        "volume_id": volume_id,
        "kdf": kdf,
        "active_version": 1,
        "keys": [{"version": 1, "sealed": seal_kek(muk, kek, volume_id, 1)}],
    }


class PasswordKeyManager:
    """KeyManager over the KEKs sealed in the volume descriptor."""

    provider = PROVIDER

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        password = secrets.get("password")
        if not isinstance(password, bytes | bytearray) or not password:
            raise VolumeError("the password key manager needs a password")
        self._volume_id = str(settings["volume_id"])
        self._active = int(settings["active_version"])
        muk = derive_muk(bytes(password), settings["kdf"])
        self._keks: dict[int, AESGCM] = {}
        for entry in settings["keys"]:
            version = int(entry["version"])
            blob = _unb64(entry["sealed"], f"sealed key v{version}")
            try:
                kek = AESGCM(muk).decrypt(
                    blob[:NONCE_LEN], blob[NONCE_LEN:], _kek_aad(self._volume_id, version)
                )
            except InvalidTag:
                raise WrongPasswordError(
                    "wrong password: it does not open this volume's keys"
                ) from None
            self._keks[version] = AESGCM(kek)
        if self._active not in self._keks:
            raise VolumeError(f"volume descriptor: active key version {self._active} is missing")
        self._lock = threading.Lock()
        self._closed = False

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        version = self._active
        nonce = os.urandom(NONCE_LEN)
        ct = self._keks[version].encrypt(nonce, bytes(dek), _dek_aad(self._volume_id, version))
        return KeyEnvelope(self._volume_id, version, PROVIDER, nonce + ct)

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        if envelope.provider != PROVIDER:
            raise InvalidEnvelope(f"envelope is for provider {envelope.provider!r}")
        if envelope.key_id and envelope.key_id != self._volume_id:
            raise KeyNotFound(f"envelope names another volume's key ({envelope.key_id})")
        aead = self._keks.get(envelope.key_version)
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

    def health_check(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._keks.clear()
            self._closed = True
