"""Object user metadata: the key envelope, the format marker and POSIX attributes.

Names are S3 user-metadata names (boto3 ``Metadata``), i.e. without ``x-amz-meta-``; S3 sends
them as ``x-amz-meta-<name>``. The envelope names are the Go gateway's, so both tools agree.
"""

from __future__ import annotations

import base64
import binascii
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from s3cryptfs.errors import FormatError
from s3cryptfs.format.envelope import KeyEnvelope

FORMAT = "s3cryptfs-format"
WRAPPED_KEY = "encryption-wrapped-key"
KMS_ID = "encryption-kms-id"
KMS_PROVIDER = "encryption-kms-provider"
KEY_VERSION = "encryption-key-version"
MODE = "s3cryptfs-mode"
UID = "s3cryptfs-uid"
GID = "s3cryptfs-gid"
MTIME = "s3cryptfs-mtime-ns"
ATIME = "s3cryptfs-atime-ns"  # only when set explicitly (docs/FORMAT.md)
RDEV = "s3cryptfs-rdev"  # device nodes: the device number (docs/FORMAT.md)

FORMAT_V1 = "1"
ENVELOPE_NAMES = (WRAPPED_KEY, KMS_ID, KMS_PROVIDER, KEY_VERSION)
ATTR_NAMES = (MODE, UID, GID, MTIME)


def encode_envelope(env: KeyEnvelope) -> dict[str, str]:
    meta = {
        WRAPPED_KEY: base64.b64encode(env.ciphertext).decode("ascii"),
        KMS_PROVIDER: env.provider,
        KEY_VERSION: str(env.key_version),
    }
    if env.key_id:
        meta[KMS_ID] = env.key_id
    return meta


def decode_envelope(meta: Mapping[str, str]) -> KeyEnvelope:
    wrapped = meta.get(WRAPPED_KEY)
    provider = meta.get(KMS_PROVIDER)
    if not wrapped or not provider:
        raise FormatError("object metadata has no key envelope (wrapped key and provider)")
    try:
        ciphertext = base64.b64decode(wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("object metadata: wrapped key is not valid base64") from None
    raw_version = meta.get(KEY_VERSION, "")
    try:
        version = int(raw_version)
    except ValueError:
        raise FormatError(f"object metadata: key version {raw_version!r} is not a number") from None
    return KeyEnvelope(meta.get(KMS_ID, ""), version, provider, ciphertext)


# Special files: stored as empty objects whose mode says what they are (docs/FORMAT.md).
SPECIAL_TYPES = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
FILE_TYPES = (stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR, *SPECIAL_TYPES)


def is_device(mode: int) -> bool:
    return stat.S_IFMT(mode) in (stat.S_IFCHR, stat.S_IFBLK)


@dataclass(frozen=True)
class PosixAttrs:
    mode: int | None = None  # with file type bits
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    rdev: int | None = None  # character and block devices only
    atime_ns: int | None = None  # set explicitly only

    def encode(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        if self.mode is not None:
            meta[MODE] = f"{self.mode:o}"
        if self.uid is not None:
            meta[UID] = str(self.uid)
        if self.gid is not None:
            meta[GID] = str(self.gid)
        if self.mtime_ns is not None:
            meta[MTIME] = str(self.mtime_ns)
        if self.rdev is not None:
            meta[RDEV] = str(self.rdev)
        if self.atime_ns is not None:
            meta[ATIME] = str(self.atime_ns)
        return meta

    @staticmethod
    def decode(meta: Mapping[str, str]) -> PosixAttrs:
        """Lenient: a malformed attribute is ignored (it is not security relevant)."""

        def num(name: str, base: int = 10) -> int | None:
            try:
                return int(meta[name], base) if name in meta else None
            except ValueError:
                return None

        mode = num(MODE, 8)
        if mode is not None and stat.S_IFMT(mode) not in FILE_TYPES:
            mode = None
        rdev = num(RDEV)
        if rdev is not None and not 0 <= rdev < 1 << 64:
            rdev = None
        return PosixAttrs(mode, num(UID), num(GID), num(MTIME), rdev, num(ATIME))


def object_format(meta: Mapping[str, str]) -> str:
    """Which format an object is in, from its metadata alone: '1' or 'plain'."""
    fmt = meta.get(FORMAT)
    if fmt is None:
        return "plain"
    if fmt != FORMAT_V1:
        raise FormatError(f"object format {fmt!r} is not supported by this version")
    return fmt
