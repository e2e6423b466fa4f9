"""A FUSE file system that pretends to be s3cryptfs: subtype s3cryptfs, and a
``user.s3cryptfs.pid`` attribute naming whatever process it is told to (the victim of
tests/test_local_hardening.py's umount test).

    python tests/fake_s3cryptfs.py MOUNTPOINT PID
"""

from __future__ import annotations

import stat
import sys

import pyfuse3
import trio


class Pretender(pyfuse3.Operations):
    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(2)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = stat.S_IFDIR | 0o755
        entry.st_nlink = 2
        return entry

    async def getxattr(self, inode: int, name: bytes, ctx: object) -> bytes:
        if name == b"user.s3cryptfs.pid":
            return str(self.pid).encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    mountpoint, pid = sys.argv[1], int(sys.argv[2])
    options = set(pyfuse3.default_options) | {"fsname=s3cryptfs", "subtype=s3cryptfs"}
    pyfuse3.init(Pretender(pid), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
