"""The one error hierarchy of s3cryptfs, and the one table that maps it to errno.

Every layer raises these (or lets a foreign exception escape to the FUSE adapter, which
maps anything unknown to EIO and logs it). Nothing else in the code base chooses an errno: a
refusal with its own errno is a named FsError kind, and ERRNO_TABLE gives each kind its errno.
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
    """A POSIX-level refusal of a request. Raise one of the named kinds below, never FsError
    itself: each kind's errno is in ERRNO_TABLE. The message defaults to the errno's name."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(to_errno(self), "EIO"))


class NoSuchEntry(FsError):
    """The name or inode is not (or no longer) there."""


class AlreadyExists(FsError):
    """The name is taken."""


class DirectoryNotEmpty(FsError):
    """Removing or replacing a directory that still has entries."""


class IsDirectory(FsError):
    """A file operation on a directory."""


class NotDirectory(FsError):
    """A directory operation on something else."""


class NameTooLong(FsError):
    """A name over 255 bytes, or an S3 key over 1024 (a new one, one looked up that cannot
    exist, or one a directory rename would give a descendant)."""


class NameNotUTF8(FsError):
    """A new name whose bytes are not UTF-8: S3 keys are UTF-8, so it cannot be stored as it
    is. EILSEQ ("illegal byte sequence"), as ZFS with utf8only=on says. (Looking such a name
    up says ENOENT: no object can have it.)"""


class ReadOnlyMount(FsError):
    """A change to a --read-only mount."""


class NotPermitted(FsError):
    """Something this file system never does (hard links, device nodes, the metadata name)."""


class NotAllowed(FsError):
    """The caller may not do this (the mount's control attributes are for its owner)."""


class BadHandle(FsError):
    """The file handle does not allow the operation."""


class InvalidRequest(FsError):
    """The request makes no sense here (a flag we do not support, a bad value). Also a new
    name with a character this server would change in the key: a backslash, on servers that
    store it as "/" (SeaweedFS), where the file would come back as a directory. EINVAL is what
    vfat and exfat say for a character they cannot store; EILSEQ would blame the encoding of a
    name that is valid UTF-8."""


class NotSupported(FsError):
    """An operation this file system does not implement."""


class NoAttribute(FsError):
    """No extended attribute of that name."""


class AttributeNameTooLong(FsError):
    """An extended attribute name over 255 bytes (Linux's XATTR_NAME_MAX)."""


class AttributeTooLarge(FsError):
    """An extended attribute value over 64 KiB (Linux's XATTR_SIZE_MAX)."""


class AttributesFull(FsError):
    """The extended attributes of a file or directory would exceed the room it has for them
    (as ext4 says when they outgrow the inode's block)."""


class FileTooLarge(FsError):
    """A size past the largest file one S3 object holds once sealed (5 TiB with the format's
    header and tags)."""


class Busy(FsError):
    """Not done in time: a drain that did not empty the upload queue."""


class StaleEntry(FsError):
    """open() found the file deleted by another machine since the kernel looked the name up.
    ESTALE makes the kernel look the name up again and retry, as it does for NFS: open with
    O_CREAT then creates the file (instead of failing with ENOENT), without it says ENOENT."""


class UploadConflict(S3CryptFSError):
    """Our upload lost a race against another writer; our data was kept elsewhere."""


# The table: every class of the hierarchy is listed (tests/test_errors.py checks it), so a new
# kind gets its errno chosen here, on purpose. Foreign exceptions map by their first listed
# base class.
ERRNO_TABLE: dict[type[BaseException], int] = {
    S3CryptFSError: errno.EIO,
    ConfigError: errno.EINVAL,  # e.g. a password needed for old objects, met while serving
    VolumeError: errno.EIO,
    WrongPasswordError: errno.EIO,
    StoreError: errno.EIO,
    ObjectNotFound: errno.ENOENT,  # the one store error that means "no such file"
    BucketNotFound: errno.EIO,  # not ENOENT: the file may well exist
    AccessDenied: errno.EACCES,
    PreconditionFailed: errno.EIO,
    TransientStoreError: errno.EIO,  # never ENOENT: a 5xx says nothing about existence
    EndpointUnreachable: errno.EIO,
    IntegrityError: errno.EIO,
    FormatError: errno.EIO,
    DescriptorAuthError: errno.EIO,
    ObjectTooLarge: errno.EIO,
    KeyManagerError: errno.EIO,  # KMS refusals too: the caller's own access is not in question
    KeyNotFound: errno.EIO,
    UnwrapFailed: errno.EIO,
    InvalidEnvelope: errno.EIO,
    ProviderUnavailable: errno.EIO,
    UnknownProvider: errno.EIO,
    KeyAccessDenied: errno.EIO,
    KeyRetired: errno.EIO,
    FsError: errno.EIO,  # raised only through a named kind
    NoSuchEntry: errno.ENOENT,
    StaleEntry: errno.ESTALE,
    AlreadyExists: errno.EEXIST,
    DirectoryNotEmpty: errno.ENOTEMPTY,
    IsDirectory: errno.EISDIR,
    NotDirectory: errno.ENOTDIR,
    NameTooLong: errno.ENAMETOOLONG,
    NameNotUTF8: errno.EILSEQ,
    ReadOnlyMount: errno.EROFS,
    NotPermitted: errno.EPERM,
    NotAllowed: errno.EACCES,
    BadHandle: errno.EBADF,
    InvalidRequest: errno.EINVAL,
    NotSupported: errno.ENOTSUP,  # the same number as EOPNOTSUPP on Linux
    NoAttribute: errno.ENODATA,  # what pyfuse3 calls ENOATTR
    AttributeNameTooLong: errno.ERANGE,  # as the kernel and ext4 say
    AttributeTooLarge: errno.E2BIG,
    AttributesFull: errno.ENOSPC,
    FileTooLarge: errno.EFBIG,
    Busy: errno.EBUSY,
    UploadConflict: errno.EIO,
    # Our own local files (write-back files, the journal, the block cache): their errno is
    # about those files, not the user's (ENOENT of a journal body is not "no such file").
    OSError: errno.EIO,
}

# ...except running out of room, which is as true of the user's write as of our file.
OS_ERRNOS_PASSED: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT})


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE request should fail with for *exc*."""
    if isinstance(exc, OSError) and exc.errno in OS_ERRNOS_PASSED:
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
