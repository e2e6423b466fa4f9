"""Reader (and writer) for objects of the Go "S3 Encryption Gateway" (chunked format).

Pure: imports nothing from FUSE, trio or boto3. The format is described in
/work/shared/reference/gateway-format.md (§1-§4, §12); docs/INTEROP.md says what is supported.
Chunked, single-AEAD and encrypted multipart objects are read; fallback objects raise
FormatError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from s3cryptfs.errors import (
    FormatError,
    IntegrityError,
    InvalidEnvelope,
    KeyNotFound,
    UnwrapFailed,
    WrongPasswordError,
)
from s3cryptfs.format.v1 import read_full
from s3cryptfs.limits import check_size

TAG = 16
NONCE = 12
KEY = 32
SALT = 32
LEGACY_ITERATIONS = 100_000
MIN_CHUNK = 16_384
MAX_CHUNK = 1_048_576
# Work factors read from metadata (anyone who can write to the bucket sets them) are refused
# above this: the gateway's own bound on wrapped keys, so every object it can read passes.
MAX_ITERATIONS = 2_000_000

ALG_AES = "AES256-GCM"
ALG_CHACHA = "ChaCha20-Poly1305"

# Compact aliases (§1) -> full key names.
_COMPACT = {
    "e": "encrypted",
    "a": "encryption-algorithm",
    "s": "encryption-key-salt",
    "i": "encryption-iv",
    "os": "encryption-original-size",
    "oe": "encryption-original-etag",
    "ct": "encryption-content-type",
    "kdf": "encryption-kdf-params",
    "wk": "encryption-wrapped-key",
    "kid": "encryption-kms-id",
    "kp": "encryption-kms-provider",
    "kv": "encryption-key-version",
    "c": "encryption-chunked",
    "cs": "encryption-chunk-size",
    "m": "encryption-manifest",
    "cc": "encryption-chunk-count",
    "ce": "compression-enabled",
    "ca": "compression-algorithm",
    "cos": "compression-original-size",
}

_PREFIX = "x-amz-meta-"


def normalize_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Lower-case names, strip ``x-amz-meta-``, expand compact aliases (full names win)."""
    out: dict[str, str] = {}
    for k, v in metadata.items():
        k = k.lower()
        if k.startswith(_PREFIX):
            k = k[len(_PREFIX) :]
        out[k] = v
    for short, full in _COMPACT.items():
        if short in out and full not in out:
            out[full] = out[short]
    return out


def is_gateway_object(metadata: Mapping[str, str]) -> bool:
    """True if *metadata* marks a gateway-encrypted object (single PUT or encrypted MPU)."""
    md = normalize_metadata(metadata)
    if "s3cryptfs-format" in md:
        return False
    return md.get("encrypted") == "true" or md.get("encrypted-mpu") == "true"


# --- helpers ---------------------------------------------------------------------------


def _b64d(value: str, what: str, exc: type[Exception] = FormatError) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise exc(f"gateway: {what} is not valid base64") from e


def _pw_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


class _LRU:
    def __init__(self, size: int) -> None:
        self._size = size
        self._d: OrderedDict[tuple[bytes, bytes, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, k: tuple[bytes, bytes, int]) -> bytes | None:
        with self._lock:
            v = self._d.get(k)
            if v is not None:
                self._d.move_to_end(k)
            return v

    def put(self, k: tuple[bytes, bytes, int], v: bytes) -> None:
        with self._lock:
            self._d[k] = v
            self._d.move_to_end(k)
            while len(self._d) > self._size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


_PBKDF2_CACHE = _LRU(64)


def pbkdf2(password: str | bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA256, 32 B, cached per (password, salt, iterations)."""
    pw = _pw_bytes(password)
    k = (hashlib.sha256(pw).digest(), salt, iterations)
    v = _PBKDF2_CACHE.get(k)
    if v is None:
        v = hashlib.pbkdf2_hmac("sha256", pw, salt, iterations, KEY)
        _PBKDF2_CACHE.put(k, v)
    return v


def parse_kdf_params(value: str | None) -> int:
    """Iterations from ``encryption-kdf-params`` (absent/empty -> 100000)."""
    if not value:
        return LEGACY_ITERATIONS
    parts = value.split(":")
    if len(parts) != 2 or parts[0] != "pbkdf2-sha256":
        raise FormatError(f"gateway: unsupported kdf params {value!r}")
    try:
        n = int(parts[1], 10)
    except ValueError as e:
        raise FormatError(f"gateway: bad kdf iterations {value!r}") from e
    if not LEGACY_ITERATIONS <= n <= MAX_ITERATIONS:
        raise FormatError(f"gateway: kdf iterations {n} out of range (100000..2000000)")
    return n


def parse_master_key(material: str | bytes) -> bytes:
    """The gateway's parsing of a memory master key: hex iff 32/48/64 hex chars, else raw."""
    raw = material.encode("utf-8") if isinstance(material, str) else bytes(material)
    if len(raw) in (32, 48, 64):
        try:
            key = bytes.fromhex(raw.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            key = raw
    else:
        key = raw
    if len(key) not in (16, 24, 32):
        raise InvalidEnvelope(f"gateway: memory master key must be 16/24/32 B, got {len(key)}")
    return key


# --- key unwrapping ------------------------------------------------------------------------


def _gcm_open_dek(kek: bytes, nonce: bytes, ct: bytes) -> bytes | None:
    try:
        return AESGCM(kek).decrypt(nonce, ct, None)
    except InvalidTag:
        return None


def unwrap_password_dek(blob: bytes, password: str | bytes) -> bytes:
    """Unwrap a provider-``password`` blob (96 B with iteration prefix, or 92 B legacy)."""
    if len(blob) < 60:
        raise InvalidEnvelope("gateway: password-wrapped key too short")
    if len(blob) >= 64:
        (it,) = struct.unpack(">I", blob[:4])
        if LEGACY_ITERATIONS <= it <= MAX_ITERATIONS:
            salt, nonce, ct = blob[4:36], blob[36:48], blob[48:]
            dek = _gcm_open_dek(pbkdf2(password, salt, it), nonce, ct)
            if dek is not None:
                return _check_dek(dek)
    salt, nonce, ct = blob[:32], blob[32:44], blob[44:]
    dek = _gcm_open_dek(pbkdf2(password, salt, LEGACY_ITERATIONS), nonce, ct)
    if dek is None:
        raise WrongPasswordError("gateway: password does not unwrap the data key")
    return _check_dek(dek)


def _check_dek(dek: bytes) -> bytes:
    if len(dek) != KEY:
        raise InvalidEnvelope(f"gateway: data key is {len(dek)} B, expected 32")
    return dek


def unwrap_memory_dek(wrapped: bytes, master_key: bytes | str) -> bytes:
    """RFC 3394 unwrap under the memory provider's master key (raw bytes or config string)."""
    kek = (
        master_key
        if isinstance(master_key, bytes) and len(master_key) in (16, 24, 32)
        else parse_master_key(master_key)
    )
    try:
        return _check_dek(aes_key_unwrap(kek, wrapped))
    except InvalidUnwrap as e:
        raise UnwrapFailed("gateway: memory-wrapped key does not unwrap") from e
    except ValueError as e:
        raise InvalidEnvelope(f"gateway: bad memory-wrapped key: {e}") from e


def data_key(
    metadata: Mapping[str, str],
    *,
    password: str | bytes | None = None,
    master_key: bytes | str | None = None,
) -> bytes:
    """The 32 B key that encrypts the chunks of this object."""
    md = normalize_metadata(metadata)
    wk = md.get("encryption-wrapped-key", "")
    if wk:
        blob = _b64d(wk, "wrapped key", InvalidEnvelope)
        provider = md.get("encryption-kms-provider", "")
        if provider == "password":
            if password is None:
                raise KeyNotFound("gateway: object is password-wrapped but no password given")
            return unwrap_password_dek(blob, password)
        if provider == "memory":
            if master_key is None:
                raise KeyNotFound("gateway: object is memory-wrapped but no master key given")
            return unwrap_memory_dek(blob, master_key)
        raise KeyNotFound(f"gateway: unsupported key provider {provider!r}")
    if password is None:
        raise KeyNotFound("gateway: password-direct object but no password given")
    salt = _b64d(md.get("encryption-key-salt", ""), "salt")
    if len(salt) != SALT:
        raise FormatError("gateway: salt must be 32 B")
    return pbkdf2(password, salt, parse_kdf_params(md.get("encryption-kdf-params")))


# --- chunked format ------------------------------------------------------------------------


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
        self.iv = _b64d(md.get("encryption-iv", ""), "iv")
        if len(self.iv) != NONCE:
            raise FormatError("gateway: iv must be 12 B")
        salt_b64 = md.get("encryption-key-salt", "")
        self.salt = _b64d(salt_b64, "salt") if salt_b64 else b""
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
    import zlib

    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise IntegrityError(f"gateway: bad gzip data: {e}") from e
    if len(out) > limit or d.unconsumed_tail:
        raise IntegrityError("gateway: decompressed data is larger than recorded")
    return out


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


# --- encrypted multipart uploads (§5) ---------------------------------------------------------

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
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

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


def _manifest_v1(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object with "v": 1 (both manifest kinds start so)."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"gateway: {what} is not JSON") from e
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise FormatError(f"gateway: unknown {what} version")
    return doc


def parse_mpu_manifest(raw: bytes) -> MpuManifest:
    """Parse and check a decrypted ``.mpu-manifest`` (every length is re-derived)."""
    doc = _manifest_v1(raw, "multipart manifest")
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


def mpu_envelope(manifest: MpuManifest) -> tuple[str, str, int, bytes]:
    """(provider, key id, key version, wrapped bytes) of the manifest's data key."""
    env = manifest.envelope
    try:
        blob = base64.b64decode(str(env.get("Ciphertext", "")), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidEnvelope("gateway: multipart wrapped key is not base64") from e
    version = env.get("KeyVersion", 0)
    return (
        str(env.get("Provider", "")),
        str(env.get("KeyID", "")),
        version if isinstance(version, int) else 0,
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
        import bisect

        return max(0, bisect.bisect_right(self._starts, offset) - 1)

    def chunk_start(self, index: int) -> int:
        return self._starts[index] if index < len(self._starts) else self.manifest.total_plain


def recorded_size(md: Mapping[str, str]) -> int | None:
    for name in ("encryption-original-size", "original-content-length"):
        v = md.get(name)
        if v:
            try:
                n = int(v, 10)
            except ValueError as e:
                raise FormatError(f"gateway: bad {name} {v!r}") from e
            if n < 0:
                raise FormatError(f"gateway: negative {name}")
            return n
    return None


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
    raw = _b64d(md.get("encryption-manifest", ""), "manifest")
    man = _manifest_v1(raw, "manifest")
    cs = man.get("cs")
    if not isinstance(cs, int) or isinstance(cs, bool) or not MIN_CHUNK <= cs <= MAX_CHUNK:
        raise FormatError(f"gateway: bad chunk size {cs!r}")
    iv_b64 = man.get("iv")
    if not isinstance(iv_b64, str):
        raise FormatError("gateway: manifest lacks iv")
    iv = _b64d(iv_b64, "manifest iv")
    if len(iv) != NONCE:
        raise FormatError("gateway: base IV must be 12 B")
    ivd = man.get("ivd")
    return ChunkedLayout(cs, iv, ivd if isinstance(ivd, str) else None, alg, recorded_size(md))


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


# --- writer ---------------------------------------------------------------------------------


def wrap_password_dek(
    dek: bytes,
    password: str | bytes,
    iterations: int = 600_000,
    *,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The 0.8 provider-``password`` blob (96 B)."""
    salt = os.urandom(SALT) if salt is None else salt
    nonce = os.urandom(NONCE) if nonce is None else nonce
    ct = AESGCM(pbkdf2(password, salt, iterations)).encrypt(nonce, dek, None)
    return struct.pack(">I", iterations) + salt + nonce + ct


def encrypt_chunked(
    plaintext: bytes,
    password: str | bytes,
    *,
    iterations: int = 600_000,
    chunk_size: int = 65536,
    algorithm: str = ALG_AES,
    wrap: bool = False,
    salt: bytes | None = None,
    base_iv: bytes | None = None,
    dek: bytes | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Write a chunked gateway object (§12 writer recipe). Returns (body, user metadata).

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


# --- streaming writer (what a gateway-format volume writes) -------------------------------------


@dataclass(frozen=True)
class WriteSettings:
    """How a gateway-format volume writes new objects (from its descriptor)."""

    # "password" (the 0.8 server's single-password mode), "memory", or "cosmian-kmip" (the
    # volume's own KMIP key manager, which wraps as the gateway's Cosmian provider does)
    wrap: str = "password"
    iterations: int = 600_000
    algorithm: str = ALG_AES
    chunk_size: int = 65536

    @staticmethod
    def from_dict(doc: Mapping[str, object]) -> WriteSettings:
        s = WriteSettings(
            wrap=str(doc.get("wrap", "password")),
            iterations=int(doc.get("iterations", 600_000)),  # type: ignore[call-overload]
            algorithm=str(doc.get("algorithm", ALG_AES)),
            chunk_size=int(doc.get("chunk_size", 65536)),  # type: ignore[call-overload]
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


class PasswordWrapper:
    """Wraps data keys as provider ``password`` blobs, stretching the password once.

    The gateway draws a salt per object and so runs PBKDF2 for every write; the blob format lets
    one salt serve many objects as long as each wrap has its own random nonce, so this writer
    derives the key-encryption key once per (password, salt) and every object costs one AES-GCM.
    The salt is fresh for each wrapper (each mount)."""

    def __init__(self, password: str | bytes, iterations: int) -> None:
        self.iterations = iterations
        self.salt = os.urandom(SALT)
        self._kek = AESGCM(pbkdf2(password, self.salt, iterations))

    def wrap(self, dek: bytes) -> dict[str, str]:
        nonce = os.urandom(NONCE)
        blob = struct.pack(">I", self.iterations) + self.salt + nonce
        blob += self._kek.encrypt(nonce, dek, None)
        return {
            "encryption-wrapped-key": base64.b64encode(blob).decode(),
            "encryption-kms-provider": "password",
            "encryption-key-version": "1",
        }


class MemoryWrapper:
    """Wraps data keys with RFC 3394 under the gateway's ``memory`` master key (§3.4)."""

    def __init__(self, master_key: bytes | str) -> None:
        self._kek = parse_master_key(master_key)

    def wrap(self, dek: bytes) -> dict[str, str]:
        from cryptography.hazmat.primitives.keywrap import aes_key_wrap

        return {
            "encryption-wrapped-key": base64.b64encode(aes_key_wrap(self._kek, dek)).decode(),
            "encryption-kms-provider": "memory",
            "encryption-kms-id": "memory-v1",
            "encryption-key-version": "1",
        }


def seal_chunked_stream(
    src: BinaryIO,
    dst: BinaryIO,
    dek: bytes,
    settings: WriteSettings,
    envelope: Mapping[str, str],
) -> tuple[dict[str, str], int, int, ChunkedCipher]:
    """Encrypt *src* into *dst* as a chunked gateway object (§12 writer recipe, HKDF nonces).

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
        # Unused by a reader of a wrapped DEK, but part of the 0.8 key set (§1.1 B).
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
