"""Protections of the local machine for long-lived processes: log files are opened without
following symbolic links."""

from __future__ import annotations

import os

from s3cryptfs.errors import ConfigError


def open_append_private(path: str, what: str) -> int:
    """A file descriptor appending to *path* (a log), created 0600, made 0600 if it exists; a
    symbolic link there is refused: a log path in a shared directory could otherwise be
    pointed at any file, which would then be written to (and chmod-ed) with our rights."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(
                f"the {what} {path} is a symbolic link: refused (give the path of the file itself)"
            ) from None
        raise ConfigError(f"cannot open the {what} {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        pass  # not ours to change (a file of another user we may append to): keep its mode
    return fd
