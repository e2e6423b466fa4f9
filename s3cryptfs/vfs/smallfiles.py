"""Reading an object version, and small files in one request.

A cold open of a small file used to cost a HEAD (is it still the version we know?), a GET of
its header (to unwrap the data key) and a GET of its chunks. Here the open fetches the whole
object instead, in one request whose reply carries its ETag, metadata and body: the ETag
answers what the HEAD asked, and the body is decrypted into the block cache at once.

Directory scans (`cat *`, `grep -r`, `tar c`, `cp -r` out of the mount) open the files of one
directory in order. Two opens in a row of neighbouring names start fetching the next small
files ahead, a few at a time, within a byte budget. What was fetched ahead is only served to
an open that finds the same ETag in S3 (a HEAD, or nothing within --file-cache-ttl when that
is set): a file changed since is read anew, never stale (docs/SEMANTICS.md).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from s3cryptfs.cache.reader import Version
from s3cryptfs.codec import WouldWait
from s3cryptfs.errors import (
    IntegrityError,
    KeyNotFound,
    KeyRetired,
    S3CryptFSError,
    UnknownProvider,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format.layout import BodyCipher
from s3cryptfs.store.base import ObjectInfo, PendingGet, StoreSettings
from s3cryptfs.vfs.nodes import ChildInfo, Listing, Node

if TYPE_CHECKING:
    from s3cryptfs.vfs.core import Filesystem

log = logging.getLogger(__name__)

# Objects up to this size are fetched whole at open: one request instead of three. Past it a
# reader may want only part of the file, and the block cache's groups take over.
SMALL_BODY_MAX = 1024 * 1024
# A scan fetches at most this many files ahead, and holds at most this many bytes of bodies
# fetched and not opened yet (decrypted in the block cache, which bounds them again).
AHEAD_FILES_MAX = 32
AHEAD_BYTES_MAX = 16 * 1024 * 1024
# Concurrent fetches ahead: enough to hide round trips, few enough to leave the connection
# pool and the CPU to the reads an application waits for.
AHEAD_CONCURRENCY = 8
# Without --file-cache-ttl each open asks S3 for the ETag anyway (close-to-open across
# machines), so fetching a tiny file ahead would only add a request: ahead of such opens, only
# files whose transfer takes longer than a round trip are worth it.
AHEAD_MIN_STRICT = 64 * 1024
# How far a scan may skip ahead between two opens and still count as sequential (names that
# are directories or that the application filters out).
SCAN_GAP = 8
# Bodies up to this size are decrypted on the event loop when no key server is involved
# (fetch): a few hundred microseconds at most, which every other request would wait for.
LOOP_DECRYPT_MAX = 256 * 1024


def remote_vid(key: str, etag: str) -> tuple[str, str, str]:
    """The block cache's name for the object version *etag* of *key*."""
    return ("r", key, etag)


@dataclass(slots=True)
class Fetched:
    """A whole object fetched ahead of its open, decrypted into the block cache."""

    info: ObjectInfo
    version: Version
    at: float  # time.monotonic() of the reply


@dataclass(slots=True)
class Whole:
    """A small object fetched whole at its open: its version (None when its size or format
    does not make one) and, when it opened, its cipher and decrypted chunks."""

    info: ObjectInfo
    version: Version | None
    opened: tuple[BodyCipher, dict[int, bytes]] | None


async def _reply(pending: PendingGet, settings: StoreSettings) -> tuple[bytes, ObjectInfo] | None:
    """The result of a request sent without a thread, or None when it has none (an error, a
    reply that needs more, no reply in time): the caller then asks the blocking way, which
    retries and says what is wrong."""
    token = trio.lowlevel.current_trio_token()
    arrived = trio.Event()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(arrived.set)

    pending.done.add_done_callback(wake)
    try:
        with trio.move_on_after(settings.read_timeout + settings.connect_timeout):
            await arrived.wait()
    finally:
        if not pending.done.done():  # (no reply in time, or the open was interrupted)
            pending.abandon()
    if not pending.done.done():
        return None
    try:
        return pending.done.result()
    except Exception as exc:  # noqa: BLE001 - asked again the blocking way, which classifies
        log.debug("a read sent from the event loop is sent again from a thread: %r", exc)
        return None


@dataclass(slots=True)
class _Scan:
    listing: Listing
    names: list[str]
    pos: dict[str, int]
    last: int = -1
    streak: int = 0
    ahead_to: int = -1  # fetched (or started) up to this position


class SmallFiles:
    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.fetched: collections.OrderedDict[str, Fetched] = collections.OrderedDict()
        self.fetched_bytes = 0
        self.in_flight: dict[str, trio.Event] = {}
        self.scans: collections.OrderedDict[str, _Scan] = collections.OrderedDict()
        self.limiter = trio.CapacityLimiter(AHEAD_CONCURRENCY)
        # counters for status: opens answered from what a scan fetched ahead, and fetches made
        self.ahead_used = 0
        self.ahead_fetches = 0
        # whole-file fetches answered without a worker thread, and of those, decrypted so too
        self.loop_fetches = 0
        self.loop_opens = 0

    # --- versions ----------------------------------------------------------------------

    def version(
        self,
        key: str,
        remote: ChildInfo,
        metadata: dict[str, str] | None,
        size_hint: int,
        on_fresh: Callable[[dict[str, str]], None] | None = None,
    ) -> Version:
        """The reader's view of *remote* (the object version at *key*, with *metadata*).
        *on_fresh* is told of newer metadata found for the same ETag (a rewrap)."""
        fs = self.fs
        etag = remote.etag
        meta = metadata or {}
        size = fs.codec.plain_size_or_none(remote.body_size, metadata)
        if size is None and gw.is_mpu_object(meta):
            size = size_hint  # from its manifest; checked again once the cipher is built
        if size is None:
            raise IntegrityError(
                f"{key}: object length {remote.body_size} is not a valid encrypted length"
            )

        def make_cipher(header: bytes) -> Any:
            nonlocal meta
            try:
                return fs.codec.cipher(meta, header, key)
            except (KeyRetired, KeyNotFound, UnknownProvider):
                # A rewrap replaces only the metadata and may keep the ETag: our cached
                # envelope can be older than the object's. Fetch the current one once.
                if not fs.codec.may_wait():
                    raise  # (on the event loop: the reads will ask again from a thread)
                fresh = fs.store.head(key)
                if fresh.etag != etag or not fresh.metadata or fresh.metadata == meta:
                    raise
                meta = fresh.metadata
                if on_fresh is not None:
                    on_fresh(meta)
                return fs.codec.cipher(meta, header, key)

        return Version(
            vid=remote_vid(key, etag),
            name=key,
            plain_size=size,
            body_size=remote.body_size,
            fetch=fs._fetcher(key, etag),
            make_cipher=make_cipher,
            header_len=fs.codec.header_len(metadata),
        )

    def remote_version(self, node: Node) -> Version:
        remote = node.remote
        assert remote is not None
        version = node.version
        if version is None:

            def fresh(meta: dict[str, str]) -> None:
                if node.remote is remote:  # (not replaced meanwhile by another version)
                    node.metadata = meta

            key = self.fs.key(node.path)
            version = node.version = self.version(key, remote, node.metadata, node.size, fresh)
        return version

    # --- at open -------------------------------------------------------------------------

    def whole(self, node: Node) -> bool:
        """Is *node*'s object small enough to be fetched whole at open?"""
        remote = node.remote
        return (
            remote is not None
            and 0 < remote.body_size <= SMALL_BODY_MAX
            and not (node.metadata and gw.is_mpu_object(node.metadata))
        )

    def cached(self, node: Node) -> bool:
        """Are the blocks of the version *node* knows in the block cache already?"""
        version = node.version
        if node.remote is None or version is None or version.cipher is None:
            return False
        return self.fs.blocks.contains(version.vid, 0)

    async def take(self, key: str) -> Fetched | None:
        """What a scan fetched ahead for *key* (once: the open that takes it owns it); waits
        for a fetch of it already under way rather than sending a second one."""
        flight = self.in_flight.get(key)
        if flight is not None:
            await flight.wait()
        return self._take(key)

    def _take(self, key: str) -> Fetched | None:
        got = self.fetched.pop(key, None)
        if got is not None:
            self.fetched_bytes -= got.info.size
        return got

    def trusted(self, got: Fetched) -> bool:
        """May an open use *got* without asking S3 again (--file-cache-ttl)?"""
        ttl = self.fs.opts.file_ttl
        return ttl > 0 and time.monotonic() - got.at < ttl

    async def fetch(self, key: str) -> Whole:
        """The whole object, its ETag and metadata, in one request, decrypted (ObjectTooLarge
        past SMALL_BODY_MAX: the listing was older than the object).

        Sent from the event loop when the store can do so without blocking, and decrypted
        there when that waits on no key manager: a trip to a worker thread and back cost
        more than either. Otherwise one thread job for both, not two."""
        fs = self.fs
        pending = fs.store.get_bounded_start(key, SMALL_BODY_MAX, "file")
        if pending is not None:
            got = await _reply(pending, fs.store.settings)
            if got is not None:
                body, info = got
                self.loop_fetches += 1
                if len(body) <= LOOP_DECRYPT_MAX and fs.codec.opens_now(info.metadata):
                    self.loop_opens += 1
                    with fs.codec.without_waiting():
                        return self._open_whole(key, body, info)
                return await fs._thread(self._open_whole, key, body, info)
        return await fs._thread(self._get_whole, key)

    def _get_whole(self, key: str) -> Whole:
        """Blocking: fetch()."""
        body, info = self.fs.store.get_bounded(key, SMALL_BODY_MAX, "file")
        return self._open_whole(key, body, info)

    def _open_whole(self, key: str, body: bytes, info: ObjectInfo) -> Whole:
        """A fetched body, decrypted. One that does not open (forged, truncated, key not
        available) is returned unopened: the reads then take the usual path, which fetches
        again and says what is wrong."""
        version = None
        opened = None
        if info.metadata and gw.is_mpu_object(info.metadata):
            # Its cipher needs its manifest, another object: read as whole() says, in groups.
            return Whole(info, None, None)
        try:
            version = self.version(key, ChildInfo(False, info.size, info.etag), info.metadata, 0)
            opened = self.fs.reader.open_whole(version, body)
        except (S3CryptFSError, ValueError, WouldWait) as exc:
            log.debug("%s: not read whole: %s", key, exc)
        return Whole(info, version, opened)

    def install(self, node: Node, whole: Whole) -> None:
        """*whole* was fetched at *node*'s open and is its version now: its reads send
        nothing."""
        if whole.opened is not None:
            self.fs.reader.install(self.remote_version(node), *whole.opened)

    # --- scans ---------------------------------------------------------------------------

    def opened(self, node: Node) -> None:
        """A read-only open of *node*: is a scan of its directory going on? Fetch ahead."""
        parent = self.fs.nodes.at(node.parent_path)
        nursery = self.fs.reader.nursery
        if parent is None or parent.listing is None or nursery is None:
            return
        scan = self._scan(parent)
        pos = scan.pos.get(node.name)
        if pos is None:
            return
        if scan.last < pos <= scan.last + SCAN_GAP:
            scan.streak += 1
        else:
            scan.streak, scan.ahead_to = 0, pos
        scan.last = pos
        if scan.streak < 1:
            return
        window = min(AHEAD_FILES_MAX, 2 << scan.streak)
        start = max(pos, scan.ahead_to) + 1
        end = min(len(scan.names), pos + 1 + window)
        if end - start < max(1, window // 2):
            return  # topped up a half window at a time, not by one file per open
        scan.ahead_to = end - 1
        for i in range(start, end):
            self._ahead(parent, scan.names[i], nursery)

    def _scan(self, parent: Node) -> _Scan:
        listing = parent.listing
        assert listing is not None
        scan = self.scans.get(parent.path)
        if scan is None or scan.listing is not listing or len(scan.names) != len(
            listing.children
        ):
            names = sorted(listing.children)
            scan = _Scan(listing, names, {n: i for i, n in enumerate(names)})
            self.scans[parent.path] = scan
            while len(self.scans) > 16:  # a few directories scanned at once
                self.scans.popitem(last=False)
        self.scans.move_to_end(parent.path)
        return scan

    def _ahead(self, parent: Node, name: str, nursery: trio.Nursery) -> None:
        assert parent.listing is not None
        child = parent.listing.children.get(name)
        if child is None or child.is_dir or not 0 < child.size <= SMALL_BODY_MAX:
            return
        if self.fs.opts.file_ttl <= 0 and child.size < AHEAD_MIN_STRICT:
            return
        path = f"{parent.path}/{name}" if parent.path else name
        key = self.fs.key(path)
        if key in self.fetched or key in self.in_flight:
            return
        node = self.fs.nodes.at(path)
        if node is not None and (
            node.w.local is not None or node.w.staging is not None or self.cached(node)
        ):
            return
        if self.fs.blocks.contains(remote_vid(key, child.etag), 0):
            return
        if self.fetched_bytes + child.size > AHEAD_BYTES_MAX:
            return
        self.in_flight[key] = trio.Event()
        nursery.start_soon(self._fetch_ahead, key, child.size)

    async def _fetch_ahead(self, key: str, listed_size: int) -> None:
        try:
            async with self.limiter:
                whole = await self.fetch(key)
            self.ahead_fetches += 1
            if whole.version is None or whole.opened is None:
                return
            self.fs.reader.install(whole.version, *whole.opened)
            self._keep(key, Fetched(whole.info, whole.version, time.monotonic()))
        except (S3CryptFSError, ValueError) as exc:  # nothing is lost: the open fetches it
            log.debug("%s: not fetched ahead: %s", key, exc)
        finally:
            self.in_flight.pop(key).set()

    def _keep(self, key: str, got: Fetched) -> None:
        old = self.fetched.pop(key, None)
        if old is not None:
            self.fetched_bytes -= old.info.size
        self.fetched[key] = got
        self.fetched_bytes += got.info.size
        while self.fetched and (
            self.fetched_bytes > AHEAD_BYTES_MAX or len(self.fetched) > 4 * AHEAD_FILES_MAX
        ):
            _, dropped = self.fetched.popitem(last=False)
            self.fetched_bytes -= dropped.info.size
            self.fs.reader.forget(dropped.version)

    def forget_key(self, key: str) -> None:
        """This mount changed or removed *key*: what was fetched ahead of it is not served."""
        got = self._take(key)
        if got is not None:
            self.fs.reader.forget(got.version)

    def stats(self) -> dict[str, int]:
        return {
            "ahead_fetches": self.ahead_fetches,
            "ahead_used": self.ahead_used,
            "fetched_on_event_loop": self.loop_fetches,
            "decrypted_on_event_loop": self.loop_opens,
        }
