"""The gateway's encrypted multipart objects (§5): parts of AEAD chunks whose sizes and data
key are in a companion manifest object, ``<key>.mpu-manifest``, itself a gateway object."""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from s3cryptfs.errors import FormatError, IntegrityError, InvalidEnvelope
from s3cryptfs.format.envelope import KeyEnvelope
from s3cryptfs.format.gateway.metadata import (
    ALG_AES,
    ALG_CHACHA,
    MAX_CHUNK,
    MIN_CHUNK,
    NONCE,
    TAG,
    manifest_v1,
    normalize_metadata,
)

MPU_SUFFIX = ".mpu-manifest"


def is_mpu_object(metadata: Mapping[str, str]) -> bool:
    md = normalize_metadata(metadata)
    return md.get("encrypted-mpu") == "true" and md.get("encrypted") != "true"


def mpu_manifest_key(key: str, metadata: Mapping[str, str]) -> str:
    """Where the manifest of MPU object *key* lives. Only ``<key>.mpu-manifest`` is accepted:
    a pointer elsewhere could hand this object another object's manifest (and key)."""
    ptr = normalize_metadata(metadata).get("encryption-fallback-ptr")
    expected = key + MPU_SUFFIX
    if ptr and ptr != expected:
        raise FormatError(f"gateway: multipart manifest pointer {ptr!r} is not {expected!r}")
    return expected


def mpu_iv(dek: bytes, uid_hash: bytes, iv_prefix: bytes, part: int, chunk: int) -> bytes:
    """IV of chunk *chunk* of part *part*: HKDF-SHA256(IKM=DEK, salt=sha256(uploadId),
    info=iv_prefix || BE32(part) || BE32(chunk)), 12 bytes."""
    info = iv_prefix + struct.pack(">II", part, chunk)
    return HKDF(algorithm=hashes.SHA256(), length=NONCE, salt=uid_hash, info=info).derive(dek)


@dataclass(frozen=True)
class MpuPart:
    number: int
    plain_len: int
    enc_len: int
    chunks: int


@dataclass(frozen=True)
class MpuManifest:
    algorithm: str
    chunk_size: int
    iv_prefix: bytes
    uid_hash: bytes
    envelope: dict[str, object]  # the gateway's KeyEnvelope JSON
    parts: tuple[MpuPart, ...]
    total_plain: int


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FormatError(f"gateway: multipart manifest: bad {what}")
    return value


def parse_mpu_manifest(raw: bytes) -> MpuManifest:
    """Parse and check a decrypted ``.mpu-manifest`` (every length is re-derived)."""
    doc = manifest_v1(raw, "multipart manifest")
    alg = doc.get("alg") or ALG_AES
    alg = ALG_AES if alg == "AES256GCM" else alg  # the name before 0.6.4
    if alg not in (ALG_AES, ALG_CHACHA):
        raise FormatError(f"gateway: unknown algorithm {alg!r}")
    cs = _int(doc.get("cs"), "chunk size")
    if not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise FormatError("gateway: multipart manifest: chunk size out of range")
    try:
        iv_prefix = bytes.fromhex(str(doc.get("iv_prefix", "")))
    except ValueError as e:
        raise FormatError("gateway: multipart manifest: iv_prefix is not hex") from e
    if len(iv_prefix) != NONCE:
        raise FormatError("gateway: multipart manifest: iv_prefix must be 12 B")
    uid = str(doc.get("uid_hash", ""))
    try:
        uid_hash = base64.b64decode(uid, validate=True)
    except (binascii.Error, ValueError):
        try:
            uid_hash = base64.urlsafe_b64decode(uid)
        except (binascii.Error, ValueError) as e:
            raise FormatError("gateway: multipart manifest: bad uid_hash") from e
    if len(uid_hash) != 32:
        raise FormatError("gateway: multipart manifest: uid_hash must be 32 B")
    wrapped = doc.get("wrapped_dek")
    try:
        envelope = json.loads(wrapped) if isinstance(wrapped, str) else None
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict):
        raise FormatError("gateway: multipart manifest: bad wrapped_dek")
    parts = []
    last_number = 0
    for entry in doc.get("parts") or []:
        if not isinstance(entry, dict):
            raise FormatError("gateway: multipart manifest: bad part")
        part = MpuPart(
            _int(entry.get("pn"), "part number"),
            _int(entry.get("plain_len"), "part length"),
            _int(entry.get("enc_len"), "part length"),
            _int(entry.get("chunks"), "chunk count"),
        )
        if part.number <= last_number or part.number > 10_000:
            raise FormatError("gateway: multipart manifest: parts out of order")
        last_number = part.number
        if part.chunks != -(-part.plain_len // cs) or part.enc_len != part.plain_len + TAG * (
            part.chunks
        ):
            raise FormatError(f"gateway: multipart manifest: part {part.number} is inconsistent")
        parts.append(part)
    total = _int(doc.get("total_plain"), "total")
    if total != sum(p.plain_len for p in parts):
        raise FormatError("gateway: multipart manifest: total does not match its parts")
    return MpuManifest(alg, cs, iv_prefix, uid_hash, envelope, tuple(parts), total)


def mpu_envelope(manifest: MpuManifest) -> KeyEnvelope:
    """The envelope of the manifest's data key (the gateway's KeyEnvelope JSON, §5)."""
    env = manifest.envelope
    try:
        blob = base64.b64decode(str(env.get("Ciphertext", "")), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidEnvelope("gateway: multipart wrapped key is not base64") from e
    version = env.get("KeyVersion", 0)
    return KeyEnvelope(
        str(env.get("KeyID", "")),
        version if isinstance(version, int) else 0,
        str(env.get("Provider", "")),
        blob,
    )


class MpuCipher:
    """An encrypted multipart object: parts of 64 KiB chunks, each part's last chunk short, so
    chunks differ in size (the reader maps offsets through chunk_of/chunk_start)."""

    header_len = 0

    def __init__(self, manifest: MpuManifest, dek: bytes) -> None:
        self.manifest = manifest
        self.key = dek
        self._aead = AESGCM(dek) if manifest.algorithm == ALG_AES else ChaCha20Poly1305(dek)
        # per chunk: (plaintext offset, body offset, encrypted length, part number, index)
        self._table: list[tuple[int, int, int, int, int]] = []
        plain = body = 0
        cs = manifest.chunk_size
        for part in manifest.parts:
            for k in range(part.chunks):
                n = min(cs, part.plain_len - k * cs)
                self._table.append((plain, body, n + TAG, part.number, k))
                plain += n
                body += n + TAG
        self._starts = [row[0] for row in self._table]
        self._body = body

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    def span(self, first: int, last: int, body_size: int) -> tuple[int, int]:
        row = self._table[last]
        return self._table[first][1], row[1] + row[2] - 1

    def open_range(self, first_index: int, data: bytes, total_chunks: int) -> list[bytes]:
        m = self.manifest
        out = []
        pos = 0
        for index in range(first_index, len(self._table)):
            if pos >= len(data):
                break
            _, _, length, part, k = self._table[index]
            nonce = mpu_iv(self.key, m.uid_hash, m.iv_prefix, part, k)
            try:
                out.append(self._aead.decrypt(nonce, data[pos : pos + length], None))
            except InvalidTag as e:
                raise IntegrityError(f"gateway: part {part} chunk {k} failed authentication") from e
            pos += length
        return out

    def plain_size_of(self, body_size: int) -> int:
        if body_size != self._body:
            raise IntegrityError(
                f"gateway: multipart body is {body_size} B but its manifest says {self._body} B"
            )
        return self.manifest.total_plain

    def chunk_count(self, plain_size: int) -> int:
        return len(self._table)

    def chunk_of(self, offset: int) -> int:
        return max(0, bisect.bisect_right(self._starts, offset) - 1)

    def chunk_start(self, index: int) -> int:
        return self._starts[index] if index < len(self._starts) else self.manifest.total_plain
