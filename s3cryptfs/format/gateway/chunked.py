"""The gateway's chunked format (§4.1, its default since 0.2.0): fixed-size AEAD chunks, one
nonce per chunk index, the chunk size and base IV in a small manifest in the metadata."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from s3cryptfs.errors import FormatError, IntegrityError
from s3cryptfs.format.gateway.metadata import (
    ALG_AES,
    ALG_CHACHA,
    MAX_CHUNK,
    MIN_CHUNK,
    NONCE,
    TAG,
    b64d,
    manifest_v1,
    normalize_metadata,
    recorded_size,
)


def chunk_nonce(base_iv: bytes, index: int, ivd: str | None) -> bytes:
    """Nonce of chunk *index*: HKDF-Expand (ivd=hkdf-sha256) or the legacy XOR rule."""
    if not 0 <= index <= 0xFFFFFFFF:
        raise FormatError("gateway: chunk index out of range")
    if ivd == "hkdf-sha256":
        msg = b"chunk-iv" + struct.pack(">I", index) + b"\x01"
        return hmac.new(base_iv, msg, hashlib.sha256).digest()[:NONCE]
    tail = int.from_bytes(base_iv[8:12], "big") ^ index
    return base_iv[:8] + tail.to_bytes(4, "big")


@dataclass(frozen=True)
class ChunkedLayout:
    """What the manifest and metadata say about a chunked object."""

    chunk_size: int
    base_iv: bytes
    ivd: str | None
    algorithm: str
    original_size: int | None

    @property
    def enc_chunk(self) -> int:
        return self.chunk_size + TAG

    def chunk_count(self, body_len: int) -> int:
        return -(-body_len // self.enc_chunk)

    def plaintext_size(self, body_len: int | None = None) -> int:
        """From the recorded size if present; else from the ciphertext length."""
        if self.original_size is not None:
            return self.original_size
        if body_len is None:
            raise FormatError("gateway: size unknown without the ciphertext length")
        n = self.chunk_count(body_len)
        size = body_len - TAG * n
        if body_len and (body_len - (n - 1) * self.enc_chunk) <= TAG:
            raise IntegrityError("gateway: last chunk too short")
        return size

    def ciphertext_size(self, plaintext_size: int) -> int:
        return plaintext_size + TAG * (-(-plaintext_size // self.chunk_size))

    def ciphertext_range(self, offset: int, length: int) -> tuple[int, int, int]:
        """(first chunk index, ciphertext start, ciphertext end exclusive) covering
        plaintext [offset, offset+length). End is not clipped to the object size."""
        if offset < 0 or length <= 0:
            raise ValueError("offset must be >= 0 and length > 0")
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        return first, first * self.enc_chunk, (last + 1) * self.enc_chunk

    def read_range(
        self, key: bytes, offset: int, length: int, size: int, fetch: Callable[[int, int], bytes]
    ) -> bytes:
        """Plaintext [offset, offset+length) clipped to *size* (the plaintext size).

        *fetch(start, end_exclusive)* returns ciphertext bytes; a short answer is an error.
        """
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        first, start, end = self.ciphertext_range(offset, length)
        end = min(end, self.ciphertext_size(size))
        data = fetch(start, end)
        if len(data) != end - start:
            raise IntegrityError("gateway: object body is shorter than its recorded size")
        pt = self.decrypt_range(key, first, data)
        skip = offset - first * self.chunk_size
        return pt[skip : skip + length]

    def decrypt_chunk(self, key: bytes, index: int, data: bytes) -> bytes:
        if not TAG < len(data) <= self.enc_chunk:
            raise IntegrityError(f"gateway: chunk {index} has bad length {len(data)}")
        nonce = chunk_nonce(self.base_iv, index, self.ivd)
        aead = AESGCM(key) if self.algorithm == ALG_AES else ChaCha20Poly1305(key)
        try:
            return aead.decrypt(nonce, data, None)
        except InvalidTag as e:
            raise IntegrityError(f"gateway: chunk {index} failed authentication") from e

    def decrypt_range(self, key: bytes, first_index: int, data: bytes) -> bytes:
        """Decrypt consecutive whole chunks starting at *first_index*."""
        out = []
        for j, pos in enumerate(range(0, len(data), self.enc_chunk)):
            out.append(self.decrypt_chunk(key, first_index + j, data[pos : pos + self.enc_chunk]))
        return b"".join(out)


class ChunkedCipher:
    """A chunked gateway object as the block cache reads it (format/layout.py's interface).

    The gateway cannot tell a body whose trailing chunks were dropped from a shorter file; we
    can when the object records its size: a body whose length disagrees with it is refused."""

    header_len = 0

    def __init__(self, layout: ChunkedLayout, key: bytes) -> None:
        self.layout = layout
        self.key = key

    @property
    def chunk_size(self) -> int:
        return self.layout.chunk_size

    def span(self, first: int, last: int, body_size: int) -> tuple[int, int]:
        enc = self.layout.enc_chunk
        return first * enc, min((last + 1) * enc, body_size) - 1

    def open_range(self, first_index: int, data: bytes, total_chunks: int) -> list[bytes]:
        enc = self.layout.enc_chunk
        return [
            self.layout.decrypt_chunk(self.key, first_index + j, data[pos : pos + enc])
            for j, pos in enumerate(range(0, len(data), enc))
        ]

    def plain_size_of(self, body_size: int) -> int:
        recorded = self.layout.original_size
        n = self.layout.chunk_count(body_size)
        if body_size and body_size - (n - 1) * self.layout.enc_chunk <= TAG:
            raise IntegrityError(f"gateway: object length {body_size} is not a valid length")
        size = body_size - TAG * n
        if recorded is not None and recorded != size:
            raise IntegrityError(
                f"gateway: body holds {size} B but the object records {recorded} B "
                "(truncated or padded)"
            )
        return size

    def chunk_count(self, plain_size: int) -> int:
        return -(-plain_size // self.layout.chunk_size)

    def chunk_of(self, offset: int) -> int:
        return offset // self.chunk_size

    def chunk_start(self, index: int) -> int:
        return index * self.chunk_size


def chunked_layout(metadata: Mapping[str, str]) -> ChunkedLayout:
    """Parse and validate a chunked object's metadata and manifest."""
    md = normalize_metadata(metadata)
    if md.get("encrypted") != "true":
        raise FormatError("gateway: not a gateway single-PUT object")
    if md.get("encryption-fallback"):
        raise FormatError("gateway: metadata-fallback objects are not supported")
    if md.get("encryption-chunked") != "true":
        raise FormatError("gateway: only the chunked format is supported")
    if md.get("compression-enabled") == "true":
        raise FormatError("gateway: compressed chunked objects are not supported")
    alg = md.get("encryption-algorithm") or ALG_AES
    if alg not in (ALG_AES, ALG_CHACHA):
        raise FormatError(f"gateway: unknown algorithm {alg!r}")
    raw = b64d(md.get("encryption-manifest", ""), "manifest")
    man = manifest_v1(raw, "manifest")
    cs = man.get("cs")
    if not isinstance(cs, int) or isinstance(cs, bool) or not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise FormatError(f"gateway: bad chunk size {cs!r}")
    iv_b64 = man.get("iv")
    if not isinstance(iv_b64, str):
        raise FormatError("gateway: manifest lacks iv")
    iv = b64d(iv_b64, "manifest iv")
    if len(iv) != NONCE:
        raise FormatError("gateway: base IV must be 12 B")
    ivd = man.get("ivd")
    return ChunkedLayout(cs, iv, ivd if isinstance(ivd, str) else None, alg, recorded_size(md))
