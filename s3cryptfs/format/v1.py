"""Object format 1: a header and AES-256-GCM chunks. docs/FORMAT.md is the normative text.

    body    = header || chunk_0 || ... || chunk_{n-1}            (n >= 1, always)
    header  = "S3CF" || version (1) || algorithm (1) || 00 00 || chunk_size (u32 BE)
              || file_id (16 random bytes)                        (28 bytes)
    key     = HKDF-SHA256(IKM = DEK, salt = "", info = "s3cryptfs v1 content" || file_id, 32)
    chunk_i = AES-256-GCM(key, nonce = 00000000 || u64 BE(i), P_i,
                          AAD = header || u64 BE(i) || last)      (len(P_i) + 16 bytes)

Every chunk but the last holds exactly chunk_size plaintext bytes; the last holds 0..chunk_size
(0 only when the whole file is empty) and has last = 01. So the plaintext size follows from the
body length alone, and truncation, reordering and splicing all fail authentication.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from s3cryptfs.errors import FormatError, IntegrityError

MAGIC = b"S3CF"
VERSION = 1
ALG_AES256GCM = 1
HEADER_LEN = 28
TAG_LEN = 16
DEK_LEN = 32
FILE_ID_LEN = 16
MIN_CHUNK = 4096
MAX_CHUNK = 8 * 1024 * 1024
DEFAULT_CHUNK = 64 * 1024
_HEADER = struct.Struct(">4sBB2sI16s")


@dataclass(frozen=True)
class Header:
    chunk_size: int
    file_id: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, ALG_AES256GCM, b"\0\0", self.chunk_size, self.file_id)

    @staticmethod
    def decode(raw: bytes) -> Header:
        if len(raw) < HEADER_LEN:
            raise IntegrityError(f"object is shorter ({len(raw)} bytes) than the format header")
        magic, version, alg, reserved, chunk_size, file_id = _HEADER.unpack(raw[:HEADER_LEN])
        if magic != MAGIC:
            raise FormatError("object does not start with the s3cryptfs magic")
        if version != VERSION:
            raise FormatError(f"object format version {version} is not supported")
        if alg != ALG_AES256GCM or reserved != b"\0\0":
            raise FormatError(f"object algorithm {alg} / reserved bytes not supported")
        check_chunk_size(chunk_size)
        return Header(chunk_size, file_id)

    @staticmethod
    def new(chunk_size: int = DEFAULT_CHUNK) -> Header:
        check_chunk_size(chunk_size)
        return Header(chunk_size, os.urandom(FILE_ID_LEN))


def check_chunk_size(chunk_size: int) -> None:
    if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
        raise FormatError(f"chunk size {chunk_size} is not a power of two in 4 KiB..8 MiB")


# --- size arithmetic ------------------------------------------------------------------------


def chunk_count(plain_size: int, chunk_size: int) -> int:
    return max(1, -(-plain_size // chunk_size))


def cipher_size(plain_size: int, chunk_size: int) -> int:
    """Body length of an object holding *plain_size* bytes."""
    return HEADER_LEN + plain_size + TAG_LEN * chunk_count(plain_size, chunk_size)


def max_plain_size(body_max: int, chunk_size: int) -> int:
    """The largest plaintext whose body is at most *body_max* bytes long."""
    stride = chunk_size + TAG_LEN
    full, rest = divmod(body_max - HEADER_LEN, stride)
    return full * chunk_size + max(0, rest - TAG_LEN)


def plain_size(body_size: int, chunk_size: int) -> int:
    """Plaintext length of a *body_size*-byte body; IntegrityError if no body has that length."""
    payload = body_size - HEADER_LEN
    if payload < TAG_LEN:
        raise IntegrityError(f"object of {body_size} bytes is too short to be valid")
    stride = chunk_size + TAG_LEN
    n = -(-payload // stride)
    last = payload - (n - 1) * stride
    if last < TAG_LEN or (last == TAG_LEN and n > 1):
        raise IntegrityError(f"object length {body_size} is not a valid encrypted length")
    return payload - n * TAG_LEN


def chunk_span(index: int, chunk_size: int) -> tuple[int, int]:
    """(offset, max length) of encrypted chunk *index* in the body."""
    stride = chunk_size + TAG_LEN
    return HEADER_LEN + index * stride, stride


# --- crypto -----------------------------------------------------------------------------------


def content_key(dek: bytes, file_id: bytes) -> bytes:
    if len(dek) != DEK_LEN:
        raise IntegrityError("data key has the wrong length")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"s3cryptfs v1 content" + file_id
    ).derive(dek)


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + index.to_bytes(8, "big")


def _aad(header_raw: bytes, index: int, last: bool) -> bytes:
    return header_raw + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00")


class ChunkCipher:
    """Seals and opens the chunks of one object version."""

    def __init__(self, dek: bytes, header: Header) -> None:
        self.header = header
        self._raw = header.encode()
        self._aead = AESGCM(content_key(dek, header.file_id))

    header_len = HEADER_LEN

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    # The body-layout interface the block cache reads through (shared with foreign formats).

    def span(self, first: int, last: int, body_size: int) -> tuple[int, int]:
        """Body bytes [start, end] (inclusive) holding chunks *first*..*last*."""
        stride = self.chunk_size + TAG_LEN
        end = min(HEADER_LEN + (last + 1) * stride, body_size) - 1
        return HEADER_LEN + first * stride, end

    def plain_size_of(self, body_size: int) -> int:
        return plain_size(body_size, self.chunk_size)

    def chunk_count(self, plain_size: int) -> int:
        return chunk_count(plain_size, self.chunk_size)

    def chunk_of(self, offset: int) -> int:
        return offset // self.chunk_size

    def chunk_start(self, index: int) -> int:
        return index * self.chunk_size

    def seal(self, index: int, plaintext: bytes, last: bool) -> bytes:
        return self._aead.encrypt(_nonce(index), plaintext, _aad(self._raw, index, last))

    def seal_into(self, index: int, plaintext: memoryview, last: bool, out: memoryview) -> None:
        """seal() into *out* (exactly len(plaintext) + TAG_LEN bytes), for callers that
        assemble many chunks in one buffer without a copy per chunk."""
        self._aead.encrypt_into(_nonce(index), plaintext, _aad(self._raw, index, last), out)

    def open(self, index: int, sealed: bytes | memoryview, last: bool) -> bytes:
        try:
            return self._aead.decrypt(_nonce(index), sealed, _aad(self._raw, index, last))
        except InvalidTag:
            raise IntegrityError(f"chunk {index} failed authentication") from None

    def open_range(self, first_index: int, data: bytes, total_chunks: int) -> list[bytes]:
        """Decrypt consecutive encrypted chunks starting at *first_index*."""
        stride = self.chunk_size + TAG_LEN
        view = memoryview(data)  # (a slice of bytes would copy each chunk once more)
        out = []
        for pos in range(0, len(data), stride):
            index = first_index + pos // stride
            out.append(self.open(index, view[pos : pos + stride], index == total_chunks - 1))
        return out


def read_full(src: BinaryIO, size: int) -> bytes:
    """Read *size* bytes, fewer only at end of file (a raw stream may return short reads)."""
    data = src.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    missing = size - len(data)
    while missing:
        more = src.read(missing)
        if not more:
            break
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)


def encrypt_stream(
    dek: bytes, src: BinaryIO, dst: BinaryIO, chunk_size: int = DEFAULT_CHUNK
) -> tuple[int, int]:
    """Encrypt all of *src* into *dst*. Returns (plaintext bytes, body bytes)."""
    header = Header.new(chunk_size)
    cipher = ChunkCipher(dek, header)
    dst.write(header.encode())
    written = HEADER_LEN
    total = 0
    index = 0
    current = read_full(src, chunk_size)
    while True:
        following = read_full(src, chunk_size) if len(current) == chunk_size else b""
        last = not following
        sealed = cipher.seal(index, current, last)
        dst.write(sealed)
        written += len(sealed)
        total += len(current)
        if last:
            return total, written
        index += 1
        current = following


def encrypt_bytes(dek: bytes, data: bytes, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    import io

    out = io.BytesIO()
    encrypt_stream(dek, io.BytesIO(data), out, chunk_size)
    return out.getvalue()


def decrypt_bytes(dek: bytes, body: bytes) -> bytes:
    """Decrypt a whole body (for tools and tests; the mount decrypts chunk ranges)."""
    return b"".join(iter_decrypt(dek, body))


def iter_decrypt(dek: bytes, body: bytes) -> Iterator[bytes]:
    header = Header.decode(body)
    size = plain_size(len(body), header.chunk_size)
    n = chunk_count(size, header.chunk_size)
    cipher = ChunkCipher(dek, header)
    yield from cipher.open_range(0, body[HEADER_LEN:], n)
