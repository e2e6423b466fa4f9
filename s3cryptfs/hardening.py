"""Protections of the local machine for long-lived processes: secrets leave the environment
once they are read, and log files are opened without following symbolic links."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

from s3cryptfs import config
from s3cryptfs.errors import ConfigError


def secret_variables(names: Iterable[str]) -> list[str]:
    """Those of the environment variable *names* that hold a password or a key manager
    secret."""
    from s3cryptfs.keys.config import GENERIC_PREFIX, SECRET_ENV

    fixed = {config.PASSWORD_ENV, config.SEED_PASSWORD_ENV, *SECRET_ENV}
    return [name for name in names if name in fixed or name.startswith(GENERIC_PREFIX)]


def scrub_secret_environment() -> list[str]:
    """Remove the secret variables from this process's environment, once they are read: a
    mount runs for months, and its environment is readable in /proc by the same user (and by
    anything running as that user), by root, and is inherited by every child. Returns the
    names removed (never their values)."""
    names = secret_variables(os.environ)
    for name in names:
        del os.environ[name]  # unsetenv: the C library's view, and children's
    if names:
        _wipe_initial_environment({n.encode() for n in names})
    return names


def _wipe_initial_environment(names: set[bytes]) -> None:
    """/proc/PID/environ shows the environment block the process started with, on its stack;
    unsetenv only drops pointers to it. Overwrite the entries of *names* there, in place."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51)
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except (OSError, IndexError, ValueError):
        return  # not Linux, or no /proc: nothing shows the block anyway
    if not start or len(block) > end - start:
        return
    offset = 0
    for entry in block.split(b"\0"):
        if entry.partition(b"=")[0] in names:
            ctypes.memset(start + offset, 0, len(entry))
        offset += len(entry) + 1


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
