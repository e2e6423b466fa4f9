"""Extended attributes (``user.*``): their encoding, their limits and their seal.

docs/FORMAT.md section 6.1 is the normative text. The set of a file or directory is encoded as

    set   = entry*                           (names strictly ascending, bytewise)
    entry = u8(len(name)) || name || u16be(len(value)) || value

Names are whole (``user.`` included). A file or symbolic link carries its set, sealed under a key
derived from its own data key, in the user metadata ``s3cryptfs-xattrs``:

    key   = HKDF-SHA256(IKM = DEK, salt = none, info = "s3cryptfs v1 xattrs", L = 32)
    blob  = 0x01 || nonce || AES-256-GCM(key, nonce, set, AAD = "s3cryptfs xattrs" || 0x00 || 0x01)
    value = base64(blob)                     (nonce: 12 random bytes, fresh at every seal)

A directory carries its set in its entry of the directory index (vfs/attrindex.py), which is
sealed as a whole. Everything decoded here comes from the bucket: it is bounded and checked
before it is used, and anything malformed is refused (FormatError), never guessed at.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from s3cryptfs.errors import FormatError, IntegrityError

META_NAME = "s3cryptfs-xattrs"  # the user-metadata name of a file's sealed set
PREFIX = b"user."  # the only namespace stored
# The mount's own control attributes (fuse_ops.py) live here: never stored, never listed.
RESERVED = b"user.s3cryptfs."
NAME_MAX = 255  # Linux's XATTR_NAME_MAX, the prefix included
VALUE_MAX = 65536  # Linux's XATTR_SIZE_MAX (the kernel refuses larger values with E2BIG)
# The encoded set of one file or directory. Sealed, it must leave the rest of an object's user
# metadata room within AWS's 2 KiB (METADATA_MAX): 1 KiB leaves ~630 bytes, enough for the
# largest envelope we write (an AWS KMS ciphertext and key ARN, section 6 of FORMAT.md).
SET_MAX = 1024
# Gateway-format objects carry ~430 bytes more metadata of their own: less room for the set.
SET_MAX_GATEWAY = 768
METADATA_MAX = 2048  # S3 user metadata, names and values (AWS's limit)

BLOB_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
_KEY_INFO = b"s3cryptfs v1 xattrs"
_AAD = b"s3cryptfs xattrs\x00" + bytes([BLOB_VERSION])
# The largest blob value a writer makes (the largest set sealed, in base64): anything longer
# in the bucket is refused before it is decoded.
BLOB_MAX_CHARS = 4 * -(-(1 + NONCE_LEN + SET_MAX + TAG_LEN) // 3)

Xattrs = dict[bytes, bytes]


def valid_name(name: bytes) -> bool:
    """A name that may be stored: ``user.`` and at least one byte more, at most NAME_MAX
    bytes, no NUL, not one of the mount's reserved names."""
    return (
        name.startswith(PREFIX)
        and len(PREFIX) < len(name) <= NAME_MAX
        and b"\x00" not in name
        and not name.startswith(RESERVED)
    )


def entry_size(name: bytes, value: bytes) -> int:
    return 3 + len(name) + len(value)


def encoded_size(xattrs: Mapping[bytes, bytes]) -> int:
    return sum(entry_size(n, v) for n, v in xattrs.items())


def encode_set(xattrs: Mapping[bytes, bytes]) -> bytes:
    """The canonical encoding of *xattrs* (empty for none). The caller checked the names and
    the sizes (a value over 65535 bytes cannot be encoded at all)."""
    out = bytearray()
    for name in sorted(xattrs):
        value = xattrs[name]
        if not valid_name(name) or len(value) > 0xFFFF:
            raise ValueError(f"extended attribute {name!r} cannot be stored")
        out += bytes([len(name)]) + name + len(value).to_bytes(2, "big") + value
    return bytes(out)


def decode_set(raw: bytes, limit: int = SET_MAX) -> Xattrs:
    """The attributes of an encoded set; FormatError for anything but a canonical set of
    valid names within *limit* bytes."""
    if len(raw) > limit:
        raise FormatError(f"extended attributes: {len(raw)} bytes, more than the {limit} allowed")
    out: Xattrs = {}
    pos = 0
    last = b""
    while pos < len(raw):
        name_len = raw[pos]
        name = raw[pos + 1 : pos + 1 + name_len]
        pos += 1 + name_len
        if len(name) != name_len or pos + 2 > len(raw):
            raise FormatError("extended attributes: truncated")
        value_len = int.from_bytes(raw[pos : pos + 2], "big")
        value = raw[pos + 2 : pos + 2 + value_len]
        pos += 2 + value_len
        if len(value) != value_len:
            raise FormatError("extended attributes: truncated")
        if not valid_name(name):
            raise FormatError(f"extended attributes: invalid name {name[:64]!r}")
        if out and name <= last:
            raise FormatError("extended attributes: names not in strictly ascending order")
        out[name] = value
        last = name
    return out


def _key(dek: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(dek)


def seal(dek: bytes, xattrs: Mapping[bytes, bytes], nonce: bytes | None = None) -> str:
    """The metadata value holding *xattrs* sealed under the object's data key *dek* (*nonce*:
    for test vectors only; a fresh random one otherwise)."""
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    sealed = AESGCM(_key(dek)).encrypt(nonce, encode_set(xattrs), _AAD)
    return base64.b64encode(bytes([BLOB_VERSION]) + nonce + sealed).decode("ascii")


def open_blob(dek: bytes, value: str) -> Xattrs:
    """The attributes in a metadata value made by seal(); IntegrityError (FormatError for a
    malformed one) when it does not open under *dek*."""
    if len(value) > BLOB_MAX_CHARS:
        raise FormatError(
            f"extended attributes: {len(value)} characters, more than the "
            f"{BLOB_MAX_CHARS} a writer makes"
        )
    try:
        blob = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("extended attributes: not valid base64") from None
    if len(blob) < 1 + NONCE_LEN + TAG_LEN:
        raise FormatError("extended attributes: too short")
    if blob[0] != BLOB_VERSION:
        raise FormatError(f"extended attributes: version {blob[0]} is not supported")
    nonce, sealed = blob[1 : 1 + NONCE_LEN], blob[1 + NONCE_LEN :]
    try:
        raw = AESGCM(_key(dek)).decrypt(nonce, sealed, _AAD)
    except InvalidTag:
        raise IntegrityError("extended attributes failed authentication") from None
    return decode_set(raw)


def metadata_size(meta: Mapping[str, str]) -> int:
    """Bytes of S3 user metadata as AWS counts them: names and values, in UTF-8."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
