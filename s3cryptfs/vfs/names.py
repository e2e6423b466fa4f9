"""Which names the bucket can hold (docs/SEMANTICS.md, "Names").

A name is part of its object's S3 key as it is (names are not encrypted, docs/FORMAT.md 3), so
a new name is refused when no key could hold it:

- over 255 bytes (limits.NAME_MAX), or a key over 1024 bytes (limits.KEY_MAX, S3's limit;
  a directory's marker key ends in "/", one byte more): ENAMETOOLONG;
- bytes that are not UTF-8, which S3 keys are: EILSEQ. The FUSE adapter decodes names with
  surrogateescape (from_kernel), so such a name is a str with lone surrogates, and nothing
  else is;
- a backslash, on servers that store it as "/" (SeaweedFS): the file would come back as a
  directory after a remount. A probe at mount time tells such servers apart: EINVAL there
  (errors.InvalidRequest says why not EILSEQ).

A lookup of a name no object can have (not UTF-8, or a key over 1024 bytes) asks S3 nothing.
A name that is not there says ENAMETOOLONG when it or its key is too long (as ext4 says for a
name over 255 bytes), else ENOENT; a name over 255 bytes that an object does have (another
tool wrote it, where the server allows it) is found.
"""

from __future__ import annotations

import contextlib
import logging

from s3cryptfs import limits
from s3cryptfs.errors import (
    FsError,
    InvalidRequest,
    NameNotUTF8,
    NameTooLong,
    NoSuchEntry,
    S3CryptFSError,
)
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.store.base import ObjectStore

log = logging.getLogger(__name__)

# Seconds the probe may spend retrying a transient error: it must not hold the mount up.
PROBE_DEADLINE = 2.0


def from_kernel(raw: bytes) -> str:
    """A name as the kernel passes it. Decoded as UTF-8 whatever the locale: keys are UTF-8."""
    return raw.decode("utf-8", "surrogateescape")


def to_kernel(name: str) -> bytes:
    """The bytes of *name* (the kernel's, for a name that came from from_kernel)."""
    return name.encode("utf-8", "surrogateescape")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_long(name: str, key: str, is_dir: bool = False) -> NameTooLong | None:
    if len(to_kernel(name)) > limits.NAME_MAX:
        return NameTooLong(f"the name is longer than {limits.NAME_MAX} bytes")
    size = len(to_kernel(key)) + (1 if is_dir else 0)
    if size > limits.KEY_MAX:
        marker = " (with the trailing / of a directory marker)" if is_dir else ""
        return NameTooLong(f"its S3 key{marker} would be {size} bytes (at most {limits.KEY_MAX})")
    return None


def check_new(name: str, key: str, *, is_dir: bool, backslash: bool) -> None:
    """Refuse a name about to be created (or renamed to) whose S3 key would be *key*.
    *backslash*: this server keeps a backslash in keys (probe_backslash)."""
    too_long = _too_long(name, key, is_dir)
    if too_long is not None:
        raise too_long
    if not is_utf8(name):
        raise NameNotUTF8("the name is not UTF-8, which S3 keys are")
    if "\\" in name and not backslash:
        raise InvalidRequest("this S3 server does not keep a backslash in keys")


def can_exist(name: str, key: str) -> bool:
    """False when no object can have this name (so a lookup need not ask S3)."""
    return is_utf8(name) and len(to_kernel(key)) <= limits.KEY_MAX


def needs_listing(name: str, backslash: bool) -> bool:
    """True when only a listing tells whether *name* exists: where a backslash may become "/",
    a HEAD of "a\\b" finds the object "a/b"."""
    return "\\" in name and not backslash


def missing(name: str, key: str) -> FsError:
    """The error for a name that is not there: ENAMETOOLONG for a name or key too long."""
    return _too_long(name, key) or NoSuchEntry()


# --- does the server keep a backslash? ---------------------------------------------------


def probe_key(prefix: str, token: str) -> str:
    """The probe object: under the volume's reserved folder, named after the mount."""
    return f"{prefix}{META_DIR}/probe-{token}\\backslash"


def keeps_backslash(store: ObjectStore, prefix: str, token: str) -> bool | None:
    """Whether the server stores a key with a backslash as it is: True; False when it stores
    something else (SeaweedFS stores "/"); None when the probe itself failed.

    A PUT of an empty object (If-None-Match, as new files are), a LIST of what it became, and
    the DELETE of it (and of the folder a "/" may have made): 3 to 5 requests, each with
    PROBE_DEADLINE seconds of retries. *token* (the mount's id) keeps mounts apart."""
    quick = store.with_retry_deadline(PROBE_DEADLINE)
    key = probe_key(prefix, token)
    head = key.split("\\", 1)[0]
    try:
        quick.put(key, b"", {}, if_none_match=True)
    except S3CryptFSError as exc:
        log.debug("backslash probe: the PUT of %s failed: %s", key, exc)
        return None
    listed: list[str] = []
    try:
        listed = [o.key for page in quick.list_all(head, None) for o in page.objects]
    except S3CryptFSError as exc:
        log.debug("backslash probe: the LIST of %s failed: %s", head, exc)
        return None
    finally:
        _clean_up(quick, key, head, listed)
    return listed == [key]


def _clean_up(store: ObjectStore, key: str, head: str, listed: list[str]) -> None:
    doomed = {key, *listed}
    for other in listed:
        # folders a rewrite made on servers that keep them (SeaweedFS): deepest first
        for at in range(len(head), len(other)):
            if other[at] == "/":
                doomed.add(other[: at + 1])
    for doomed_key in sorted(doomed, key=len, reverse=True):
        with contextlib.suppress(S3CryptFSError):
            store.delete(doomed_key)


def backslash_allowed(store: ObjectStore, prefix: str, token: str) -> bool:
    """Probe the server (keeps_backslash) and say once, at info level, when names with a
    backslash are refused on this mount."""
    try:
        keeps = keeps_backslash(store, prefix, token)
    except Exception as exc:  # noqa: BLE001 - the probe never stops a mount: refuse, say why
        log.info("backslash probe failed unexpectedly: %s: %s", type(exc).__name__, exc)
        keeps = None
    if keeps is False:
        log.info(
            'names with a backslash are refused on this server (EINVAL): it stores "\\" in '
            'keys as something else ("/" on SeaweedFS), so such a file would come back as '
            "another name or a directory"
        )
    elif keeps is None:
        log.info(
            "names with a backslash are refused (EINVAL): could not tell whether this server "
            'keeps "\\" in keys (its probe failed)'
        )
    return keeps is True
