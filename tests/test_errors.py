"""The one errno table: every error class of s3cryptfs.errors is in it, and so maps to the errno
chosen for it there. Pure."""

from __future__ import annotations

import errno
import inspect

import pytest

from s3cryptfs import errors
from s3cryptfs.errors import (
    ERRNO_TABLE,
    AccessDenied,
    ConfigError,
    EndpointUnreachable,
    FormatError,
    FsError,
    IntegrityError,
    NoSuchEntry,
    ObjectNotFound,
    S3CryptFSError,
    StaleEntry,
    StoreError,
    TransientStoreError,
    VolumeError,
    WrongPasswordError,
    is_expected,
    to_errno,
)


def _error_classes() -> list[type[S3CryptFSError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, S3CryptFSError) and cls.__module__ == errors.__name__
    ]


def _instance(cls: type[S3CryptFSError]) -> S3CryptFSError:
    return cls("test")


def _unmapped(classes: list[type[S3CryptFSError]]) -> list[str]:
    """Classes whose errno the table does not choose explicitly."""
    return [cls.__name__ for cls in classes if cls not in ERRNO_TABLE]


ALL = _error_classes()


def test_introspection_finds_the_hierarchy():
    names = {cls.__name__ for cls in ALL}
    assert {"S3CryptFSError", "ObjectNotFound", "TransientStoreError", "FsError"} <= names
    assert len(ALL) >= 15


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_has_an_errno(cls):
    # Listed itself, not found through a base class: a new kind gets its errno on purpose.
    assert not _unmapped([cls]), f"{cls.__name__} is not in ERRNO_TABLE"
    code = to_errno(_instance(cls))
    assert code == ERRNO_TABLE[cls] and code in errno.errorcode, f"{cls.__name__} -> {code}"


def test_a_new_error_class_must_be_listed():
    class NewKind(StoreError):
        pass

    assert _unmapped([NewKind]) == ["NewKind"]
    assert to_errno(NewKind("x")) == errno.EIO  # what it would get without being listed


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_only_not_found_is_enoent(cls):
    code = to_errno(_instance(cls))
    missing = issubclass(cls, ObjectNotFound | NoSuchEntry)
    assert (code == errno.ENOENT) == missing, cls.__name__


def test_specific_mappings():
    assert to_errno(StaleEntry("gone since the lookup")) == errno.ESTALE  # the kernel retries
    assert to_errno(ObjectNotFound("k")) == errno.ENOENT
    assert to_errno(TransientStoreError("503")) == errno.EIO
    assert to_errno(EndpointUnreachable("refused")) == errno.EIO
    assert to_errno(StoreError("x")) == errno.EIO
    assert to_errno(AccessDenied("403")) == errno.EACCES
    assert to_errno(ConfigError("bad flag")) == errno.EINVAL
    assert to_errno(IntegrityError("tag")) == errno.EIO
    assert to_errno(FormatError("version 2")) == errno.EIO
    assert to_errno(WrongPasswordError("pw")) == errno.EIO


def test_transient_errors_never_look_like_missing_objects():
    """A 5xx or a timeout on HEAD must never become 'no such file'."""
    assert not issubclass(TransientStoreError, ObjectNotFound)
    assert not issubclass(ObjectNotFound, TransientStoreError)
    for cls in ALL:
        if issubclass(cls, TransientStoreError):
            assert to_errno(_instance(cls)) == errno.EIO


@pytest.mark.parametrize(
    "cls", [c for c in ALL if issubclass(c, FsError) and c is not FsError], ids=lambda c: c.__name__
)
def test_fs_error_kinds(cls):
    exc = cls()
    code = to_errno(exc)
    assert code != errno.EIO  # a refusal with an errno of its own
    assert str(exc) == errno.errorcode[code]  # the default message: the errno's name
    assert str(cls("custom text")) == "custom text"
    assert isinstance(exc, S3CryptFSError)
    assert is_expected(exc)


def test_only_one_kind_per_errno():
    kinds = [c for c in ALL if issubclass(c, FsError) and c is not FsError]
    codes = [ERRNO_TABLE[c] for c in kinds]
    assert len(codes) == len(set(codes))


def test_our_local_files_errors_are_eio():
    """An OSError in a mount comes from its own write-back files, journal or cache: its errno
    describes those files, not the user's (a journal body's ENOENT is not 'no such file')."""
    assert to_errno(FileNotFoundError(errno.ENOENT, "gone")) == errno.EIO
    assert to_errno(OSError(errno.EBADF, "bad fd")) == errno.EIO
    assert to_errno(IsADirectoryError(errno.EISDIR, "dir")) == errno.EIO
    # running out of room is true of the user's write as well
    assert to_errno(OSError(errno.ENOSPC, "disk full")) == errno.ENOSPC
    assert to_errno(OSError(errno.EDQUOT, "quota")) == errno.EDQUOT


def test_foreign_exceptions():
    assert to_errno(OSError("no errno")) == errno.EIO
    assert to_errno(ValueError("bug")) == errno.EIO
    assert to_errno(KeyError("bug")) == errno.EIO


def test_hierarchy():
    assert issubclass(FormatError, IntegrityError)
    assert issubclass(WrongPasswordError, VolumeError)
    assert issubclass(EndpointUnreachable, TransientStoreError)
    assert issubclass(TransientStoreError, StoreError)
    for cls in ALL:
        assert issubclass(cls, S3CryptFSError)


def test_is_expected():
    assert is_expected(ObjectNotFound("k"))
    assert is_expected(NoSuchEntry())
    assert not is_expected(TransientStoreError("503"))
    assert not is_expected(IntegrityError("tag"))
    assert not is_expected(ValueError("bug"))


def test_strip_subject_names_an_object_once():
    from s3cryptfs.errors import KeyNotFound, strip_subject

    named = KeyNotFound("v/u1.txt: key version 9 is not in this volume")
    assert strip_subject(named, "v/u1.txt") == "key version 9 is not in this volume"
    assert strip_subject(named, "v/u2.txt") == str(named)  # another object's name stays
    assert strip_subject(KeyNotFound("key version 9"), "v/u1.txt") == "key version 9"
    assert strip_subject(named, "") == str(named)
