"""The gateway's data keys: PBKDF2, the provider-``password`` blobs, the ``memory`` key wrap.

Primitives (§2, §3.2, §3.3 of docs/INTEROP.md) under the key managers of
s3cryptfs/keys/gateway.py, through which a mount reaches them; ``data_key`` is the whole rule for
callers that hold the secrets themselves (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from s3cryptfs.errors import (
    FormatError,
    InvalidEnvelope,
    KeyNotFound,
    UnwrapFailed,
    WrongPasswordError,
)
from s3cryptfs.format.envelope import KeyEnvelope
from s3cryptfs.format.gateway.metadata import (
    DEFAULT_ITERATIONS,
    KEY,
    LEGACY_ITERATIONS,
    MAX_ITERATIONS,
    MEMORY,
    NONCE,
    PASSWORD,
    SALT,
    is_derivation,
    key_envelope,
    parse_kdf_params,
)


def _pw_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


class _LRU:
    def __init__(self, size: int) -> None:
        self._size = size
        self._d: OrderedDict[tuple[bytes, bytes, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, k: tuple[bytes, bytes, int]) -> bytes | None:
        with self._lock:
            v = self._d.get(k)
            if v is not None:
                self._d.move_to_end(k)
            return v

    def put(self, k: tuple[bytes, bytes, int], v: bytes) -> None:
        with self._lock:
            self._d[k] = v
            self._d.move_to_end(k)
            while len(self._d) > self._size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


_PBKDF2_CACHE = _LRU(64)


def pbkdf2(password: str | bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA256, 32 B, cached per (password, salt, iterations)."""
    pw = _pw_bytes(password)
    k = (hashlib.sha256(pw).digest(), salt, iterations)
    v = _PBKDF2_CACHE.get(k)
    if v is None:
        v = hashlib.pbkdf2_hmac("sha256", pw, salt, iterations, KEY)
        _PBKDF2_CACHE.put(k, v)
    return v


def parse_master_key(material: str | bytes) -> bytes:
    """The gateway's parsing of a memory master key: hex iff 32/48/64 hex chars, else raw."""
    raw = material.encode("utf-8") if isinstance(material, str) else bytes(material)
    if len(raw) in (32, 48, 64):
        try:
            key = bytes.fromhex(raw.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            key = raw
    else:
        key = raw
    if len(key) not in (16, 24, 32):
        raise InvalidEnvelope(f"gateway: memory master key must be 16/24/32 B, got {len(key)}")
    return key


# --- unwrapping ----------------------------------------------------------------------------


def _gcm_open_dek(kek: bytes, nonce: bytes, ct: bytes) -> bytes | None:
    try:
        return AESGCM(kek).decrypt(nonce, ct, None)
    except InvalidTag:
        return None


def unwrap_password_dek(blob: bytes, password: str | bytes) -> bytes:
    """Unwrap a provider-``password`` blob (96 B with iteration prefix, or 92 B legacy)."""
    if len(blob) < 60:
        raise InvalidEnvelope("gateway: password-wrapped key too short")
    if len(blob) >= 64:
        (it,) = struct.unpack(">I", blob[:4])
        if LEGACY_ITERATIONS <= it <= MAX_ITERATIONS:
            salt, nonce, ct = blob[4:36], blob[36:48], blob[48:]
            dek = _gcm_open_dek(pbkdf2(password, salt, it), nonce, ct)
            if dek is not None:
                return _check_dek(dek)
    salt, nonce, ct = blob[:32], blob[32:44], blob[44:]
    dek = _gcm_open_dek(pbkdf2(password, salt, LEGACY_ITERATIONS), nonce, ct)
    if dek is None:
        raise WrongPasswordError("gateway: password does not unwrap the data key")
    return _check_dek(dek)


def _check_dek(dek: bytes) -> bytes:
    if len(dek) != KEY:
        raise InvalidEnvelope(f"gateway: data key is {len(dek)} B, expected 32")
    return dek


def unwrap_memory_dek(wrapped: bytes, master_key: bytes | str) -> bytes:
    """RFC 3394 unwrap under the memory provider's master key (raw bytes or config string)."""
    kek = (
        master_key
        if isinstance(master_key, bytes) and len(master_key) in (16, 24, 32)
        else parse_master_key(master_key)
    )
    try:
        return _check_dek(aes_key_unwrap(kek, wrapped))
    except InvalidUnwrap as e:
        raise UnwrapFailed("gateway: memory-wrapped key does not unwrap") from e
    except ValueError as e:
        raise InvalidEnvelope(f"gateway: bad memory-wrapped key: {e}") from e


def password_data_key(envelope: KeyEnvelope, password: str | bytes) -> bytes:
    """The data key of a ``password`` envelope under *password*: PBKDF2 over the salt of a
    derivation envelope (iterations bounded before any work), else the blob unwrapped."""
    if not is_derivation(envelope):
        return unwrap_password_dek(envelope.ciphertext, password)
    iterations = parse_kdf_params(envelope.key_id)
    if len(envelope.ciphertext) != SALT:
        raise FormatError("gateway: salt must be 32 B")
    return pbkdf2(password, envelope.ciphertext, iterations)


def data_key(
    metadata: Mapping[str, str],
    *,
    password: str | bytes | None = None,
    master_key: bytes | str | None = None,
) -> bytes:
    """The 32 B key that encrypts the chunks of this object."""
    envelope = key_envelope(metadata)
    if envelope.provider == PASSWORD:
        if password is None and is_derivation(envelope):
            raise KeyNotFound("gateway: password-direct object but no password given")
        if password is None:
            raise KeyNotFound("gateway: object is password-wrapped but no password given")
        return password_data_key(envelope, password)
    if envelope.provider == MEMORY:
        if master_key is None:
            raise KeyNotFound("gateway: object is memory-wrapped but no master key given")
        return unwrap_memory_dek(envelope.ciphertext, master_key)
    raise KeyNotFound(f"gateway: unsupported key provider {envelope.provider!r}")


# --- wrapping ------------------------------------------------------------------------------


def _password_blob(kek: AESGCM, iterations: int, salt: bytes, nonce: bytes, dek: bytes) -> bytes:
    """The 0.8 provider-``password`` blob (96 B): BE32(iterations) || salt || nonce || GCM(DEK)."""
    return struct.pack(">I", iterations) + salt + nonce + kek.encrypt(nonce, dek, None)


def wrap_password_dek(
    dek: bytes,
    password: str | bytes,
    iterations: int = DEFAULT_ITERATIONS,
    *,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The 0.8 provider-``password`` blob (96 B), under a salt of its own."""
    salt = os.urandom(SALT) if salt is None else salt
    nonce = os.urandom(NONCE) if nonce is None else nonce
    return _password_blob(AESGCM(pbkdf2(password, salt, iterations)), iterations, salt, nonce, dek)


class PasswordKek:
    """Wraps data keys as provider ``password`` blobs, stretching the password once.

    The gateway draws a salt per object and so runs PBKDF2 for every write; the blob format lets
    one salt serve many objects as long as each wrap has its own random nonce, so this derives
    the key-encryption key once per (password, salt) and every object costs one AES-GCM."""

    def __init__(self, password: str | bytes, iterations: int = DEFAULT_ITERATIONS) -> None:
        self.iterations = iterations
        self.salt = os.urandom(SALT)
        self._kek = AESGCM(pbkdf2(password, self.salt, iterations))

    def wrap(self, dek: bytes) -> bytes:
        return _password_blob(self._kek, self.iterations, self.salt, os.urandom(NONCE), dek)


def wrap_memory_dek(dek: bytes, master_key: bytes) -> bytes:
    """RFC 3394 wrap under the memory provider's master key (as parse_master_key returns it)."""
    return aes_key_wrap(master_key, dek)
