"""Turns files into encrypted objects and object metadata into chunk ciphers.

Pure and blocking: knows the format and the key managers, nothing of FUSE, trio or S3. The
format is chosen per object from its metadata (never from configuration), so a volume can hold
objects of several formats, providers and key versions at once: the key ring has a manager for
every provider the descriptor names.

Every data key is wrapped and unwrapped by a KeyManager, through one path (the DEK cache, the
audit log, errors that name the object): the key ring's managers for the providers the
descriptor names, and for the S3 Encryption Gateway's own modes (``password``, ``memory``),
which objects name but no descriptor does, the managers of keys/gateway.py built from this
machine's secrets (GatewaySecrets).

When an object names a key version (or provider) the ring does not know, the codec asks for the
descriptor again (``refresh``) once and retries: a ``s3cryptfs keys rotate`` or a ``migrate``
done while mounted is picked up without a remount. New objects take the new active version once
the codec has seen the new descriptor: at such a read, or at the periodic re-read before a wrap.
An unwrap re-reads it too when the codec's view is older than min(refresh interval, DEK cache
TTL), so that a ``keys retire`` done elsewhere stops unwrapping within the DEK cache's lifetime.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from s3cryptfs import limits
from s3cryptfs.audit import NO_AUDIT, AuditLog
from s3cryptfs.errors import (
    FormatError,
    IntegrityError,
    InvalidEnvelope,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    NotSupported,
    ObjectNotFound,
    ProviderUnavailable,
    S3CryptFSError,
    UnknownProvider,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import metadata as md
from s3cryptfs.format import v1
from s3cryptfs.format import xattrs as xa
from s3cryptfs.format.descriptor import GATEWAY_FORMAT, Descriptor
from s3cryptfs.format.layout import BodyCipher, PlainCipher
from s3cryptfs.keys.base import KeyEnvelope, KeyManager, wraps_locally
from s3cryptfs.keys.calls import KmsCalls
from s3cryptfs.keys.dekcache import DekCache, cache_key
from s3cryptfs.keys.gateway import GatewayKeys
from s3cryptfs.keys.pool import KeyPool
from s3cryptfs.keys.ring import KeyRing

# At most one descriptor re-read per this many seconds, however many objects ask for it.
REFRESH_MIN_INTERVAL = 2.0
# After a KMS timed out on a wrap, this long without asking it again (see _check_breaker).
BREAKER_SECONDS = 10.0


@dataclass(frozen=True)
class SealedObject:
    metadata: dict[str, str]
    plain_size: int
    body_size: int
    cipher: BodyCipher  # to read the sealed body back before it is uploaded


class WouldWait(Exception):
    """Work done without_waiting() reached something that waits on a server (never shown to
    anyone: the work is done again where waiting is allowed)."""


@dataclass
class GatewaySecrets:
    """What this machine holds for objects of the S3 Encryption Gateway (never stored, never
    printed): the secrets of its key managers (keys/gateway.py)."""

    # the gateway's password (a password volume's own one)
    password: bytes | None = field(default=None, repr=False)
    # the gateway's `memory` provider master key
    master_key: bytes | None = field(default=None, repr=False)


OWN, GATEWAY, PLAIN = "s3cryptfs", "gateway", "plain"


def object_kind(meta: Mapping[str, str]) -> str:
    """Which format an object is in, from its metadata alone."""
    if md.FORMAT in meta:
        return OWN
    if gw.is_gateway_object(meta):
        return GATEWAY
    return PLAIN


class ObjectCodec:
    """Encrypts with the volume's active key manager; decrypts with the one an object names."""

    def __init__(
        self,
        descriptor: Descriptor,
        ring: KeyRing,
        refresh: Callable[[], Descriptor] | None = None,
        dek_cache: DekCache | None = None,
        audit: AuditLog = NO_AUDIT,
        refresh_interval: float = 60.0,
        gateway: GatewaySecrets | None = None,
        pool: KeyPool | None = None,
        companion: Callable[[str], tuple[Mapping[str, str], bytes]] | None = None,
        max_whole_object: int = limits.WHOLE_OBJECT_DEFAULT,
    ) -> None:
        self.descriptor = descriptor
        secrets = gateway or GatewaySecrets()
        self.gateway_keys = GatewayKeys(secrets.password, secrets.master_key)
        # (key) -> (metadata, body) of a companion object (a gateway multipart manifest);
        # given by whoever reads the store, so that this class stays free of S3.
        self.companion = companion
        # Bytes of a gateway single-AEAD body we agree to download whole (--max-whole-object).
        self.max_whole_object = max_whole_object
        self.ring = ring
        self.chunk_size = descriptor.chunk_size
        self.dek_cache = dek_cache if dek_cache is not None else DekCache()
        self.kms_calls = KmsCalls()
        self.audit = audit
        self._refresh = refresh
        self._refresh_interval = refresh_interval
        self._refresh_lock = threading.Lock()
        self._refreshed_at = time.monotonic()
        # Raised whenever cached data keys are dropped: an unwrap that began before must not
        # put back the key of a version retired meanwhile.
        self._forgets = 0
        # (provider, version) pairs envelopes named that the descriptor lacked at its last read
        self._missing: set[tuple[str, int]] = set()
        self._context = {"volume_id": descriptor.volume_id}
        # Wrapped data keys made ahead of time (keys/pool.py): mounts have one.
        self.pool = pool
        # provider -> until when it is not asked to wrap again (see _check_breaker)
        self._down_until: dict[str, float] = {}
        # Descriptor generation at the start of each piece of work under way that takes a
        # data key (see fence)
        self._fences: Counter[int] = Counter()
        self._fence_lock = threading.Lock()
        self._local = threading.local()  # .nowait: see without_waiting

    # --- what a running mount may still be wrapping under ------------------------------------

    @contextlib.contextmanager
    def fence(self) -> Iterator[None]:
        """Around work that takes a data key and then puts its object in S3 or hands it to
        the uploader (whose queue the mount's record counts from then on): a seal, a stream,
        an index or symlink write. Until it ends, `generation_in_force` is at most the
        descriptor generation in force when it began. A key taken from the pool, or wrapped,
        just before a refresh emptied the pool is in no other hold, and `keys retire` or
        `migrate` waits for every mount to reach their generation (registry.blockers)
        before it erases or drops what that key is wrapped under."""
        generation = self.descriptor.generation
        with self._fence_lock:
            self._fences[generation] += 1
        try:
            yield
        finally:
            with self._fence_lock:
                self._fences[generation] -= 1
                if not self._fences[generation]:
                    del self._fences[generation]

    def generation_in_force(self) -> int:
        """The oldest descriptor generation this mount may still be wrapping under."""
        with self._fence_lock:
            return min([self.descriptor.generation, *self._fences])

    # --- descriptor refresh ------------------------------------------------------------------

    def refresh(self, force: bool = False) -> bool:
        """Re-read the descriptor (rate limited unless *force*). True if it was re-read."""
        if self._refresh is None:
            return False
        with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed_at < REFRESH_MIN_INTERVAL:
                return False
            self._refreshed_at = time.monotonic()
            desc = self._refresh()
            if self.pool is not None and desc.generation != self.descriptor.generation:
                self.pool.clear()  # keys wrapped under what the old descriptor said
            self.ring.update(desc)
            before, after = self.descriptor.providers(), desc.providers()
            for provider, settings in after.items():
                if provider in before and before[provider] != settings:
                    # Its keys changed (a rotate, a retire): what it unwrapped before may be
                    # under a version it now refuses, and must not outlive the change.
                    self._forget(provider)
            self.descriptor = desc
            self._missing.clear()
            return True

    def _forget(self, provider: str, version: int | None = None) -> None:
        self._forgets += 1
        self.dek_cache.forget_provider(provider, version)

    def _refresh_due(self, max_age: float) -> bool:
        return self._refresh is not None and time.monotonic() - self._refreshed_at >= max_age

    def _refresh_if_older(self, max_age: float) -> None:
        if not self._refresh_due(max_age):
            return
        if not self.may_wait():  # (came due since opens_now said it was not)
            raise WouldWait()
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - S3 or a refused descriptor: go on with what we know
            return

    def _maybe_periodic_refresh(self) -> None:
        self._refresh_if_older(self._refresh_interval)

    def _unwrap_max_age(self) -> float:
        """How old the view of the descriptor may be when a data key is unwrapped: a cached key
        would live that long anyway, so a retire stops unwrapping within the DEK cache TTL,
        at one GET per this many seconds at most (REFRESH_MIN_INTERVAL when it is shorter)."""
        return max(REFRESH_MIN_INTERVAL, min(self._refresh_interval, self.dek_cache.ttl))

    # --- wrapping ----------------------------------------------------------------------------

    def new_key(
        self, attrs: md.PosixAttrs, name: str = "", xattrs: Mapping[bytes, bytes] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """A fresh data key and the metadata of an object sealed under it, *xattrs* sealed in
        it too (blocking: may call the KMS, unless the pool has a key wrapped ahead of time)."""
        self._maybe_periodic_refresh()
        found = self._pooled_key(name)
        if found is not None:
            dek, envelope = found
        else:
            dek = os.urandom(v1.DEK_LEN)
            envelope = self._wrap(self.ring.active(), dek, name)
        return dek, self._metadata(dek, envelope, attrs, xattrs)

    def _pooled_key(self, name: str) -> tuple[bytes, KeyEnvelope] | None:
        found = self.pool.take() if self.pool is not None else None
        if found is not None:
            dek, envelope = found
            self.audit.event(
                "wrap",
                provider=envelope.provider,
                key_id=envelope.key_id,
                key_version=envelope.key_version,
                object=name or None,
            )
            self.dek_cache.put(cache_key(envelope), dek)
        return found

    @staticmethod
    def _metadata(
        dek: bytes,
        envelope: KeyEnvelope,
        attrs: md.PosixAttrs,
        xattrs: Mapping[bytes, bytes] | None,
    ) -> dict[str, str]:
        meta = {md.FORMAT: md.FORMAT_V1, **md.encode_envelope(envelope), **attrs.encode()}
        if xattrs:
            meta[xa.META_NAME] = xa.seal(dek, xattrs)
        return meta

    def seal_small_now(
        self,
        data: bytes,
        attrs: md.PosixAttrs,
        name: str = "",
        xattrs: Mapping[bytes, bytes] | None = None,
    ) -> tuple[SealedObject, bytes] | None:
        """Seal a small file's content without waiting on anything: None when that would
        mean a round trip (a descriptor refresh is due, the pool is empty and the active key
        manager wraps remotely) or the volume writes the gateway's format. Lets a close
        seal on the event loop instead of handing the work to a thread and back, which cost
        more than the sealing itself."""
        if self.writes_gateway or self._refresh_due(self._refresh_interval):
            return None
        found = self._pooled_key(name)
        if found is not None:
            dek, envelope = found
        else:
            manager = self.ring.active_if_built()
            if manager is None or not wraps_locally(manager):
                return None
            dek = os.urandom(v1.DEK_LEN)
            envelope = self._wrap(manager, dek, name)
        meta = self._metadata(dek, envelope, attrs, xattrs)
        out = io.BytesIO()
        plain, body = v1.encrypt_stream(dek, io.BytesIO(data), out, self.chunk_size)
        sealed = out.getvalue()
        header = v1.Header.decode(sealed[: v1.HEADER_LEN])
        return SealedObject(meta, plain, body, v1.ChunkCipher(dek, header)), sealed

    def refill_pool(self) -> int:
        """Top up the pool of wrapped data keys (blocking; for a worker thread)."""
        if self.pool is None or self.writes_gateway:
            return 0
        manager = self.ring.active()
        return self.pool.refill(lambda dek: self._wrap_now(manager, dek))

    def _wrap_now(self, manager: KeyManager, dek: bytes) -> KeyEnvelope:
        """A wrap outside of any object (the pool): its audit line comes when it is used."""
        self._check_breaker(manager.provider)
        try:
            return self.kms_calls.timed(
                manager.provider, "wrap", lambda: manager.wrap_key(dek, self._context)
            )
        except ProviderUnavailable:
            self._trip_breaker(manager.provider)
            raise

    def _check_breaker(self, provider: str) -> None:
        """A KMS that just timed out is not asked again for a few seconds: a file closed
        meanwhile is kept as closed at once rather than after another full timeout. Per
        provider: a gateway volume's own wraps do not wait for its KMS."""
        if time.monotonic() < self._down_until.get(provider, 0.0):
            raise ProviderUnavailable(
                f"the key manager did not answer less than {BREAKER_SECONDS:.0f} s ago; not "
                "asking it again yet"
            )

    def _trip_breaker(self, provider: str) -> None:
        self._down_until[provider] = time.monotonic() + BREAKER_SECONDS

    def _wrap(self, manager: KeyManager, dek: bytes, name: str) -> KeyEnvelope:
        """Wrap *dek* with *manager*, audited, and keep it in the DEK cache."""
        try:
            self._check_breaker(manager.provider)
            try:
                envelope = self.kms_calls.timed(
                    manager.provider, "wrap", lambda: manager.wrap_key(dek, self._context)
                )
            except ProviderUnavailable:
                self._trip_breaker(manager.provider)
                raise
        except KeyManagerError as exc:
            self.audit.event("wrap", type(exc).__name__, provider=manager.provider, object=name)
            raise
        self.audit.event(
            "wrap",
            provider=envelope.provider,
            key_id=envelope.key_id,
            key_version=envelope.key_version,
            object=name or None,
        )
        self.dek_cache.put(cache_key(envelope), dek)
        return envelope

    @property
    def writes_gateway(self) -> bool:
        return self.descriptor.object_format == GATEWAY_FORMAT

    def _gateway_writer(self, settings: gw.WriteSettings) -> KeyManager:
        """The manager that wraps new keys of a gateway-format volume: one of the gateway's own
        modes, or for its KMS mode the volume's active manager, which must be cosmian-kmip."""
        if settings.wrap != "cosmian-kmip":
            return self.gateway_keys.writer(settings.wrap, settings.iterations)
        manager = self.ring.active()
        if manager.provider != "cosmian-kmip":
            raise KeyNotFound(
                f"gateway wrap cosmian-kmip needs the volume's key manager to be cosmian-kmip, "
                f"not {manager.provider}"
            )
        return manager

    def _seal_gateway(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        attrs: md.PosixAttrs,
        name: str,
        xattrs: Mapping[bytes, bytes] | None = None,
    ) -> SealedObject:
        settings = gw.WriteSettings.from_dict(self.descriptor.gateway)
        dek = os.urandom(gw.KEY)
        envelope = md.encode_envelope(self._wrap(self._gateway_writer(settings), dek, name))
        meta, plain, body, cipher = gw.seal_chunked_stream(src, dst, dek, settings, envelope)
        meta.update(attrs.encode())
        if xattrs:
            meta[xa.META_NAME] = xa.seal(dek, xattrs)
        dst.flush()
        return SealedObject(meta, plain, body, cipher)

    def seal_stream(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        attrs: md.PosixAttrs,
        name: str = "",
        xattrs: Mapping[bytes, bytes] | None = None,
    ) -> SealedObject:
        """Encrypt *src* into *dst* under a fresh data key (blocking: may call a KMS), with
        the file's extended attributes *xattrs* sealed into its metadata.

        File contents: in the volume's object format (ours, or the gateway's)."""
        if self.writes_gateway:
            return self._seal_gateway(src, dst, attrs, name, xattrs)
        dek, meta = self.new_key(attrs, name, xattrs)
        start = dst.tell()
        plain, body = v1.encrypt_stream(dek, src, dst, self.chunk_size)
        dst.flush()
        dst.seek(start)
        header = v1.Header.decode(dst.read(v1.HEADER_LEN))
        dst.seek(0, os.SEEK_END)
        return SealedObject(meta, plain, body, v1.ChunkCipher(dek, header))

    def seal_bytes(
        self, data: bytes, attrs: md.PosixAttrs, name: str = "", *, content: bool = False
    ) -> tuple[bytes, dict[str, str]]:
        """Encrypt a small object; *content*: it is file content (the volume's format applies),
        else it is our own bookkeeping (always our format)."""
        if content and self.writes_gateway:
            out = io.BytesIO()
            sealed = self._seal_gateway(io.BytesIO(data), out, attrs, name)
            return out.getvalue(), sealed.metadata
        dek, meta = self.new_key(attrs, name)
        return v1.encrypt_bytes(dek, data, self.chunk_size), meta

    # --- extended attributes (format/xattrs.py) ----------------------------------------------

    def xattrs_limit(self, meta: Mapping[str, str] | None) -> int:
        """Bytes of encoded extended attributes a file may hold: what fits, sealed, in the
        user metadata of its object (*meta*, or None for one not written yet) and of the
        versions this volume writes next."""
        gateway = self.writes_gateway or (meta is not None and object_kind(meta) == GATEWAY)
        return xa.SET_MAX_GATEWAY if gateway else xa.SET_MAX

    def _object_dek(self, meta: Mapping[str, str], name: str) -> bytes:
        """The key an object's extended attributes are sealed under: its data key (blocking:
        may call a KMS). Objects of ours and single-PUT gateway objects have one of their own;
        others (plaintext, gateway multipart objects) cannot carry attributes."""
        kind = object_kind(meta)
        if kind == OWN:
            return self.unwrap(meta, name)
        if kind == GATEWAY and not gw.is_mpu_object(meta):
            try:
                envelope = gw.key_envelope(meta)
            except (FormatError, InvalidEnvelope) as exc:
                raise type(exc)(f"{name}: {exc}" if name else str(exc)) from None
            return self.unwrap_envelope(envelope, name)
        raise NotSupported(f"{name}: this object cannot carry extended attributes")

    def seal_xattrs(
        self, meta: Mapping[str, str], xattrs: Mapping[bytes, bytes], name: str = ""
    ) -> dict[str, str]:
        """*meta* with its extended attributes replaced by *xattrs*, sealed under the object's
        data key (blocking: may call a KMS)."""
        out = {k: v for k, v in meta.items() if k != xa.META_NAME}
        if xattrs:
            out[xa.META_NAME] = xa.seal(self._object_dek(meta, name), xattrs)
        return out

    def open_xattrs(self, meta: Mapping[str, str], name: str = "") -> dict[bytes, bytes]:
        """The extended attributes sealed in an object's metadata ({} when it has none);
        IntegrityError when they do not authenticate (blocking: may call a KMS)."""
        value = meta.get(xa.META_NAME)
        if value is None:
            return {}
        try:
            dek = self._object_dek(meta, name)
        except NotSupported:
            return {}  # not written by us (nothing to seal them under): ignored
        try:
            return xa.open_blob(dek, value)
        except IntegrityError as exc:
            raise type(exc)(f"{name}: {exc}" if name else str(exc)) from None

    # --- unwrapping --------------------------------------------------------------------------

    def unwrap_envelope(self, envelope: KeyEnvelope, name: str = "") -> bytes:
        """The DEK in *envelope*; errors name the object (blocking: may call a KMS)."""
        governed = self._in_descriptor(envelope.provider)
        if governed:
            # Before the cache too: a key cached before a retire must not serve after it is known.
            self._refresh_if_older(self._unwrap_max_age())
        ckey = cache_key(envelope)
        dek = self.dek_cache.get(ckey)
        if dek is not None:
            return dek
        forgets = self._forgets
        try:
            try:
                dek = self._unwrap_once(envelope)
            except (KeyNotFound, UnknownProvider):
                # Maybe a rotate or migrate by another process: re-read the descriptor once
                # (or another thread just did) and retry.
                if self._refresh is None or not governed:
                    raise
                if not self.may_wait():
                    raise WouldWait() from None  # (a descriptor re-read would be)
                # The rate limit must not hide a change made since the last read: the first
                # time a provider/version is missing, re-read even within the interval.
                seen = (envelope.provider, envelope.key_version)
                with self._refresh_lock:
                    first = seen not in self._missing
                    self._missing.add(seen)
                self.refresh(force=first)
                dek = self._unwrap_once(envelope)
        except KeyManagerError as exc:
            if isinstance(exc, KeyRetired):
                # Retired on the key server (Vault, the key store): the descriptor never says.
                self._forget(envelope.provider, envelope.key_version)
            self.audit.event(
                "unwrap",
                type(exc).__name__,
                provider=envelope.provider,
                key_id=envelope.key_id,
                key_version=envelope.key_version,
                object=name or None,
                detail=str(exc),
            )
            if name:
                raise type(exc)(f"{name}: {exc}") from None
            raise
        self.audit.event(
            "unwrap",
            provider=envelope.provider,
            key_id=envelope.key_id,
            key_version=envelope.key_version,
            object=name or None,
        )
        if forgets == self._forgets:
            self.dek_cache.put(ckey, dek)
        return dek

    def _in_descriptor(self, provider: str) -> bool:
        """Whether the descriptor governs *provider*'s keys (a re-read can add or retire them):
        all but the gateway's own modes, whose keys are this machine's secrets."""
        return self.gateway_keys.manager(provider) is None

    def _unwrap_once(self, envelope: KeyEnvelope) -> bytes:
        manager = self.gateway_keys.manager(envelope.provider)
        if manager is None and not self.may_wait():
            # (built, or building one may derive a key or connect; unwrapping may ask a
            # server: the cached key opens_now counted on may have gone since)
            manager = self.ring.built(envelope.provider)
            if manager is None or not wraps_locally(manager):
                raise WouldWait()
        if manager is None:
            manager = self.ring.manager(envelope.provider)
        return self.kms_calls.timed(
            envelope.provider, "unwrap", lambda: manager.unwrap_key(envelope, self._context)
        )

    @contextlib.contextmanager
    def without_waiting(self) -> Iterator[None]:
        """Work on an event loop, after opens_now() said yes: should it still come to a call
        that waits on a server (a key manager's unwrap, the descriptor re-read of a key
        version it does not know), that raises WouldWait instead, and the work is done again
        where waiting is allowed."""
        self._local.nowait = True
        try:
            yield
        finally:
            self._local.nowait = False

    def may_wait(self) -> bool:
        return not getattr(self._local, "nowait", False)

    def opens_now(self, meta: Mapping[str, str] | None) -> bool:
        """Would cipher() for an object with *meta* wait on nothing (no descriptor refresh
        due, its data key cached or its manager built and wrapping locally)? Then a small
        file's body may be decrypted on the event loop instead of in a worker thread."""
        try:
            if not meta or object_kind(meta) != OWN:
                return False
            envelope = md.decode_envelope(meta)
        except S3CryptFSError:
            return False  # (the thread's try says what is wrong with it)
        if not self._in_descriptor(envelope.provider):
            return False
        if self._refresh_due(self._unwrap_max_age()):
            return False
        if self.dek_cache.holds(cache_key(envelope)):
            return True
        manager = self.ring.built(envelope.provider)
        return manager is not None and wraps_locally(manager)

    def unwrap(self, meta: Mapping[str, str], name: str = "") -> bytes:
        """The data key of an object (blocking: may call a KMS)."""
        if md.object_format(meta) != md.FORMAT_V1:
            raise FormatError("object is not encrypted by s3cryptfs (no format marker)")
        try:
            envelope = md.decode_envelope(meta)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}" if name else str(exc)) from None
        return self.unwrap_envelope(envelope, name)

    # --- reading any object ------------------------------------------------------------------

    def refusal(self, meta: Mapping[str, str]) -> str | None:
        """Why an object cannot be served at all (None: it can be tried)."""
        if object_kind(meta) == PLAIN and not self.descriptor.allow_plaintext:
            # No downgrade: a plaintext object where encrypted ones are expected is refused.
            return "not encrypted (this volume does not allow plaintext objects)"
        return None

    def header_len(self, meta: Mapping[str, str] | None) -> int:
        """Bytes of the body's start that cipher() needs."""
        return v1.HEADER_LEN if meta is None or object_kind(meta) == OWN else 0

    def cipher(self, meta: Mapping[str, str], header_raw: bytes, name: str = "") -> BodyCipher:
        kind = object_kind(meta)
        if kind == GATEWAY and gw.is_mpu_object(meta):
            manifest = self.mpu_manifest(meta, name)
            return gw.MpuCipher(manifest, self.unwrap_envelope(gw.mpu_envelope(manifest), name))
        if kind == GATEWAY:
            return self._gateway_cipher(meta, name)
        if kind == PLAIN:
            reason = self.refusal(meta)
            if reason:
                raise FormatError(f"{name}: {reason}" if name else reason)
            return PlainCipher()
        return v1.ChunkCipher(self.unwrap(meta, name), v1.Header.decode(header_raw))

    def mpu_manifest(self, meta: Mapping[str, str], name: str) -> gw.MpuManifest:
        """The manifest of a gateway multipart object (blocking: reads the companion)."""
        mkey = gw.mpu_manifest_key(name, meta)
        if self.companion is None:
            raise FormatError(f"{name}: a multipart object needs its manifest {mkey}")
        try:
            mmeta, body = self.companion(mkey)
        except ObjectNotFound:
            raise IntegrityError(f"{name}: its multipart manifest {mkey} is missing") from None
        if object_kind(mmeta) != GATEWAY or gw.is_mpu_object(mmeta):
            raise IntegrityError(f"{name}: {mkey} is not an encrypted gateway manifest")
        try:
            return gw.parse_mpu_manifest(self.decrypt_whole(mmeta, body, mkey))
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}") from None

    def mpu_size(self, meta: Mapping[str, str], name: str) -> int:
        return self.mpu_manifest(meta, name).total_plain

    def _gateway_cipher(self, meta: Mapping[str, str], name: str) -> BodyCipher:
        norm = gw.normalize_metadata(meta)
        try:
            envelope = gw.key_envelope(norm)
        except (FormatError, InvalidEnvelope) as exc:
            raise type(exc)(f"{name}: {exc}" if name else str(exc)) from None
        key = self.unwrap_envelope(envelope, name)  # its errors name the object already
        try:
            return gw.body_cipher(norm, key=key, max_body=self.max_whole_object, name=name)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}" if name else str(exc)) from None

    def body_size(self, plain_size: int) -> int:
        """Length of the body this codec seals *plain_size* bytes into."""
        return v1.cipher_size(plain_size, self.chunk_size)

    @property
    def max_file_size(self) -> int:
        """The largest file that still fits in one S3 object once sealed."""
        return v1.max_plain_size(limits.OBJECT_MAX, self.chunk_size)

    def plain_size(self, body_size: int, chunk_size: int | None = None) -> int:
        return v1.plain_size(body_size, chunk_size or self.chunk_size)

    def plain_size_or_none(
        self, body_size: int, meta: Mapping[str, str] | None = None
    ) -> int | None:
        """The plaintext size of a body, from its length (and metadata where the format needs
        it); None where it cannot be told."""
        try:
            if meta is None:
                return self.plain_size(body_size)
            kind = object_kind(meta)
            if kind == OWN:
                return self.plain_size(body_size)
            if kind == PLAIN:
                return body_size
            norm = gw.normalize_metadata(meta)
            recorded = gw.recorded_size(norm)
            if recorded is not None:
                # What the gateway reports too; a body that disagrees fails at the first read.
                return recorded
            if norm.get("encryption-chunked") == "true":
                return gw.ChunkedCipher(gw.chunked_layout(norm), b"").plain_size_of(body_size)
            return gw.SingleCipher(norm, b"").plain_size_of(body_size)
        except (IntegrityError, FormatError):
            return None

    def decrypt_whole(self, meta: Mapping[str, str], body: bytes, name: str = "") -> bytes:
        if object_kind(meta) == OWN:
            return v1.decrypt_bytes(self.unwrap(meta, name), body)
        cipher = self.cipher(meta, b"", name)
        size = cipher.plain_size_of(len(body))
        parts = cipher.open_range(0, body, cipher.chunk_count(size))
        return b"".join(parts)

    def key_problems(self) -> dict[str, S3CryptFSError | None]:
        """Blocking: each key manager's health_check, None when it passed."""
        out: dict[str, S3CryptFSError | None] = {}
        ring = self.ring
        for provider in self.descriptor.providers():
            try:
                ring.manager(provider).health_check()
                out[provider] = None
            except S3CryptFSError as exc:
                out[provider] = exc
        return out

    def key_health(self) -> dict[str, str]:
        """Blocking: each key manager's health, as "ok" or the error (for status)."""
        return {
            provider: "ok" if exc is None else f"{type(exc).__name__}: {exc}"
            for provider, exc in self.key_problems().items()
        }
