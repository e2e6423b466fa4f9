"""Composition root: build the store, open the volume, run the FUSE loop, drain on the way out."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from s3cryptfs import config, limits, malloc, registry
from s3cryptfs.asyncutil import run_abandonable
from s3cryptfs.audit import NO_AUDIT, AuditLog
from s3cryptfs.codec import GatewaySecrets, ObjectCodec
from s3cryptfs.errors import (
    BucketNotFound,
    ConfigError,
    KeyAccessDenied,
    ObjectNotFound,
    ProviderUnavailable,
    S3CryptFSError,
)
from s3cryptfs.exitcodes import EXIT_INCOMPLETE, EXIT_OK
from s3cryptfs.format.descriptor import GATEWAY_FORMAT
from s3cryptfs.keys.dekcache import DekCache
from s3cryptfs.keys.pool import KeyPool
from s3cryptfs.keys.ring import LocalKeys
from s3cryptfs.store.base import ObjectStore, StoreSettings
from s3cryptfs.store.factory import open_store
from s3cryptfs.vfs import names
from s3cryptfs.vfs.core import Filesystem, FsOptions
from s3cryptfs.volume import VolumeAuthority

if TYPE_CHECKING:
    from s3cryptfs.fuse_ops import FuseOperations

log = logging.getLogger(__name__)

RECORD_TIMEOUT = 5.0  # how long a stopping mount tries to update its record in the bucket
# The ids of the mount records this cache directory's mounts may have left (Mount._earlier_records)
RECORDS_FILE = "mount-records"


@dataclass
class MountSpec:
    url: config.VolumeURL
    mountpoint: str
    endpoint_url: str | None
    region: str | None
    password: bytes | None
    cache_root: str
    fs_options: FsOptions
    fuse_options: list[str] = field(default_factory=list)
    allow_other: bool = False
    retry_deadline: float = 45.0
    s3_client: str = "native"  # --s3-client: the mount's requests on awscrt or on boto3
    local_keys: LocalKeys | None = None  # KMS options and secrets of this machine
    audit_log: str | None = None
    dek_cache_entries: int = 4096
    dek_cache_ttl: float = 300.0
    descriptor_refresh: float = 60.0
    gateway_master_key: bytes | None = None  # the S3 Encryption Gateway's memory master key
    # On a stop, how long uploads may make no progress before the mount gives up waiting
    # (what is left stays in the cache directory for the next mount, and is named in the log).
    stop_timeout: float = 120.0
    metrics: tuple[str, int] | None = None  # --metrics: where to serve Prometheus metrics


def make_store(
    url: config.VolumeURL,
    endpoint: str | None,
    region: str | None,
    retry_deadline: float = 45.0,
    client: str = "boto3",
) -> ObjectStore:
    extra: dict[str, Any] = {}
    # Some S3-compatible stores cap CopyObject below AWS's 5 GiB; larger renames then need
    # part-by-part copies from a lower size on.
    threshold = os.environ.get("S3CRYPTFS_COPY_THRESHOLD")
    if threshold:
        extra["copy_threshold"] = config.parse_size(threshold)
    return open_store(
        StoreSettings(
            bucket=url.bucket,
            endpoint_url=endpoint,
            region=region,
            retry_deadline=retry_deadline,
            client=client,
            **extra,
        )
    )


# A first contact that is refused, names an unknown host or fails TLS is retried this long
# only (a server that is just starting), not for the whole --s3-timeout.
FIRST_CONTACT_DEFINITIVE = 2.0


def check_bucket(store: ObjectStore) -> None:
    try:
        store.check_bucket(definitive_after=FIRST_CONTACT_DEFINITIVE)
    except (BucketNotFound, ObjectNotFound):
        # an S3 error (exit 4, docs/CLI.md), not a volume one
        raise BucketNotFound(f"bucket {store.bucket!r} does not exist") from None


def open_codec(
    authority: VolumeAuthority,
    audit: AuditLog = NO_AUDIT,
    dek_cache: DekCache | None = None,
    refresh_interval: float = 60.0,
    gateway_master_key: bytes | None = None,
    refresh: bool = True,
    max_whole_object: int = limits.WHOLE_OBJECT_DEFAULT,
) -> ObjectCodec:
    """A codec over the authority's descriptor and key ring, every manager opened now (fail
    early); later descriptors come through the authority, so only authentic ones count."""
    desc, ring = authority.descriptor, authority.ring
    assert desc is not None and ring is not None
    if (
        desc.object_format == GATEWAY_FORMAT
        and desc.gateway.get("wrap") == "memory"
        and gateway_master_key is None
    ):
        raise ConfigError(
            "this volume writes files in the gateway's format with its memory provider: give "
            "the master key with --gateway-master-key-file FILE"
        )
    try:
        ring.open_all()
    except BaseException:
        ring.close()
        raise
    return ObjectCodec(
        desc,
        ring,
        refresh=authority.refresh if refresh else None,
        dek_cache=dek_cache,
        audit=audit,
        refresh_interval=refresh_interval,
        gateway=GatewaySecrets(password=authority.local.password, master_key=gateway_master_key),
        pool=KeyPool() if refresh else None,
        companion=authority.store.read_companion,
        max_whole_object=max_whole_object,
    )


class CacheLock:
    """One mount per cache directory: the journal has exactly one writer."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self._fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ConfigError(
                f"the cache directory {directory} is in use by another s3cryptfs mount of "
                "this volume"
            ) from None

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())


def check_mountpoint(path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"mount point {path} does not exist or is not a directory")
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == real:
                raise ConfigError(f"{path} is already a mount point ({parts[0]})")


class Mount:
    """Everything one mount owns, set up in order and torn down in reverse."""

    def __init__(self, spec: MountSpec) -> None:
        self.spec = spec
        self.fs: Filesystem | None = None
        self.ops: FuseOperations | None = None  # made by run()
        self.lock: CacheLock | None = None
        self.audit = NO_AUDIT
        self.warnings: list[str] = []  # for whoever started the mount (printed by the CLI)
        # Teardown, in reverse order of what prepare() and run() opened.
        self.exits = contextlib.ExitStack()
        self.left_behind: list[tuple[str, str, str]] = []
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.record = registry.MountRecord(
            registry.new_mount_id(),
            registry.this_host(),
            os.getpid(),
            generation=0,
            heartbeat=min(30.0, max(1.0, spec.descriptor_refresh)),
        )

    def prepare(self) -> None:
        """All the checks that can fail, before anything is mounted. Whatever it opens is
        closed by self.exits, in reverse order: at the end of run(), or at once if this
        fails."""
        try:
            self._prepare()
        except BaseException:
            self.exits.close()
            raise

    def _prepare(self) -> None:
        spec = self.spec
        check_mountpoint(spec.mountpoint)
        store = make_store(
            spec.url, spec.endpoint_url, spec.region, spec.retry_deadline, spec.s3_client
        )
        check_bucket(store)
        local = spec.local_keys or LocalKeys()
        local.password = spec.password
        authority = VolumeAuthority(store, spec.url, spec.endpoint_url, local)
        authority.open()
        if authority.ring is not None:
            self.exits.callback(authority.ring.close)
        self.audit = AuditLog(spec.audit_log)
        self.exits.callback(self.audit.close)
        codec = open_codec(
            authority,
            audit=self.audit,
            dek_cache=DekCache(spec.dek_cache_entries, spec.dek_cache_ttl),
            refresh_interval=spec.descriptor_refresh,
            gateway_master_key=spec.gateway_master_key,
            max_whole_object=spec.fs_options.max_whole_object,
        )
        cache_dir = config.volume_cache_dir(spec.cache_root, spec.endpoint_url, spec.url)
        self.lock = CacheLock(cache_dir)
        self.exits.callback(self.lock.release)
        # (a copy: run() completes it with what the server does with names)
        options = dataclasses.replace(spec.fs_options)
        fs = self.fs = Filesystem(store, codec, spec.url.prefix, cache_dir, options)
        # Uploaded bodies left in the journal's trash go in the background at the very end.
        self.exits.callback(lambda: _delete_in_background(fs.journal.trash_paths()))
        # Whatever ended the event loop, the journal's last writes reach the disk (commits.py).
        self.exits.callback(fs.journal.commits.flush)
        fs.clear_staging()
        self.warnings = authority.warnings + self._check_keys()
        if spec.metrics is not None:
            from s3cryptfs.metrics import MetricsServer

            self.exits.callback(MetricsServer(spec.metrics, self._snapshot).close)

    def _snapshot(self) -> dict[str, Any] | None:
        """The status numbers, taken in the mount's event loop (for a metrics scrape, from the
        server's thread); None before the loop runs and after it ended."""
        token, fs = self._trio_token, self.fs
        if token is None or fs is None:
            return None
        try:
            status: dict[str, Any] = trio.from_thread.run_sync(fs.stats, trio_token=token)
        except trio.RunFinishedError:
            return None
        return status

    def _check_keys(self) -> list[str]:
        """A key manager that does not answer now does not stop the mount (it may be back in a
        minute, and files whose keys are cached still work), but the user hears of it now
        rather than at the first EIO."""
        assert self.fs is not None
        found = []
        for provider, exc in self.fs.key_problems().items():
            if exc is None:
                continue
            health = f"{type(exc).__name__}: {exc}"
            # An outage and a refused token need different fixes: say which one it is.
            if isinstance(exc, KeyAccessDenied):
                text = (
                    f"key manager {provider} refused the credentials ({health}); mounting "
                    "anyway: files that need it fail with EIO until it accepts them"
                )
            elif isinstance(exc, ProviderUnavailable):
                text = (
                    f"key manager {provider} does not answer ({health}); mounting anyway: "
                    "files that need it fail with EIO until it does"
                )
            else:
                text = (
                    f"key manager {provider} failed its health check ({health}); mounting "
                    "anyway: files that need it fail with EIO until it is fixed"
                )
            log.warning(text)
            found.append(text)
        return found

    async def _recover(self) -> None:
        assert self.fs is not None
        count = await self.fs.recover()
        if count:
            log.info("uploaded %d file version(s) left by an earlier mount", count)

    def run(self, on_ready: Any = None) -> int:
        """Serve until unmounted; returns the exit code: EXIT_INCOMPLETE when closed files
        could not all be put in S3 before the stop (they stay in the cache directory, and the
        next mount uploads them)."""
        import pyfuse3

        from s3cryptfs.fuse_ops import FuseOperations

        assert self.fs is not None
        self.record.pid = os.getpid()  # the mount process (after the CLI's fork)
        # Worker threads (boto3, crypto) hold the GIL for up to the switch interval before the
        # FUSE loop gets it back; at the default 5 ms that wait dominates small-file latency.
        sys.setswitchinterval(0.0005)
        # A mount holds a large heap of long-lived objects (a node, its version and its index
        # entries per known file), and a full collection scans all of it under the GIL: about
        # 70 ms at 50,000 known files, four times in one listing of them. The young
        # generations still collect short-lived cycles as before; the full one runs after 100
        # young collections instead of 10.
        gc.set_threshold(*gc.get_threshold()[:2], 100)
        malloc.limit_arenas()
        with self.exits:
            if not self.fs.opts.read_only:
                # Whether a backslash in a name survives in its key: a few requests, and a
                # line in the mount's log when not (vfs/names.py).
                self.fs.opts.backslash_names = names.backslash_allowed(
                    self.fs.store, self.spec.url.prefix, self.record.mount_id
                )
            trio.run(self._recover)
            ops = self.ops = FuseOperations(self.fs)
            options = set(pyfuse3.default_options)
            # `mount` and `df` show the volume as the source (libfuse splits options on commas).
            source = str(self.spec.url).rstrip("/").replace("\\", "\\\\").replace(",", "\\,")
            options.add(f"fsname={source}")
            options.add("subtype=s3cryptfs")
            if self.spec.fs_options.read_only:
                options.add("ro")
            if self.spec.allow_other:
                options.add("allow_other")
            options.update(self.spec.fuse_options)
            pyfuse3.init(ops, self.spec.mountpoint, options)
            self.exits.callback(pyfuse3.close, unmount=True)
            log.info("mounted %s at %s", self.spec.url, self.spec.mountpoint)
            trio.run(self._main, on_ready)
        if self.left_behind:
            return EXIT_INCOMPLETE
        log.info("unmounted %s; every file is in S3", self.spec.mountpoint)
        return EXIT_OK

    async def _main(self, on_ready: Any) -> None:
        import pyfuse3

        assert self.fs is not None
        fs = self.fs
        self._trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await fs.run_background(nursery)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._stop_requests)
            if not self.spec.fs_options.read_only:
                nursery.start_soon(self._heartbeat)
            if on_ready is not None:
                on_ready()
            sd_notify("READY=1\nSTATUS=mounted")
            await pyfuse3.main()
            self._ops().dropper.close()  # (unmounted from outside: the kernel is gone)
            # Unmounted (by a signal, by fusermount or umount(8)): nothing may stay only on
            # this disk, or, when S3 or the key manager is away, we say what did. (After a
            # drain that a signal or umount asked for, this only catches the last moment.)
            # Once given up (forced, or by a drain that ran out of time), one more look only.
            given_up = fs.stop_requested.is_set() or bool(self.left_behind)
            await self._drain(fs, 0.0 if given_up else self.spec.stop_timeout)
            await self._withdraw(fs)
            nursery.cancel_scope.cancel()

    async def _drain(self, fs: Filesystem, stall: float | None) -> None:
        pending = fs.uploader.pending + len(fs.closed_pending)
        if pending:
            log.info("uploading %d pending file version(s) before exit", pending)
        sd_notify(f"STOPPING=1\nSTATUS=uploading {pending} pending file version(s)")
        said = {key for key, _, _ in self.left_behind}
        left = await fs.drain(stall)
        self.left_behind = left
        if left and {key for key, _, _ in left} != said:
            log.error(
                "%d closed file version(s) are not in S3 (nothing uploaded for %.0f s); they "
                "are kept in %s and the next mount of this volume uploads them: %s",
                len(left),
                stall or 0,
                fs.cache_dir,
                "; ".join(f"{key} ({why})" for key, _, why in left),
            )

    async def _heartbeat(self) -> None:
        """Re-read the descriptor and publish which key versions this mount still holds
        (registry.py), so that `keys retire` erases nothing a running mount needs."""
        fs = self.fs
        assert fs is not None
        earlier = self._earlier_records(fs)
        while True:
            with contextlib.suppress(Exception):
                await run_abandonable(fs.codec.refresh)  # refusals are logged there
            if await self._publish(fs) and earlier:
                earlier = await self._withdraw_earlier(fs, earlier)
            await trio.sleep(self.record.heartbeat)

    def _earlier_records(self, fs: Filesystem) -> list[str]:
        """The records earlier mounts of this cache directory may have left (a crash keeps
        its record, holding what was then in its journal). This mount took over that journal
        (recover) and holds what is left of it in its own record: once that is published,
        theirs go, or a `keys retire` would wait for a mount that never comes back. The file
        lists this mount too before anything is published, so a crash at any point leaves
        no record that the next mount does not know of."""
        path = os.path.join(fs.cache_dir, RECORDS_FILE)
        try:
            with open(path) as f:
                earlier = [i for i in f.read().split() if registry.valid_mount_id(i)]
        except FileNotFoundError:
            earlier = []
        except OSError as exc:  # (best effort: at worst a retire waits, as before)
            log.debug("%s: %s", path, exc)
            earlier = []
        earlier = [i for i in earlier if i != self.record.mount_id]
        _write_ids(path, [*earlier, self.record.mount_id])
        return earlier

    async def _withdraw_earlier(self, fs: Filesystem, earlier: list[str]) -> list[str]:
        """Withdraw the records in *earlier*; returns those still to withdraw."""
        left = []
        for mount_id in earlier:
            try:
                await run_abandonable(registry.withdraw, fs.store, self.spec.url.prefix, mount_id)
            except S3CryptFSError:
                left.append(mount_id)
        _write_ids(os.path.join(fs.cache_dir, RECORDS_FILE), [*left, self.record.mount_id])
        return left

    async def _publish(self, fs: Filesystem) -> bool:
        # The generation first: one read after the holds could name a refresh they missed.
        generation = fs.codec.generation_in_force()
        held = fs.queued_versions() | await run_abandonable(fs.wrapping_versions)
        self.record.generation = generation
        self.record.holds = sorted(held)
        try:
            await run_abandonable(registry.publish, fs.store, self.spec.url.prefix, self.record)
        except S3CryptFSError as exc:
            log.debug("mount record not written: %s", exc)
            return False
        return True

    async def _withdraw(self, fs: Filesystem) -> None:
        """A clean stop withdraws the record; one that leaves versions behind keeps it, with
        what it holds, so a retire waits for the next mount to upload them."""
        if self.spec.fs_options.read_only:
            return
        # Bounded: S3 may be what stopped the uploads.
        with contextlib.suppress(S3CryptFSError), trio.move_on_after(RECORD_TIMEOUT):
            if self.left_behind:
                await self._publish(fs)
            else:
                await run_abandonable(
                    registry.withdraw, fs.store, self.spec.url.prefix, self.record.mount_id
                )

    def _ops(self) -> FuseOperations:
        assert self.ops is not None
        return self.ops

    async def _stop_requests(self) -> None:
        """`s3cryptfs umount --force` asks through the mount itself (fuse_ops, the stop
        attribute): stop now, whatever is not in S3 stays for the next mount."""
        import pyfuse3

        assert self.fs is not None
        await self.fs.stop_requested.wait()
        await self._ops().dropper.stop()
        pyfuse3.terminate()

    async def _signals(self) -> None:
        import pyfuse3

        assert self.fs is not None
        watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
        configured = logging.getLogger().level
        with trio.open_signal_receiver(*watched) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                if signum in (signal.SIGUSR1, signal.SIGUSR2):
                    # Log levels at runtime: USR1 turns debug on, USR2 restores the level the
                    # mount started with. Debug lines name keys, never secrets or contents.
                    level = logging.DEBUG if signum == signal.SIGUSR1 else configured
                    logging.getLogger().setLevel(level)
                    log.warning("log level is now %s", logging.getLevelName(level))
                    continue
                log.info(
                    "received %s: uploading dirty files, then unmounting",
                    signal.Signals(signum).name,
                )
                await self._drain(self.fs, self.spec.stop_timeout)
                await self._ops().dropper.stop()
                pyfuse3.terminate()
                return


def _write_ids(path: str, ids: list[str]) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write("\n".join(ids) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # (a full disk: the journal says so loudly; this is a hint only)
        log.debug("%s: %s", path, exc)


def _delete_in_background(paths: list[str]) -> None:
    """Uploaded bodies still in the journal's trash: everything is in S3 and the journal is
    consistent, so the unmount does not wait for their deletion (seconds for a large file on
    some file systems). A detached `rm` deletes them; if it cannot, the next mount does."""
    if not paths:
        return
    with contextlib.suppress(OSError):
        subprocess.Popen(
            ["rm", "-f", "--", *paths],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
