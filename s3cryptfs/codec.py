"""Turns files into encrypted objects and object metadata into chunk ciphers.

Pure and blocking: knows the format and the key managers, nothing of FUSE, trio or S3. The
format is chosen per object from its metadata (never from configuration), so a volume can hold
objects of several formats, providers and key versions at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from s3cryptfs.errors import FormatError, IntegrityError, KeyManagerError
from s3cryptfs.format import metadata as md
from s3cryptfs.format import v1
from s3cryptfs.format.descriptor import Descriptor
from s3cryptfs.keys.base import KeyManager


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
        active: KeyManager,
        other_managers: Callable[[str], KeyManager] | None = None,
    ) -> None:
        self.descriptor = descriptor
        self.active = active
        self._others = other_managers
        self.chunk_size = descriptor.chunk_size
        self._context = {"volume_id": descriptor.volume_id}

    def _manager_for(self, provider: str) -> KeyManager:
        if provider == self.active.provider:
            return self.active
        if self._others is None:
            raise KeyManagerError(f"no key manager is configured for provider {provider!r}")
        return self._others(provider)

    def new_metadata(self, dek: bytes, attrs: md.PosixAttrs) -> dict[str, str]:
        envelope = self.active.wrap_key(dek, self._context)
        return {md.FORMAT: md.FORMAT_V1, **md.encode_envelope(envelope), **attrs.encode()}

    def seal_stream(self, src: BinaryIO, dst: BinaryIO, attrs: md.PosixAttrs) -> SealedObject:
        """Encrypt *src* into *dst* under a fresh data key (blocking: may call a KMS)."""
        dek = os.urandom(v1.DEK_LEN)
        meta = self.new_metadata(dek, attrs)
        start = dst.tell()
        plain, body = v1.encrypt_stream(dek, src, dst, self.chunk_size)
        dst.flush()
        dst.seek(start)
        header = v1.Header.decode(dst.read(v1.HEADER_LEN))
        dst.seek(0, os.SEEK_END)
        return SealedObject(meta, plain, body, v1.ChunkCipher(dek, header))

    def seal_bytes(self, data: bytes, attrs: md.PosixAttrs) -> tuple[bytes, dict[str, str]]:
        dek = os.urandom(v1.DEK_LEN)
        return v1.encrypt_bytes(dek, data, self.chunk_size), self.new_metadata(dek, attrs)

    def unwrap(self, meta: Mapping[str, str]) -> bytes:
        """The data key of an object (blocking: may call a KMS)."""
        if md.object_format(meta) != md.FORMAT_V1:
            raise FormatError("object is not encrypted by s3cryptfs (no format marker)")
        envelope = md.decode_envelope(meta)
        return self._manager_for(envelope.provider).unwrap_key(envelope, self._context)

    def cipher(self, meta: Mapping[str, str], header_raw: bytes) -> v1.ChunkCipher:
        return v1.ChunkCipher(self.unwrap(meta), v1.Header.decode(header_raw))

    def plain_size(self, body_size: int, chunk_size: int | None = None) -> int:
        return v1.plain_size(body_size, chunk_size or self.chunk_size)

    def plain_size_or_none(self, body_size: int) -> int | None:
        try:
            return self.plain_size(body_size)
        except IntegrityError:
            return None

    def decrypt_whole(self, meta: Mapping[str, str], body: bytes) -> bytes:
        return v1.decrypt_bytes(self.unwrap(meta), body)
