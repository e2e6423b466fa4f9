"""Files closed but not yet sealed into the journal: what makes them survive a crash.

A file is sealed into the journal when it is closed. When that cannot happen (its key manager
does not answer, the volume moved to a key manager this machine has no configuration for, the
journal's disk is full), close() still succeeds: the write-back file already holds the content.
This module makes that promise durable: the write-back file is fsync'ed and a small marker
beside it (``<seq>.closed``) records which file it is. The mount retries the seal until it
works; after a crash the next mount finds the marker and takes the file back, where a
write-back file without a marker belonged to a file that was still open, and is discarded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import asdict, dataclass

from s3cryptfs.format.xattrs import encode_set

SUFFIX = ".closed"
PLAIN_SUFFIX = ".plain"
# The file's path in the volume, on its write-back file (kept current across renames), so that
# the warning about a file still open at a crash can name it. Never its content; the cache
# directory holds the plaintext itself anyway.
PATH_XATTR = "user.s3cryptfs.path"


@dataclass
class ClosedRecord:
    path: str  # in the volume ('' is the root)
    base: list[str]  # the version it replaces: ["etag", E], ["absent", ""] or ["unknown", ""]
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    # Its extended attributes, encoded (format/xattrs.py) in base64, in clear like the
    # content beside it; None: those of the version it replaces (or a marker of an older
    # mount, which had none).
    xattrs: str | None = None


def xattrs_field(xattrs: dict[bytes, bytes] | None) -> str | None:
    """ClosedRecord.xattrs for a file's attributes (None: not known, its base version's)."""
    if xattrs is None:
        return None
    return base64.b64encode(encode_set(xattrs)).decode("ascii")


def marker_path(staging_path: str) -> str:
    stem = staging_path.removesuffix(PLAIN_SUFFIX)
    return stem + SUFFIX


def write(staging_fd: int, staging_path: str, record: ClosedRecord) -> None:
    """Make the closed content and its marker durable (blocking)."""
    os.fsync(staging_fd)
    final = marker_path(staging_path)
    tmp = final + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        doc = asdict(record)
        if doc["xattrs"] is None:
            del doc["xattrs"]  # (what older versions wrote, and read)
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def tag(staging_fd: int, path: str) -> None:
    with contextlib.suppress(OSError):  # a cache file system without user attributes
        os.setxattr(staging_fd, PATH_XATTR, path.encode())


def tagged_path(staging_path: str) -> str | None:
    try:
        return os.getxattr(staging_path, PATH_XATTR).decode(errors="replace")
    except OSError:
        return None


def remove(staging_path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker_path(staging_path))


def scan(staging_dir: str) -> tuple[list[tuple[str, ClosedRecord]], list[str]]:
    """(closed write-back files with their records, write-back files of files never closed).
    Unreadable markers count as never closed: the content cannot be placed anywhere."""
    closed: list[tuple[str, ClosedRecord]] = []
    open_files: list[str] = []
    for name in sorted(os.listdir(staging_dir)):
        path = os.path.join(staging_dir, name)
        if name.endswith(SUFFIX + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        if not name.endswith(PLAIN_SUFFIX):
            continue
        try:
            with open(marker_path(path)) as f:
                doc = json.load(f)
            record = ClosedRecord(**doc)
        except FileNotFoundError:
            open_files.append(path)
            continue
        except (OSError, ValueError, TypeError):
            open_files.append(path)
            continue
        closed.append((path, record))
    known = {marker_path(p) for p, _ in closed}
    for name in os.listdir(staging_dir):
        path = os.path.join(staging_dir, name)
        if name.endswith(SUFFIX) and path not in known:
            plain = path[: -len(SUFFIX)] + PLAIN_SUFFIX
            if not os.path.exists(plain):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # its content was sealed, then the crash came
    return closed, open_files
