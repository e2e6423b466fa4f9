"""The filesystem core without a kernel: a real volume on the test SeaweedFS, a Filesystem built
as the mount builds it (no pyfuse3), its background tasks in a trio loop of their own thread,
and a synchronous driver that speaks in paths, as a program on the mount would.

The same checks run through this driver and through a real mount (MountDriver), as rclone's
vfstest runs one suite against the VFS and every front-end."""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from s3cryptfs.config import VolumeURL
from s3cryptfs.errors import S3CryptFSError, to_errno
from s3cryptfs.format.descriptor import Descriptor
from s3cryptfs.keys.password import PasswordKeyManager
from s3cryptfs.keys.ring import LocalKeys
from s3cryptfs.mount import open_codec
from s3cryptfs.store.s3 import StoreSettings
from s3cryptfs.trust import TrustStore
from s3cryptfs.vfs.core import Filesystem, FsOptions
from s3cryptfs.vfs.nodes import ROOT_INODE, Node
from s3cryptfs.volume import VolumeAuthority
from tests.faults import FaultyStore

T = TypeVar("T")
PASSWORD = b"a password for the kernel-free tests"
FAST_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


@dataclass
class Stat:
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int


def new_volume(store: FaultyStore, url: VolumeURL, state_dir: str) -> None:
    """s3cryptfs init, through the library."""
    local = LocalKeys(password=PASSWORD)
    volume_id = Descriptor.new_volume_id()
    manager = PasswordKeyManager.create(PASSWORD, volume_id, FAST_SCRYPT)
    desc = Descriptor(volume_id=volume_id, key_settings=manager.settings())
    trust = TrustStore(state_dir)
    authority = VolumeAuthority(store, url, store.settings.endpoint_url, local, trust)
    authority.create(desc, adopt=manager)
    assert authority.ring is not None
    authority.ring.close()


class CoreFs:
    """A Filesystem served by a trio loop in a thread; call() runs one of its coroutines."""

    def __init__(
        self,
        server: Any,
        bucket: str,
        workdir: Path,
        *,
        retry_deadline: float = 2.0,
        client: Any = None,
    ) -> None:
        self.workdir = workdir
        self.url = VolumeURL(bucket, "vol/")
        settings = StoreSettings(
            bucket=bucket, endpoint_url=server.endpoint_url, retry_deadline=retry_deadline
        )
        self.store = FaultyStore(settings, client=client or server.client())
        self.opts: dict[str, Any] = {}
        self.state_dir = str(workdir / "state")
        self.cache_dir = str(workdir / "cache")
        self.fs: Filesystem | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    def init(self) -> CoreFs:
        new_volume(self.store, self.url, self.state_dir)
        return self

    def start(self, **opts: Any) -> CoreFs:
        local = LocalKeys(password=PASSWORD)
        trust = TrustStore(self.state_dir)
        endpoint = self.store.settings.endpoint_url
        authority = VolumeAuthority(self.store, self.url, endpoint, local, trust)
        authority.open()
        codec = open_codec(authority, refresh_interval=3600)
        self.opts = {**self.opts, **opts}  # kept for the next start (a remount)
        options = FsOptions(uid=os.getuid(), gid=os.getgid(), upload_helper=False, **self.opts)
        fs = Filesystem(self.store, codec, self.url.prefix, self.cache_dir, options)
        fs.clear_staging()
        self.fs = fs
        self._ready.clear()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._failed is not None:
            raise self._failed
        return self

    def _serve(self) -> None:
        async def main() -> None:
            assert self.fs is not None
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                await self.fs.recover()
                async with trio.open_nursery() as nursery:
                    await self.fs.run_background(nursery)
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self._failed = exc
                self._ready.set()

        trio.run(main)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self._token is not None
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def stop(self, drain: bool = True) -> list[tuple[str, str, str]]:
        """Unmount: drain (unless a crash is wanted), then end the loop."""
        left: list[tuple[str, str, str]] = []
        if self.fs is not None and self._token is not None:
            if drain:
                left = self.call(self.fs.drain, 5.0)
            stop = self._stop
            assert stop is not None
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
        if self._thread is not None:
            self._thread.join(60)
        if self.fs is not None:
            self.fs.codec.ring.close()
        self.fs, self._token = None, None
        return left


class CoreDriver:
    """Path-level operations on a CoreFs, raising OSError with the errno the kernel would see."""

    def __init__(self, core: CoreFs) -> None:
        self.core = core

    @property
    def fs(self) -> Filesystem:
        assert self.core.fs is not None
        return self.core.fs

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return self.core.call(fn, *args)
        except S3CryptFSError as exc:
            raise OSError(to_errno(exc), str(exc)) from None

    def _lookup(self, path: str) -> Node:
        node = self.fs.node(ROOT_INODE)
        for name in [p for p in path.split("/") if p]:
            node = self._run(self.fs.lookup, node.ino, name)
            node = self.fs.nodes.held(node)  # what the kernel counts (fuse_ops does it there)
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        return self._lookup(head), name

    # --- the operations --------------------------------------------------------------------

    def write_file(self, path: str, data: bytes) -> None:
        """open(O_WRONLY|O_CREAT|O_TRUNC), write, close."""
        parent, name = self._parent(path)
        try:
            node = self._lookup(path)
            handle, _ = self._run(self.fs.open, node.ino, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            handle = self._run(self.fs.create, parent.ino, name, 0o100644, os.getuid(), 0)
        self._write_close(handle.fh, 0, data)

    def open(self, path: str, flags: int) -> int:
        node = self._lookup(path)
        handle, _ = self._run(self.fs.open, node.ino, flags)
        return handle.fh

    def _write_close(self, fh: int, offset: int, data: bytes) -> None:
        step = 128 * 1024
        for start in range(0, len(data), step):
            self._run(self.fs.write, fh, offset + start, data[start : start + step])
        self.close(fh)

    def write_at(self, fh: int, offset: int, data: bytes) -> None:
        self._run(self.fs.write, fh, offset, data)

    def read_at(self, fh: int, offset: int, size: int) -> bytes:
        return self._run(self.fs.read, fh, offset, size)

    def fsync(self, fh: int) -> None:
        self._run(self.fs.fsync, fh)

    def close(self, fh: int) -> None:
        try:
            self._run(self.fs.flush, fh)
        finally:
            self._run(self.fs.release, fh)

    def append(self, path: str, data: bytes) -> None:
        size = self.stat(path).size
        fh = self.open(path, os.O_WRONLY | os.O_APPEND)
        self._write_close(fh, size, data)

    def read_file(self, path: str) -> bytes:
        fh = self.open(path, os.O_RDONLY)
        out = b""
        try:
            while True:
                chunk = self._run(self.fs.read, fh, len(out), 1 << 20)
                if not chunk:
                    return out
                out += chunk
        finally:
            self._run(self.fs.release, fh)

    def stat(self, path: str) -> Stat:
        node = self._lookup(path)
        a = self._run(self.fs.getattr, node.ino)
        return Stat(a.mode, a.size, a.mtime_ns, a.uid, a.gid)

    def exists(self, path: str) -> bool:
        try:
            self._lookup(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = self._parent(path)
        self._run(self.fs.mkdir, parent.ino, name, stat.S_IFDIR | mode, os.getuid(), 0)

    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        self._run(self.fs.rmdir, parent.ino, name)

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        self._run(self.fs.unlink, parent.ino, name)

    def rename(self, src: str, dst: str) -> None:
        (sp, sn), (dp, dn) = self._parent(src), self._parent(dst)
        self._run(self.fs.rename, sp.ino, sn, dp.ino, dn, 0)

    def listdir(self, path: str) -> list[str]:
        node = self._lookup(path)
        return sorted(name for name, _ in self._run(self.fs.readdir, node.ino))

    def chmod(self, path: str, mode: int) -> None:
        node = self._lookup(path)
        self._run(functools.partial(self.fs.setattr, node.ino, None, mode=mode))

    def utime(self, path: str, mtime_ns: int) -> None:
        node = self._lookup(path)
        self._run(functools.partial(self.fs.setattr, node.ino, None, mtime_ns=mtime_ns))

    def truncate(self, path: str, size: int) -> None:
        node = self._lookup(path)
        self._run(functools.partial(self.fs.setattr, node.ino, None, size=size))

    def symlink(self, target: str, path: str) -> None:
        parent, name = self._parent(path)
        self._run(self.fs.symlink, parent.ino, name, target.encode(), os.getuid(), 0)

    def readlink(self, path: str) -> str:
        node = self._lookup(path)
        return self._run(self.fs.readlink, node.ino).decode()

    def remount(self) -> None:
        self.core.stop()
        self.core.start()


class MountDriver:
    """The same operations through a real FUSE mount (a `Volume` of tests/conftest.py)."""

    def __init__(self, volume: Any) -> None:
        self.volume = volume
        self.root = Path(volume.mountpoint)

    def _p(self, path: str) -> Path:
        return self.root / path

    def write_file(self, path: str, data: bytes) -> None:
        self._p(path).write_bytes(data)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._p(path), flags)

    def write_at(self, fh: int, offset: int, data: bytes) -> None:
        os.pwrite(fh, data, offset)

    def read_at(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(fh, size, offset)

    def fsync(self, fh: int) -> None:
        os.fsync(fh)

    def close(self, fh: int) -> None:
        os.close(fh)

    def append(self, path: str, data: bytes) -> None:
        with open(self._p(path), "ab") as f:
            f.write(data)

    def read_file(self, path: str) -> bytes:
        return self._p(path).read_bytes()

    def stat(self, path: str) -> Stat:
        st = os.lstat(self._p(path))
        return Stat(st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, st.st_gid)

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._p(path))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, src: str, dst: str) -> None:
        os.rename(self._p(src), self._p(dst))

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self._p(path)))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def utime(self, path: str, mtime_ns: int) -> None:
        os.utime(self._p(path), ns=(mtime_ns, mtime_ns))

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self._p(path), size)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def remount(self) -> None:
        self.volume.remount()
