"""Turns files into encrypted objects and object metadata into chunk ciphers.

Pure and blocking: knows the format and the key managers, nothing of FUSE, trio or S3. The
format is chosen per object from its metadata (never from configuration), so a volume can hold
objects of several formats, providers and key versions at once: the key ring has a manager for
every provider the descriptor names.

When an object names a key version (or provider) the ring does not know, the codec asks for the
descriptor again (``refresh``) once and retries: a ``s3cryptfs keys rotate`` or a ``migrate``
done while mounted is picked up without a remount. New objects take the new active version once
the codec has seen the new descriptor: at such a read, or at the periodic re-read before a wrap.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from s3cryptfs.audit import NO_AUDIT, AuditLog
from s3cryptfs.errors import (
    FormatError,
    IntegrityError,
    KeyManagerError,
    KeyNotFound,
    UnknownProvider,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.format import v1
from s3cryptfs.format.descriptor import Descriptor
from s3cryptfs.keys.base import KeyEnvelope
from s3cryptfs.keys.dekcache import DekCache, cache_key
from s3cryptfs.keys.ring import KeyRing

# At most one descriptor re-read per this many seconds, however many objects ask for it.
REFRESH_MIN_INTERVAL = 2.0


@dataclass(frozen=True)
class SealedObject:
    metadata: dict[str, str]
    plain_size: int
    body_size: int
    cipher: v1.ChunkCipher  # to read the sealed body back before it is uploaded


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
    ) -> None:
        self.descriptor = descriptor
        self.ring = ring
        self.chunk_size = descriptor.chunk_size
        self.dek_cache = dek_cache if dek_cache is not None else DekCache()
        self.audit = audit
        self._refresh = refresh
        self._refresh_interval = refresh_interval
        self._refresh_lock = threading.Lock()
        self._refreshed_at = time.monotonic()
        # (provider, version) pairs envelopes named that the descriptor lacked at its last read
        self._missing: set[tuple[str, int]] = set()
        self._context = {"volume_id": descriptor.volume_id}

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
            self.ring.update(desc)
            self.descriptor = desc
            self._missing.clear()
            return True

    def _maybe_periodic_refresh(self) -> None:
        if self._refresh is not None and (
            time.monotonic() - self._refreshed_at >= self._refresh_interval
        ):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep wrapping under what we know
                return

    # --- wrapping ----------------------------------------------------------------------------

    def new_metadata(self, dek: bytes, attrs: md.PosixAttrs, name: str = "") -> dict[str, str]:
        self._maybe_periodic_refresh()
        manager = self.ring.active()
        try:
            envelope = manager.wrap_key(dek, self._context)
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
        return {md.FORMAT: md.FORMAT_V1, **md.encode_envelope(envelope), **attrs.encode()}

    def seal_stream(
        self, src: BinaryIO, dst: BinaryIO, attrs: md.PosixAttrs, name: str = ""
    ) -> SealedObject:
        """Encrypt *src* into *dst* under a fresh data key (blocking: may call a KMS)."""
        dek = os.urandom(v1.DEK_LEN)
        meta = self.new_metadata(dek, attrs, name)
        start = dst.tell()
        plain, body = v1.encrypt_stream(dek, src, dst, self.chunk_size)
        dst.flush()
        dst.seek(start)
        header = v1.Header.decode(dst.read(v1.HEADER_LEN))
        dst.seek(0, os.SEEK_END)
        return SealedObject(meta, plain, body, v1.ChunkCipher(dek, header))

    def seal_bytes(
        self, data: bytes, attrs: md.PosixAttrs, name: str = ""
    ) -> tuple[bytes, dict[str, str]]:
        dek = os.urandom(v1.DEK_LEN)
        return v1.encrypt_bytes(dek, data, self.chunk_size), self.new_metadata(dek, attrs, name)

    # --- unwrapping --------------------------------------------------------------------------

    def unwrap_envelope(self, envelope: KeyEnvelope, name: str = "") -> bytes:
        """The DEK in *envelope*; errors name the object (blocking: may call a KMS)."""
        ckey = cache_key(envelope)
        dek = self.dek_cache.get(ckey)
        if dek is not None:
            return dek
        try:
            try:
                dek = self._unwrap_once(envelope)
            except (KeyNotFound, UnknownProvider):
                # Maybe a rotate or migrate by another process: re-read the descriptor once
                # (or another thread just did) and retry.
                if self._refresh is None:
                    raise
                # The rate limit must not hide a change made since the last read: the first
                # time a provider/version is missing, re-read even within the interval.
                seen = (envelope.provider, envelope.key_version)
                with self._refresh_lock:
                    first = seen not in self._missing
                    self._missing.add(seen)
                self.refresh(force=first)
                dek = self._unwrap_once(envelope)
        except KeyManagerError as exc:
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
        self.dek_cache.put(ckey, dek)
        return dek

    def _unwrap_once(self, envelope: KeyEnvelope) -> bytes:
        manager = self.ring.manager(envelope.provider)
        return manager.unwrap_key(envelope, self._context)

    def unwrap(self, meta: Mapping[str, str], name: str = "") -> bytes:
        """The data key of an object (blocking: may call a KMS)."""
        if md.object_format(meta) != md.FORMAT_V1:
            raise FormatError("object is not encrypted by s3cryptfs (no format marker)")
        try:
            envelope = md.decode_envelope(meta)
        except FormatError as exc:
            raise FormatError(f"{name}: {exc}" if name else str(exc)) from None
        return self.unwrap_envelope(envelope, name)

    def cipher(self, meta: Mapping[str, str], header_raw: bytes, name: str = "") -> v1.ChunkCipher:
        return v1.ChunkCipher(self.unwrap(meta, name), v1.Header.decode(header_raw))

    def plain_size(self, body_size: int, chunk_size: int | None = None) -> int:
        return v1.plain_size(body_size, chunk_size or self.chunk_size)

    def plain_size_or_none(self, body_size: int) -> int | None:
        try:
            return self.plain_size(body_size)
        except IntegrityError:
            return None

    def decrypt_whole(self, meta: Mapping[str, str], body: bytes, name: str = "") -> bytes:
        return v1.decrypt_bytes(self.unwrap(meta, name), body)
