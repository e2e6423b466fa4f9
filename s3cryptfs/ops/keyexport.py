"""Key backup: ``s3cryptfs keys export`` and ``keys import``.

An export holds what is needed to read the volume without this machine and without the
descriptor object in the bucket: the volume descriptor (for the password manager it carries the
sealed key-encryption keys; for KMS providers it carries the key references, the KMS itself
holds the keys). The bundle is sealed under an export passphrase: scrypt, then AES-256-GCM over
the JSON, with the header as associated data. File layout (docs/KMS.md, "Backup and restore"):

    b"S3CFKEYX" | version u8 (1) | scrypt log2(N) u8 | r u8 | p u8 | salt 16 | nonce 12 | ct+tag
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from s3cryptfs import limits
from s3cryptfs.errors import ConfigError, WrongPasswordError
from s3cryptfs.format.descriptor import Descriptor

MAGIC = b"S3CFKEYX"
VERSION = 1
_HEAD = struct.Struct(">8sBBBB16s12s")
DEFAULT_LOG_N, DEFAULT_R, DEFAULT_P = 17, 8, 1


def _kek(passphrase: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log_n, r=r, p=p).derive(passphrase)


def seal(descriptor: Descriptor, url: str, passphrase: bytes, log_n: int = DEFAULT_LOG_N) -> bytes:
    doc: dict[str, Any] = {
        "s3cryptfs": "key-export",
        "version": VERSION,
        "volume": url,
        "volume_id": descriptor.volume_id,
        "provider": descriptor.provider,
        "descriptor": json.loads(descriptor.encode()),
        "note": (
            "the password provider's keys are inside the descriptor, sealed under the volume "
            "password"
            if descriptor.provider == "s3cryptfs-password"
            else f"the keys themselves stay in the {descriptor.provider} key manager"
        ),
    }
    salt, nonce = os.urandom(16), os.urandom(12)
    head = _HEAD.pack(MAGIC, VERSION, log_n, DEFAULT_R, DEFAULT_P, salt, nonce)
    key = _kek(passphrase, salt, log_n, DEFAULT_R, DEFAULT_P)
    return head + AESGCM(key).encrypt(nonce, json.dumps(doc).encode(), head)


def open_bundle(blob: bytes, passphrase: bytes) -> tuple[Descriptor, dict[str, Any]]:
    """The descriptor in an export; WrongPasswordError for a wrong passphrase or a damaged file."""
    if len(blob) < _HEAD.size + 16 or not blob.startswith(MAGIC):
        raise ConfigError("not an s3cryptfs key export (bad magic or too short)")
    magic, version, log_n, r, p, salt, nonce = _HEAD.unpack_from(blob)
    if version != VERSION:
        raise ConfigError(f"key export version {version} is not supported by this s3cryptfs")
    if not (14 <= log_n <= 22 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ConfigError("key export: scrypt parameters out of range")
    limits.check_scrypt(1 << log_n, r, p, "key export", ConfigError)
    head = blob[: _HEAD.size]
    try:
        plain = AESGCM(_kek(passphrase, salt, log_n, r, p)).decrypt(nonce, blob[_HEAD.size :], head)
    except InvalidTag:
        raise WrongPasswordError("wrong export passphrase, or the export file is damaged") from None
    doc = json.loads(plain)
    # Exports made before descriptors were signed hold version 1; the export's own seal is what
    # vouches for them.
    desc = Descriptor.decode(json.dumps(doc["descriptor"]).encode(), legacy=True)
    return desc, doc
