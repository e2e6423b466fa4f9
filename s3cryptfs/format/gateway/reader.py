"""Reading a single-PUT gateway object: the cipher of its body, or its whole plaintext."""

from __future__ import annotations

from collections.abc import Mapping

from s3cryptfs.errors import FormatError, IntegrityError
from s3cryptfs.format.gateway.chunked import ChunkedCipher, chunked_layout
from s3cryptfs.format.gateway.keywrap import data_key
from s3cryptfs.format.gateway.metadata import normalize_metadata
from s3cryptfs.format.gateway.single import SingleCipher


def body_cipher(
    metadata: Mapping[str, str],
    *,
    password: str | bytes | None = None,
    master_key: bytes | str | None = None,
    key: bytes | None = None,
    max_body: int | None = None,
    name: str = "",
) -> ChunkedCipher | SingleCipher:
    """The reader of a single-PUT gateway object (chunked or single AEAD); *max_body* and
    *name*: see SingleCipher."""
    md = normalize_metadata(metadata)
    if md.get("encrypted-mpu") == "true" and md.get("encrypted") != "true":
        raise FormatError("gateway: an encrypted multipart object needs its manifest")
    if key is None:
        key = data_key(md, password=password, master_key=master_key)
    if md.get("encryption-chunked") == "true":
        return ChunkedCipher(chunked_layout(md), key)
    return SingleCipher(md, key, max_body, name)


def decrypt_all(
    metadata: Mapping[str, str],
    body: bytes,
    *,
    password: str | bytes | None = None,
    master_key: bytes | str | None = None,
) -> bytes:
    """Decrypt a whole chunked object and check its size against the recorded size."""
    layout = chunked_layout(metadata)
    key = data_key(metadata, password=password, master_key=master_key)
    pt = layout.decrypt_range(key, 0, body)
    if layout.original_size is not None and len(pt) != layout.original_size:
        raise IntegrityError(
            f"gateway: plaintext is {len(pt)} B but the object records {layout.original_size} B"
        )
    return pt
