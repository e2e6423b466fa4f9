"""The one error hierarchy of s3cryptfs, and the one table that maps it to errno.

Every layer raises these (or lets a foreign exception escape to the FUSE adapter, which
maps anything unknown to EIO and logs it). Nothing else in the code base chooses an errno.
Pure: imports nothing from FUSE, trio or boto3.
"""

from __future__ import annotations

import errno


class S3CryptFSError(Exception):
    """Base of every error this project raises on purpose."""


# --- user input and volume -------------------------------------------------------------


class ConfigError(S3CryptFSError):
    """Bad command line, configuration file or password source."""


class VolumeError(S3CryptFSError):
    """The volume descriptor is missing, unreadable, or of a version we do not know."""


class WrongPasswordError(VolumeError):
    """The password does not open this volume."""


# --- object store ------------------------------------------------------------------------


class StoreError(S3CryptFSError):
    """Any failure talking to S3 that is not one of the more specific kinds below."""


class ObjectNotFound(StoreError):
    """The object (or the bucket) does not exist: the one case that becomes ENOENT."""


class BucketNotFound(StoreError):
    """The bucket does not exist."""


class AccessDenied(StoreError):
    """S3 refused the credentials or the request (403)."""


class PreconditionFailed(StoreError):
    """A conditional write or copy lost: someone else changed the object."""


class TransientStoreError(StoreError):
    """5xx, throttling, timeouts, connection errors: retried, then raised when time runs out."""


class EndpointUnreachable(TransientStoreError):
    """Could not connect to the endpoint at all."""


# --- crypto and keys -----------------------------------------------------------------------


class IntegrityError(S3CryptFSError):
    """An object failed authentication: tampered, truncated, or spliced."""


class FormatError(IntegrityError):
    """An object's metadata or header is malformed or of an unknown version."""


class DescriptorAuthError(IntegrityError):
    """The volume descriptor does not authenticate, was rolled back, or is not the one this
    machine trusts: someone without the volume's keys changed it."""


class ObjectTooLarge(IntegrityError):
    """An object read whole is larger than anything we write of its kind (s3cryptfs.limits):
    planted to exhaust memory, so refused before its body is downloaded."""


class KeyManagerError(S3CryptFSError):
    """A key manager failed."""


class KeyNotFound(KeyManagerError):
    """The envelope names a key or key version the manager does not have."""


class UnwrapFailed(KeyManagerError):
    """The wrapped key does not authenticate under the named key."""


class InvalidEnvelope(KeyManagerError):
    """The envelope is malformed (missing fields, bad encoding)."""


class ProviderUnavailable(KeyManagerError):
    """The key manager's server cannot be reached."""


class UnknownProvider(KeyManagerError):
    """No key manager plugin is registered under the envelope's provider name."""


class KeyAccessDenied(KeyManagerError):
    """The key manager refused the operation (permissions, policy, revoked credentials)."""


class KeyRetired(KeyManagerError):
    """The key version exists but is retired: it no longer unwraps (or wraps) anything."""


# --- filesystem semantics ------------------------------------------------------------------


class FsError(S3CryptFSError):
    """A POSIX-level refusal with an explicit errno (ENOTEMPTY, EEXIST, ...)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


class UploadConflict(S3CryptFSError):
    """Our upload lost a race against another writer; our data was kept elsewhere."""


# The table. Order matters: the first class in the MRO that is listed wins.
ERRNO_TABLE: dict[type[BaseException], int] = {
    ObjectNotFound: errno.ENOENT,
    BucketNotFound: errno.EIO,
    AccessDenied: errno.EACCES,
    PreconditionFailed: errno.EIO,
    TransientStoreError: errno.EIO,
    StoreError: errno.EIO,
    IntegrityError: errno.EIO,
    KeyManagerError: errno.EIO,
    UploadConflict: errno.EIO,
    VolumeError: errno.EIO,
    ConfigError: errno.EINVAL,
    S3CryptFSError: errno.EIO,
    OSError: errno.EIO,
}


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE request should fail with for *exc*."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    for cls in type(exc).__mro__:
        if cls in ERRNO_TABLE:
            return ERRNO_TABLE[cls]
    return errno.EIO


def strip_subject(exc: BaseException, subject: str) -> str:
    """The message of *exc* without a leading ``"{subject}: "``. Errors about one object carry
    its key in front; a caller that names the object itself says it once, not twice."""
    text = str(exc)
    prefix = f"{subject}: "
    return text[len(prefix) :] if subject and text.startswith(prefix) else text


def is_expected(exc: BaseException) -> bool:
    """True for errors that are part of normal operation and need no traceback in logs."""
    return isinstance(exc, FsError | ObjectNotFound)
