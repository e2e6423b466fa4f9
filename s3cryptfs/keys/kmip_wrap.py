"""The two ways the KMIP key manager wraps a data key (docs/KMS-kmip.md, "Wrap modes").

``aes-gcm-local`` (default of provider ``kmip``): the server holds the only secret, a KMIP AES
key K, but the DEK never travels. Per object we pick a random 32-byte salt, ask the server for
``AES-CBC_K(IV = 0^16, PKCS#5, salt)`` (deterministic: a PRF of the salt under K), derive a
one-object KEK from that with HKDF-SHA256, and seal the DEK with AES-256-GCM under it, binding
the volume id, key id and key version as associated data::

    ciphertext = salt (32) || nonce (12) || AES-GCM(KEK, nonce, DEK, AAD) (32 + 16)   = 92 bytes

Unauthenticated server-side CBC/CTR output is never the wrapped key: GCM authenticates it, and a
changed salt yields another KEK, so any tampering fails as UnwrapFailed.

``nist-keywrap`` (provider ``cosmian-kmip``, the Go gateway's format): the server runs KMIP
Encrypt/Decrypt with BlockCipherMode NISTKeyWrap (RFC 3394, IV A6A6A6A6A6A6A6A6), whose
integrity check authenticates the 40-byte result; we only check its shape here.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from s3cryptfs.errors import InvalidEnvelope, UnwrapFailed

AES_GCM_LOCAL = "aes-gcm-local"
NIST_KEYWRAP = "nist-keywrap"
WRAP_MODES = (AES_GCM_LOCAL, NIST_KEYWRAP)

DEK_LEN = 32
SALT_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
GCM_LOCAL_LEN = SALT_LEN + NONCE_LEN + DEK_LEN + TAG_LEN  # 92
KEYWRAP_LEN = DEK_LEN + 8  # RFC 3394 adds one 64-bit integrity block: 40
KEYWRAP_IV = bytes.fromhex("A6A6A6A6A6A6A6A6")  # RFC 3394 default initial value
CBC_ZERO_IV = bytes(16)


def _label(kind: bytes, key_id: str, version: int) -> bytes:
    return kind + b"\x00" + key_id.encode() + b"\x00" + version.to_bytes(4, "big")


def _aad(volume_id: str, key_id: str, version: int) -> bytes:
    return _label(b"s3cryptfs kmip dek\x00" + volume_id.encode(), key_id, version)


def derive_kek(server_output: bytes, key_id: str, version: int) -> bytes:
    """The one-object KEK from the server's deterministic encryption of the salt."""
    if len(server_output) < SALT_LEN:
        raise UnwrapFailed("the KMIP server returned too little data for the key derivation")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_label(b"s3cryptfs kmip aes-gcm-local v1", key_id, version),
    ).derive(server_output)


def new_salt() -> bytes:
    return os.urandom(SALT_LEN)


def seal(kek: bytes, salt: bytes, dek: bytes, volume_id: str, key_id: str, version: int) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    return salt + nonce + AESGCM(kek).encrypt(nonce, dek, _aad(volume_id, key_id, version))


def split_salt(blob: bytes) -> bytes:
    """The salt of an aes-gcm-local blob, after checking its length."""
    if len(blob) != GCM_LOCAL_LEN:
        raise InvalidEnvelope(f"wrapped key has {len(blob)} bytes, expected {GCM_LOCAL_LEN}")
    return blob[:SALT_LEN]


def open_sealed(kek: bytes, blob: bytes, volume_id: str, key_id: str, version: int) -> bytes:
    split_salt(blob)
    nonce = blob[SALT_LEN : SALT_LEN + NONCE_LEN]
    try:
        return AESGCM(kek).decrypt(
            nonce, blob[SALT_LEN + NONCE_LEN :], _aad(volume_id, key_id, version)
        )
    except InvalidTag:
        raise UnwrapFailed("wrapped key does not authenticate") from None


def check_keywrap_blob(blob: bytes) -> bytes:
    """An RFC 3394 wrap of a 32-byte key is 40 bytes (5 semiblocks); anything else is malformed."""
    if len(blob) != KEYWRAP_LEN:
        raise InvalidEnvelope(
            f"NIST key wrap of a 32-byte key is {KEYWRAP_LEN} bytes, this one has {len(blob)}"
        )
    return blob


def check_unwrapped(dek: bytes | None) -> bytes:
    if dek is None or len(dek) != DEK_LEN:
        raise UnwrapFailed("the KMIP server did not return a 32-byte data key")
    return bytes(dek)
