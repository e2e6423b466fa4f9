"""The gateway's single-AEAD format (§4.2): the whole body is one AEAD, maybe gzipped inside."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from s3cryptfs.errors import FormatError, IntegrityError
from s3cryptfs.format.gateway.metadata import (
    ALG_AES,
    ALG_CHACHA,
    NONCE,
    TAG,
    b64d,
    normalize_metadata,
    recorded_size,
)
from s3cryptfs.limits import check_size


def _aad_fields(md: Mapping[str, str], alg: str, salt: bytes, iv: bytes) -> list[bytes]:
    return [
        alg.encode(),
        salt,
        iv,
        md.get("encryption-key-version", "").encode(),
        md.get("encryption-content-type", "").encode(),
        md.get("encryption-original-size", "").encode(),
    ]


def single_aads(md: Mapping[str, str], alg: str, salt: bytes, iv: bytes) -> list[bytes | None]:
    """The AADs a single-AEAD object may have been sealed with, newest first (§4.2)."""
    fields = _aad_fields(md, alg, salt, iv)
    current = b"".join(struct.pack(">I", len(f)) + f for f in fields)
    legacy = f"alg:{alg}|salt:{base64.b64encode(salt).decode()}|iv:{base64.b64encode(iv).decode()}"
    for tag, value in (("kv", fields[3]), ("ct", fields[4]), ("osz", fields[5])):
        if value:
            legacy += f"|{tag}:{value.decode()}"
    aads: list[bytes | None] = [current, legacy.encode()]
    if md.get("enc-legacy-no-aad") == "true":
        aads.append(None)
    return aads


class SingleCipher:
    """A single-AEAD gateway object: one chunk that is the whole body (maybe gzipped inside).

    Its plaintext size is authenticated (it is in the AAD) when recorded. Its one tag covers
    the whole body, so the whole body is downloaded before a byte of it can be checked:
    *max_body* bounds that download (a body of more bytes is refused before it is fetched).
    *name* is the object's key, for that refusal."""

    header_len = 0

    def __init__(
        self,
        metadata: Mapping[str, str],
        key: bytes,
        max_body: int | None = None,
        name: str = "",
    ) -> None:
        md = normalize_metadata(metadata)
        if md.get("encryption-fallback"):
            raise FormatError("gateway: metadata-fallback objects are not supported")
        self.alg = md.get("encryption-algorithm") or ALG_AES
        if self.alg not in (ALG_AES, ALG_CHACHA):
            raise FormatError(f"gateway: unknown algorithm {self.alg!r}")
        self.iv = b64d(md.get("encryption-iv", ""), "iv")
        if len(self.iv) != NONCE:
            raise FormatError("gateway: iv must be 12 B")
        salt_b64 = md.get("encryption-key-salt", "")
        self.salt = b64d(salt_b64, "salt") if salt_b64 else b""
        self.md = md
        self.key = key
        self.compressed = md.get("compression-enabled") == "true"
        if self.compressed and md.get("compression-algorithm", "gzip") != "gzip":
            raise FormatError("gateway: unknown compression algorithm")
        self.recorded = recorded_size(md)
        self._size = self.recorded
        self.max_body = max_body
        self.name = name

    @property
    def chunk_size(self) -> int:
        return max(1, self._size or 1)

    def span(self, first: int, last: int, body_size: int) -> tuple[int, int]:
        self._check_body(body_size)  # (the whole body is fetched)
        return 0, body_size - 1

    def _check_body(self, body_size: int) -> None:
        if self.max_body is not None:
            check_size("gateway single-AEAD object", self.name, body_size, self.max_body)

    def open_range(self, first_index: int, data: bytes, total_chunks: int) -> list[bytes]:
        aead = AESGCM(self.key) if self.alg == ALG_AES else ChaCha20Poly1305(self.key)
        for aad in single_aads(self.md, self.alg, self.salt, self.iv):
            try:
                plain = aead.decrypt(self.iv, data, aad)
                break
            except InvalidTag:
                continue
        else:
            raise IntegrityError("gateway: object failed authentication")
        if self.compressed:
            plain = _gunzip(plain, (self._size or 0) + 65536)
        if self._size is not None and len(plain) != self._size:
            raise IntegrityError(
                f"gateway: plaintext is {len(plain)} B but the object records {self._size} B"
            )
        return [plain]

    def plain_size_of(self, body_size: int) -> int:
        if body_size < TAG:
            raise IntegrityError(f"gateway: object length {body_size} is too short")
        self._check_body(body_size)  # every reader asks for the size before it fetches
        if self._size is None:
            if self.compressed:
                raise FormatError("gateway: compressed object records no size")
            self._size = body_size - TAG
        return self._size

    def chunk_count(self, plain_size: int) -> int:
        return 1 if plain_size else 0

    def chunk_of(self, offset: int) -> int:
        return 0

    def chunk_start(self, index: int) -> int:
        return 0


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress at most *limit* bytes: a forged size must not make us inflate a bomb."""
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise IntegrityError(f"gateway: bad gzip data: {e}") from e
    if len(out) > limit or d.unconsumed_tail:
        raise IntegrityError("gateway: decompressed data is larger than recorded")
    return out
