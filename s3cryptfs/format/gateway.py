"""Reader (and writer) for objects of the Go "S3 Encryption Gateway" (chunked format).

Pure: imports nothing from FUSE, trio or boto3. The format is described in
/work/shared/reference/gateway-format.md (§1-§4, §12); docs/INTEROP.md says what is supported.
Only the chunked single-PUT format is read here; single-AEAD, fallback and MPU objects raise
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

TAG = 16
NONCE = 12
KEY = 32
SALT = 32
LEGACY_ITERATIONS = 100_000
MIN_CHUNK = 16_384
MAX_CHUNK = 1_048_576
MAX_ITERATIONS = 10_000_000  # our own bound: refuse absurd work factors from metadata

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
        raise FormatError(f"gateway: kdf iterations {n} out of range")
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
        if LEGACY_ITERATIONS <= it <= 2_000_000:
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


def _recorded_size(md: Mapping[str, str]) -> int | None:
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
    try:
        man = json.loads(raw)
    except ValueError as e:
        raise FormatError("gateway: manifest is not JSON") from e
    if not isinstance(man, dict) or man.get("v") != 1:
        raise FormatError("gateway: unknown manifest version")
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
    return ChunkedLayout(cs, iv, ivd if isinstance(ivd, str) else None, alg, _recorded_size(md))


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
