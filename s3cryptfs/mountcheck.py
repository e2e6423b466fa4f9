"""The kernel's view of mounts: FUSE options we refuse, and the proof `umount` needs before it
signals the process behind a mount point.

`umount` learns the mount process's pid from the mount itself (the ``user.s3cryptfs.pid``
attribute), and anyone can mount a FUSE file system that answers it: a local user's fake mount
could name any process, and root's `umount` would signal it. So the pid is signalled only when
the kernel says the mount is an s3cryptfs one (``fuse.s3cryptfs`` in /proc/self/mountinfo),
the process runs as the user the mount belongs to (its ``user_id=``), its command line is an
s3cryptfs mount of that mount point, and the caller is root or that user.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

from s3cryptfs.errors import ConfigError

FSTYPE = "fuse.s3cryptfs"
# A setuid file or a device node from the bucket would take effect: anyone who can write to
# the bucket could plant one. libfuse mounts nosuid,nodev unless these are asked for.
REFUSED_OPTIONS = ("suid", "dev")


def check_fuse_options(options: list[str]) -> None:
    """Refuse mount options that would give files from the bucket privileges."""
    for option in options:
        name = option.partition("=")[0].strip()
        if name in REFUSED_OPTIONS:
            raise ConfigError(
                f"mount option {name} is refused: anyone who can write to the bucket could "
                "plant setuid programs or device nodes (s3cryptfs mounts are nosuid,nodev)"
            )


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    super_options: dict[str, str]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(path: str, mountinfo: str = "/proc/self/mountinfo") -> MountEntry | None:
    """The mount at *path* (the one on top, if several are stacked there), or None."""
    real = _resolve(path)
    found = None
    with open(mountinfo) as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if not sep or len(fields) < 5 or len(tail) < 3:
                continue
            if _unescape(fields[4]) == real:
                options = dict(o.partition("=")[::2] for o in tail[2].split(","))
                found = MountEntry(real, tail[0], options)
    return found


def _uids(pid: int) -> list[int]:
    """Real, effective and saved uid of *pid* (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return [int(u) for u in line.split()[1:4]]
    except (OSError, ValueError):
        pass
    return []


def _mounts_at(pid: int, mountpoint: str) -> bool:
    """True if *pid*'s command line is an s3cryptfs mount of *mountpoint*: the mount point is
    one of its arguments (relative ones from its working directory) or the ``mountpoint`` of
    the ``--config`` file it names."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    names = [os.path.basename(a) for a in argv]
    pairs = list(zip(argv, argv[1:], strict=False))
    helper = "mount.s3cryptfs" in names or ("-m", "s3cryptfs.mounthelper") in pairs
    cli = "mount" in argv and ("s3cryptfs" in names or ("-m", "s3cryptfs") in pairs)
    if not (helper or cli):
        return False
    candidates = [a for a in argv if not a.startswith("-")]
    candidates += [_config_mountpoint(os.path.join(cwd, v)) for f, v in pairs if f == "--config"]
    candidates += [
        _config_mountpoint(os.path.join(cwd, a.partition("=")[2]))
        for a in argv
        if a.startswith("--config=")
    ]
    return any(a and _resolve(os.path.join(cwd, a)) == mountpoint for a in candidates)


def _resolve(path: str) -> str:
    """Canonical path without stat()ing its last component (a mount point whose process hangs
    would block us)."""
    path = os.path.normpath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _config_mountpoint(path: str) -> str:
    try:
        with open(path, "rb") as f:
            value = tomllib.load(f).get("mountpoint", "")
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    return value if isinstance(value, str) else ""


def mount_owner(mountpoint: str, caller: int) -> int:
    """The uid the s3cryptfs mount at *mountpoint* belongs to; ConfigError if it is no such
    mount or the *caller* (a uid) is neither root nor that user. Asks only the kernel: nothing
    of the mount itself, which might not answer."""
    entry = find_mount(mountpoint)
    if entry is None:
        raise ConfigError(f"{mountpoint} is not mounted")
    if entry.fstype != FSTYPE:
        raise ConfigError(f"{mountpoint} is not an s3cryptfs mount (its type is {entry.fstype})")
    raw_owner = entry.super_options.get("user_id", "")
    if not raw_owner.isdigit():
        raise ConfigError(f"{mountpoint} is not an s3cryptfs mount (it names no owner)")
    owner = int(raw_owner)
    if caller not in (0, owner):
        raise ConfigError(
            f"{mountpoint} belongs to uid {owner}: only that user or root may unmount it"
        )
    return owner


def check_mount_process(mountpoint: str, pid: int, owner: int) -> None:
    """Refuse (ConfigError) unless *pid* runs as *owner* and is an s3cryptfs mount of
    *mountpoint* (the pid came from the mount: it is not trusted)."""
    uids = _uids(pid)
    if not uids or any(u != owner for u in uids):
        reason = f"it does not run as uid {owner}, the owner of the mount"
    elif not _mounts_at(pid, _resolve(mountpoint)):
        reason = "its command line is not an s3cryptfs mount of it"
    else:
        return
    raise ConfigError(
        f"{mountpoint} names pid {pid} as its mount process, but {reason}: not signalled "
        "(a FUSE file system that only pretends to be s3cryptfs?)"
    )
