"""Writing gateway objects (§6): chunked, HKDF nonces, the metadata set the gateway 0.8 reads.

``seal_chunked_stream`` is what a gateway-format volume writes, with a data key wrapped by one
of the gateway's key managers; ``encrypt_chunked`` builds whole objects (tests, benchmarks).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from s3cryptfs.errors import FormatError
from s3cryptfs.format.gateway.chunked import ChunkedCipher, ChunkedLayout, chunk_nonce
from s3cryptfs.format.gateway.keywrap import pbkdf2, wrap_password_dek
from s3cryptfs.format.gateway.metadata import (
    ALG_AES,
    ALG_CHACHA,
    DEFAULT_ITERATIONS,
    KEY,
    LEGACY_ITERATIONS,
    MAX_CHUNK,
    MAX_ITERATIONS,
    MIN_CHUNK,
    NONCE,
    SALT,
)
from s3cryptfs.format.v1 import read_full


def encrypt_chunked(
    plaintext: bytes,
    password: str | bytes,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    chunk_size: int = 65536,
    algorithm: str = ALG_AES,
    wrap: bool = False,
    salt: bytes | None = None,
    base_iv: bytes | None = None,
    dek: bytes | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Write a chunked gateway object (§6). Returns (body, user metadata).

    wrap=False: password-direct (PBKDF2 key; any gateway engine with the password reads it).
    wrap=True: random DEK wrapped with provider ``password`` (the default 0.8 server reads it).
    """
    if algorithm not in (ALG_AES, ALG_CHACHA):
        raise ValueError(f"unknown algorithm {algorithm!r}")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError("chunk size must be within 16384..1048576")
    salt = os.urandom(SALT) if salt is None else salt
    base_iv = os.urandom(NONCE) if base_iv is None else base_iv
    dek = os.urandom(KEY) if dek is None else dek
    key = dek if wrap else pbkdf2(password, salt, iterations)
    aead = AESGCM(key) if algorithm == ALG_AES else ChaCha20Poly1305(key)
    chunks = []
    for i, pos in enumerate(range(0, len(plaintext), chunk_size)):
        nonce = chunk_nonce(base_iv, i, "hkdf-sha256")
        chunks.append(aead.encrypt(nonce, plaintext[pos : pos + chunk_size], None))
    iv_b64 = base64.b64encode(base_iv).decode()
    manifest = json.dumps(
        {"v": 1, "cs": chunk_size, "cc": 0, "iv": iv_b64, "ivd": "hkdf-sha256"},
        separators=(",", ":"),
    )
    md = {
        "encrypted": "true",
        "encryption-algorithm": algorithm,
        "encryption-key-salt": base64.b64encode(salt).decode(),
        "encryption-iv": iv_b64,
        "encryption-chunked": "true",
        "encryption-chunk-size": str(chunk_size),
        "encryption-manifest": base64.b64encode(manifest.encode()).decode(),
        "enc-iv-deriv": "hkdf-sha256",
        "encryption-kdf-params": f"pbkdf2-sha256:{iterations}",
        "original-content-length": str(len(plaintext)),
    }
    if plaintext:
        md["encryption-original-size"] = str(len(plaintext))
    if wrap:
        blob = wrap_password_dek(key, password, iterations)
        md["encryption-wrapped-key"] = base64.b64encode(blob).decode()
        md["encryption-kms-provider"] = "password"
        md["encryption-key-version"] = "1"
    return b"".join(chunks), md


# --- streaming writer (what a gateway-format volume writes) -----------------------------------


@dataclass(frozen=True)
class WriteSettings:
    """How a gateway-format volume writes new objects (from its descriptor)."""

    # "password" (the 0.8 server's single-password mode), "memory", or "cosmian-kmip" (the
    # volume's own KMIP key manager, which wraps as the gateway's Cosmian provider does)
    wrap: str = "password"
    iterations: int = DEFAULT_ITERATIONS
    algorithm: str = ALG_AES
    chunk_size: int = 65536

    @staticmethod
    def from_dict(doc: Mapping[str, Any]) -> WriteSettings:
        s = WriteSettings(
            wrap=str(doc.get("wrap", "password")),
            iterations=int(doc.get("iterations", DEFAULT_ITERATIONS)),
            algorithm=str(doc.get("algorithm", ALG_AES)),
            chunk_size=int(doc.get("chunk_size", 65536)),
        )
        if s.wrap not in ("password", "memory", "cosmian-kmip"):
            raise FormatError(f"gateway: cannot write with key wrap {s.wrap!r}")
        if not LEGACY_ITERATIONS <= s.iterations <= MAX_ITERATIONS:
            raise FormatError("gateway: iterations must be within 100000..2000000")
        if s.algorithm not in (ALG_AES, ALG_CHACHA):
            raise FormatError(f"gateway: unknown algorithm {s.algorithm!r}")
        if not MIN_CHUNK <= s.chunk_size <= MAX_CHUNK:
            raise FormatError("gateway: chunk size must be within 16384..1048576")
        return s


def seal_chunked_stream(
    src: BinaryIO,
    dst: BinaryIO,
    dek: bytes,
    settings: WriteSettings,
    envelope: Mapping[str, str],
) -> tuple[dict[str, str], int, int, ChunkedCipher]:
    """Encrypt *src* into *dst* as a chunked gateway object (§6, HKDF nonces).
    *envelope*: the metadata of *dek* wrapped by a key manager (format/metadata.py
    ``encode_envelope``: the gateway's names).

    Returns (user metadata, plaintext bytes, body bytes, a cipher to read the body back)."""
    base_iv = os.urandom(NONCE)
    cs = settings.chunk_size
    aead = AESGCM(dek) if settings.algorithm == ALG_AES else ChaCha20Poly1305(dek)
    plain = body = 0
    index = 0
    while True:
        chunk = read_full(src, cs)
        if not chunk:
            break
        sealed = aead.encrypt(chunk_nonce(base_iv, index, "hkdf-sha256"), chunk, None)
        dst.write(sealed)
        plain += len(chunk)
        body += len(sealed)
        index += 1
    iv_b64 = base64.b64encode(base_iv).decode()
    manifest = json.dumps(
        {"v": 1, "cs": cs, "cc": 0, "iv": iv_b64, "ivd": "hkdf-sha256"}, separators=(",", ":")
    )
    md = {
        "encrypted": "true",
        "encryption-algorithm": settings.algorithm,
        # Unused by a reader of a wrapped DEK, but part of the gateway's set (§6).
        "encryption-key-salt": base64.b64encode(os.urandom(SALT)).decode(),
        "encryption-iv": iv_b64,
        "encryption-chunked": "true",
        "encryption-chunk-size": str(cs),
        "encryption-manifest": base64.b64encode(manifest.encode()).decode(),
        "enc-iv-deriv": "hkdf-sha256",
        "encryption-kdf-params": f"pbkdf2-sha256:{settings.iterations}",
        "encryption-original-size": str(plain),
        "original-content-length": str(plain),
        **envelope,
    }
    layout = ChunkedLayout(cs, base_iv, "hkdf-sha256", settings.algorithm, plain)
    return md, plain, body, ChunkedCipher(layout, dek)
