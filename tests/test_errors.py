"""The one errno table: every error class of s3cryptfs.errors maps to an errno. Pure."""

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
    ObjectNotFound,
    S3CryptFSError,
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
    if issubclass(cls, FsError):
        return cls(errno.ENOTEMPTY, "test")
    return cls("test")


ALL = _error_classes()


def test_introspection_finds_the_hierarchy():
    names = {cls.__name__ for cls in ALL}
    assert {"S3CryptFSError", "ObjectNotFound", "TransientStoreError", "FsError"} <= names
    assert len(ALL) >= 15


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_has_an_errno(cls):
    exc = _instance(cls)
    code = to_errno(exc)
    assert isinstance(code, int) and code > 0
    assert code in errno.errorcode, f"{cls.__name__} -> {code}"
    # chosen by the table (or FsError's own errno), not by the fallback after the loop
    assert issubclass(cls, FsError) or any(base in ERRNO_TABLE for base in cls.__mro__)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_only_not_found_is_enoent(cls):
    code = to_errno(_instance(cls))
    assert (code == errno.ENOENT) == issubclass(cls, ObjectNotFound), cls.__name__


def test_specific_mappings():
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


@pytest.mark.parametrize("code", [errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.EXDEV])
def test_fs_error_carries_its_errno(code):
    exc = FsError(code)
    assert exc.errno == code
    assert to_errno(exc) == code
    assert str(exc) == errno.errorcode[code]
    assert str(FsError(code, "custom text")) == "custom text"
    assert isinstance(exc, S3CryptFSError)


def test_foreign_exceptions():
    assert to_errno(OSError(errno.ENOSPC, "disk full")) == errno.ENOSPC
    assert to_errno(FileNotFoundError(errno.ENOENT, "gone")) == errno.ENOENT
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
    assert is_expected(FsError(errno.ENOTEMPTY))
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
