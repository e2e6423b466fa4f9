"""What the block cache needs to know about an object body, whatever its format.

A body is a run of chunks, each one authenticated on its own (or, for formats without chunks,
one chunk that is the whole body). The reader asks the cipher of a version where chunks lie,
how many there are and how big the plaintext is, and hands it the bytes to open. Our own format
(v1), the gateway's formats and (when a volume allows it) plain objects implement it.
"""

from __future__ import annotations

from typing import Protocol

PLAIN_CHUNK = 1024 * 1024


class BodyCipher(Protocol):
    header_len: int  # bytes at the start of the body the cipher was built from

    @property
    def chunk_size(self) -> int: ...

    def span(self, first: int, last: int, body_size: int) -> tuple[int, int]:
        """Body bytes [start, end] (inclusive) holding chunks *first*..*last*."""
        ...

    def open_range(self, first_index: int, data: bytes, total_chunks: int) -> list[bytes]:
        """Plaintext of the consecutive chunks in *data*; IntegrityError if one is forged."""
        ...

    def plain_size_of(self, body_size: int) -> int:
        """Plaintext length of a body of *body_size* bytes; IntegrityError if impossible."""
        ...

    def chunk_count(self, plain_size: int) -> int: ...

    def chunk_of(self, offset: int) -> int:
        """The chunk holding plaintext byte *offset* (chunks may differ in size)."""
        ...

    def chunk_start(self, index: int) -> int:
        """The plaintext offset where chunk *index* begins."""
        ...


class PlainCipher:
    """An unencrypted object, read as is: only where the volume says plaintext is allowed."""

    header_len = 0
    chunk_size = PLAIN_CHUNK

    def span(self, first: int, last: int, body_size: int) -> tuple[int, int]:
        return first * PLAIN_CHUNK, min((last + 1) * PLAIN_CHUNK, body_size) - 1

    def open_range(self, first_index: int, data: bytes, total_chunks: int) -> list[bytes]:
        return [data[pos : pos + PLAIN_CHUNK] for pos in range(0, len(data), PLAIN_CHUNK)]

    def plain_size_of(self, body_size: int) -> int:
        return body_size

    def chunk_count(self, plain_size: int) -> int:
        return -(-plain_size // PLAIN_CHUNK)

    def chunk_of(self, offset: int) -> int:
        return offset // self.chunk_size

    def chunk_start(self, index: int) -> int:
        return index * self.chunk_size
