"""From an error to what the user sees: one line on stderr and an exit code (s3cryptfs/exitcodes.py,
docs/CLI.md)."""

from __future__ import annotations

import logging
import os
import select
import sys
from typing import TextIO

from s3cryptfs.errors import (
    AccessDenied,
    ConfigError,
    IntegrityError,
    KeyManagerError,
    PreconditionFailed,
    StoreError,
    TransientStoreError,
    UnknownProvider,
    UploadConflict,
    VolumeError,
    WrongPasswordError,
)
from s3cryptfs.exitcodes import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_KEYS,
    EXIT_S3,
    EXIT_USAGE,
    EXIT_VOLUME,
    EXIT_WRONG_PASSWORD,
)

log = logging.getLogger("s3cryptfs")


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, WrongPasswordError):
        return EXIT_WRONG_PASSWORD
    if isinstance(exc, PreconditionFailed):
        return EXIT_CONFLICT  # a conditional write lost a race: not a fault of S3
    if isinstance(exc, StoreError | AccessDenied | TransientStoreError):
        return EXIT_S3
    if isinstance(exc, VolumeError):
        return EXIT_VOLUME
    if isinstance(exc, ConfigError | UnknownProvider):
        return EXIT_USAGE
    if isinstance(exc, KeyManagerError):
        return EXIT_KEYS
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, UploadConflict):
        return EXIT_CONFLICT
    return EXIT_ERROR



def _reader_gone(stream: TextIO) -> bool:
    """True when *stream* is a pipe (or socket) whose reading end was closed."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported: a pipe without readers raises it
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _closed_pipe(exc: Exception) -> bool:
    """`s3cryptfs status MNT | head -3`: the reader has what it wanted. Leave quietly, as tools
    killed by SIGPIPE do, with nothing left to flush into the closed pipe at exit."""
    if not isinstance(exc, BrokenPipeError):
        return False
    gone = [s for s in (sys.stdout, sys.stderr) if _reader_gone(s)]
    if not gone:
        return False  # some other pipe (a helper process?): a real error
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in gone:
        os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return True


def last_resort(exc: Exception) -> int:
    """An error no command turned into a message of its own. A local file named by the user
    (a path that is missing, a directory, not writable...) is a usage error; anything else is
    a bug, whose traceback goes to the debug log rather than at the user."""
    if _closed_pipe(exc):
        return EXIT_BROKEN_PIPE
    log.debug("traceback of the error below", exc_info=exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        print(f"s3cryptfs: cannot use {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"s3cryptfs: unexpected error ({type(exc).__name__}): {exc}; "
        "--log-level debug shows the traceback",
        file=sys.stderr,
    )
    return EXIT_ERROR
