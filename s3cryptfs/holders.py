"""Which processes hold a mount: what makes ``umount(8)`` say "target is busy".

Read from /proc alone, without a stat() through the mount (a FUSE process that hangs would
block it): open files are matched by the id of the mount they lie on (``mnt_id`` in
/proc/PID/fdinfo); working directories, root directories and programs by the same id, read
from an O_PATH descriptor of our own (opening a /proc link that way reaches the inode without
asking its file system anything); mapped files by the device number in /proc/PID/maps.
A path prefix would be wrong both ways: a process may sit in the directory the mount covers
(not on the mount), and names can be renamed or unlinked.

Processes this user may not inspect (another user's, for a caller who is not root) are counted,
not named; the kernel's own refusal to unmount stays the last word.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

# How many holders a message names before "and N more".
NAMED = 3


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str  # its command name (/proc/PID/comm)
    what: str  # "working directory", "open file", "root directory", "program", "mapped file"


@dataclass
class Scan:
    holders: list[Holder] = field(default_factory=list)
    hidden: int = 0  # processes that could not be inspected

    def describe(self) -> str:
        """`pid 1234 (vim), pid 99 (sleep), pid 7 (bash) and 2 more`."""
        named = [f"pid {h.pid} ({h.name})" for h in self.holders[:NAMED]]
        more = len(self.holders) - len(named)
        text = ", ".join(named)
        if more:
            text += f" and {more} more"
        return text


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_at(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> tuple[int, int] | None:
    """(mount id, device number) of the mount on top at *mountpoint*, or None."""
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            if len(fields) >= 5 and _unescape(fields[4]) == mountpoint:
                major, _, minor = fields[2].partition(":")
                found = (int(fields[0]), os.makedev(int(major), int(minor)))
    return found


def _fdinfo_mount_id(path: str) -> int | None:
    with open(path) as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def _link_mount_id(link: str) -> int | None:
    """The mount id of what a /proc/PID/{cwd,root,exe} link points to."""
    fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
    try:
        return _fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def _maps_device(line: str) -> int | None:
    parts = line.split(None, 5)
    if len(parts) < 6 or not parts[5].strip() or parts[4] == "0":
        return None  # anonymous memory
    major, _, minor = parts[3].partition(":")
    return os.makedev(int(major, 16), int(minor, 16))


def _held_by(pid: int, mount_id: int, device: int) -> str | None:
    """How *pid* holds the mount, or None. Raises PermissionError when we may not look."""
    base = f"/proc/{pid}"
    for link, what in (("cwd", "working directory"), ("root", "root directory")):
        if _link_mount_id(f"{base}/{link}") == mount_id:
            return what
    with contextlib.suppress(FileNotFoundError):  # kernel threads have no program
        if _link_mount_id(f"{base}/exe") == mount_id:
            return "program"
    for fd in os.listdir(f"{base}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            if _fdinfo_mount_id(f"{base}/fdinfo/{fd}") == mount_id:
                return "open file"
    with open(f"{base}/maps") as f:
        if any(_maps_device(line) == device for line in f):
            return "mapped file"
    return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def scan(mountpoint: str) -> Scan:
    """The processes (other than this one) that hold the mount at *mountpoint*, by pid."""
    result = Scan()
    # as /proc/self/mountinfo names it, without a stat() of the mount point itself
    parent, name = os.path.split(os.path.normpath(mountpoint))
    at = mount_at(os.path.join(os.path.realpath(parent), name))
    if at is None:
        return result
    mount_id, device = at
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            what = _held_by(pid, mount_id, device)
        except PermissionError:
            result.hidden += 1
            continue
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # gone meanwhile
        except OSError:
            result.hidden += 1
            continue
        if what is not None:
            result.holders.append(Holder(pid, _comm(pid), what))
    result.holders.sort(key=lambda h: h.pid)
    return result
