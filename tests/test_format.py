"""docs/FORMAT.md against the code. Pure: no servers.

The test vectors are parsed from the document itself. Each is checked three ways: an independent
implementation written here (hmac/hashlib HKDF, hashlib scrypt, struct, AESGCM) must produce it,
the s3cryptfs modules must produce exactly the same bytes, and decryption must round-trip. The
rest checks the size arithmetic, every kind of tampering the document says is detected, the
metadata codec, the descriptor and the password key manager.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from s3cryptfs.errors import (
    DescriptorAuthError,
    FormatError,
    IntegrityError,
    InvalidEnvelope,
    KeyManagerError,
    KeyNotFound,
    UnwrapFailed,
    VolumeError,
    WrongPasswordError,
)
from s3cryptfs.format import metadata as md
from s3cryptfs.format import v1
from s3cryptfs.format.descriptor import (
    DESCRIPTOR_VERSION,
    Descriptor,
    DescriptorAuth,
    KmsSeal,
    LegacyDescriptor,
    descriptor_key,
    fingerprint,
    mac_key,
)
from s3cryptfs.keys import password as pwm
from s3cryptfs.keys.base import KeyEnvelope, KeyManager

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
INT_FIELDS = {"chunk_size", "plaintext_len", "body_len", "n", "r", "p", "key_version"}
OBJECT_VECTORS = ("object-short", "object-empty", "object-multi", "object-exact")
FAST_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

# --- reading the document ----------------------------------------------------------------------

_BLOCK = re.compile(r"^```(\w+) name=(\S+)\n(.*?)^```", re.M | re.S)


def _doc_blocks(kind: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for block_kind, name, text in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        if block_kind == kind:
            assert name not in found, f"two {kind} blocks named {name}"
            found[name] = text
    return found


def _fields(text: str) -> dict[str, str]:
    """`field: value` lines; lines indented by two spaces continue the previous value."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if line.startswith("  ") and last is not None:
            fields[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(": ")
        assert sep and name and name not in fields, f"bad vector line {line!r}"
        fields[name] = value
        last = name
    return fields


def _typed(name: str, raw: str) -> Any:
    if raw.startswith('"'):
        return json.loads(raw)
    if name in INT_FIELDS:
        return int(raw)
    return bytes.fromhex("".join(raw.split()))


@pytest.fixture(scope="module")
def vectors() -> dict[str, dict[str, Any]]:
    return {
        name: {k: _typed(k, v) for k, v in _fields(text).items()}
        for name, text in _doc_blocks("vector").items()
    }


@pytest.fixture(scope="module")
def metadata_vectors() -> dict[str, dict[str, str]]:
    return {name: _fields(text) for name, text in _doc_blocks("metadata").items()}


def _plaintext(vec: dict[str, Any]) -> bytes:
    if "plaintext" in vec:
        return vec["plaintext"].encode()
    assert vec["plaintext_pattern"] == "i mod 251"
    data = bytes(i % 251 for i in range(vec["plaintext_len"]))
    assert hashlib.sha256(data).digest() == vec["plaintext_sha256"]
    return data


def _check_body(vec: dict[str, Any], body: bytes) -> None:
    """*body* is what the vector describes (whole, or by prefix, tags and hash)."""
    assert len(body) == vec["body_len"]
    assert body[: v1.HEADER_LEN] == vec["header"]
    if "body" in vec:
        assert body == vec["body"]
        return
    assert body[:64] == vec["body_prefix"]
    assert hashlib.sha256(body).digest() == vec["body_sha256"]
    stride = vec["chunk_size"] + 16
    tags = sorted(k for k in vec if k.startswith("tag_"))
    assert len(tags) == -(-(len(body) - 28) // stride)
    for name in tags:
        end = min(28 + (int(name[4:]) + 1) * stride, len(body))
        assert body[end - 16 : end] == vec[name], name


# --- an independent implementation of the document --------------------------------------------


def ref_hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()  # salt absent: HashLen zeros
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def ref_header(chunk_size: int, file_id: bytes) -> bytes:
    return b"S3CF" + bytes([1, 1, 0, 0]) + struct.pack(">I", chunk_size) + file_id


def ref_content_key(dek: bytes, file_id: bytes) -> bytes:
    return ref_hkdf_sha256(dek, b"s3cryptfs v1 content" + file_id)


def ref_nonce(i: int) -> bytes:
    return struct.pack(">IQ", 0, i)


def ref_aad(header: bytes, i: int, last: bool) -> bytes:
    return header + struct.pack(">Q", i) + (b"\x01" if last else b"\x00")


def ref_encrypt(dek: bytes, file_id: bytes, chunk_size: int, plaintext: bytes) -> bytes:
    header = ref_header(chunk_size, file_id)
    aead = AESGCM(ref_content_key(dek, file_id))
    pieces = [plaintext[i : i + chunk_size] for i in range(0, len(plaintext), chunk_size)]
    pieces = pieces or [b""]
    out = [header]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out.append(aead.encrypt(ref_nonce(i), piece, ref_aad(header, i, last)))
    return b"".join(out)


def ref_body_len(plain: int, chunk_size: int) -> int:
    chunks = max(1, (plain + chunk_size - 1) // chunk_size)
    return 28 + plain + 16 * chunks


def ref_plain_len(body_len: int, chunk_size: int) -> int | None:
    """Inverse of ref_body_len by search (a different route from v1.plain_size)."""
    guess = max(1, (body_len - 28) // (chunk_size + 16))
    for chunks in range(max(1, guess - 1), guess + 3):
        plain = body_len - 28 - 16 * chunks
        if plain >= 0 and ref_body_len(plain, chunk_size) == body_len:
            return plain
    return None


def ref_decrypt(dek: bytes, body: bytes) -> bytes:
    magic, version, alg, reserved, chunk_size, file_id = struct.unpack(">4sBB2sI16s", body[:28])
    assert (magic, version, alg, reserved) == (b"S3CF", 1, 1, b"\0\0")
    plain = ref_plain_len(len(body), chunk_size)
    assert plain is not None
    chunks = max(1, (plain + chunk_size - 1) // chunk_size)
    aead = AESGCM(ref_content_key(dek, file_id))
    stride = chunk_size + 16
    out = []
    for i in range(chunks):
        sealed = body[28 + i * stride : 28 + (i + 1) * stride]
        out.append(aead.decrypt(ref_nonce(i), sealed, ref_aad(body[:28], i, i == chunks - 1)))
    return b"".join(out)


def ref_key_aad(kind: bytes, volume_id: str, version: int) -> bytes:
    return b"s3cryptfs " + kind + b"\0" + volume_id.encode() + b"\0" + struct.pack(">I", version)


class FixedRandom:
    """Stands in for the ``os`` module of v1/password: urandom returns the queued values."""

    def __init__(self, *values: bytes) -> None:
        self.queue = list(values)

    def urandom(self, size: int) -> bytes:
        assert self.queue, "more randomness asked for than the vector fixes"
        value = self.queue.pop(0)
        assert len(value) == size
        return value


def _fix_random(monkeypatch: pytest.MonkeyPatch, module: Any, *values: bytes) -> FixedRandom:
    rand = FixedRandom(*values)
    monkeypatch.setattr(module, "os", SimpleNamespace(urandom=rand.urandom))
    return rand


# --- the vectors --------------------------------------------------------------------------------


def test_document_has_every_vector(vectors, metadata_vectors):
    assert set(OBJECT_VECTORS) | {"password", "descriptor-auth"} <= set(vectors)
    assert "object-short" in metadata_vectors
    assert set(_doc_blocks("json")) == {"descriptor-example"}


def test_document_names_the_module_constants():
    text = DOC.read_text(encoding="utf-8")
    for name in (*md.ENVELOPE_NAMES, *md.ATTR_NAMES, md.FORMAT, pwm.PROVIDER):
        assert f"`{name}`" in text, name
    assert f"`{descriptor_key('<prefix>')}`" in text
    assert (v1.HEADER_LEN, v1.TAG_LEN, v1.MIN_CHUNK, v1.MAX_CHUNK) == (28, 16, 4096, 8 << 20)
    assert v1.DEFAULT_CHUNK == 65536 and v1.MAGIC == b"S3CF"


@pytest.mark.parametrize("name", OBJECT_VECTORS)
def test_object_vector_independent(vectors, name):
    vec = vectors[name]
    plaintext = _plaintext(vec)
    assert ref_header(vec["chunk_size"], vec["file_id"]) == vec["header"]
    assert ref_content_key(vec["dek"], vec["file_id"]) == vec["content_key"]
    body = ref_encrypt(vec["dek"], vec["file_id"], vec["chunk_size"], plaintext)
    _check_body(vec, body)
    assert ref_body_len(len(plaintext), vec["chunk_size"]) == vec["body_len"]
    assert ref_decrypt(vec["dek"], body) == plaintext


@pytest.mark.parametrize("name", OBJECT_VECTORS)
def test_object_vector_module(vectors, name, monkeypatch):
    vec = vectors[name]
    plaintext = _plaintext(vec)
    header = v1.Header(vec["chunk_size"], vec["file_id"])
    assert header.encode() == vec["header"]
    assert v1.Header.decode(vec["header"]) == header
    assert v1.content_key(vec["dek"], vec["file_id"]) == vec["content_key"]

    rand = _fix_random(monkeypatch, v1, vec["file_id"])
    body = v1.encrypt_bytes(vec["dek"], plaintext, vec["chunk_size"])
    assert not rand.queue
    _check_body(vec, body)

    assert v1.cipher_size(len(plaintext), vec["chunk_size"]) == vec["body_len"]
    assert v1.plain_size(vec["body_len"], vec["chunk_size"]) == len(plaintext)
    assert v1.decrypt_bytes(vec["dek"], body) == plaintext
    assert ref_decrypt(vec["dek"], body) == plaintext


@pytest.mark.parametrize("name", OBJECT_VECTORS)
def test_object_vector_stream(vectors, name, monkeypatch):
    vec = vectors[name]
    plaintext = _plaintext(vec)
    _fix_random(monkeypatch, v1, vec["file_id"])
    out = io.BytesIO()
    counts = v1.encrypt_stream(vec["dek"], io.BytesIO(plaintext), out, vec["chunk_size"])
    assert counts == (len(plaintext), vec["body_len"])
    _check_body(vec, out.getvalue())


def test_content_key_salt_none_is_zeros_and_empty(vectors):
    vec = vectors["object-short"]
    info = b"s3cryptfs v1 content" + vec["file_id"]
    for salt in (None, b"", b"\0" * 32):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(vec["dek"])
        assert key == vec["content_key"]


def test_password_vector_independent(vectors):
    vec = vectors["password"]
    muk = hashlib.scrypt(
        vec["password"].encode(),
        salt=vec["salt"],
        n=vec["n"],
        r=vec["r"],
        p=vec["p"],
        maxmem=256 * vec["n"] * vec["r"],
        dklen=32,
    )
    assert muk == vec["muk"]
    assert ref_key_aad(b"kek", vec["volume_id"], vec["key_version"]) == vec["kek_aad"]
    assert ref_key_aad(b"dek", vec["volume_id"], vec["key_version"]) == vec["dek_aad"]
    sealed = vec["kek_nonce"] + AESGCM(muk).encrypt(vec["kek_nonce"], vec["kek"], vec["kek_aad"])
    assert sealed == vec["sealed_kek"] and len(sealed) == 60
    assert base64.b64encode(sealed).decode() == vec["sealed_kek_b64"]
    wrapped = vec["dek_nonce"] + AESGCM(vec["kek"]).encrypt(
        vec["dek_nonce"], vec["dek"], vec["dek_aad"]
    )
    assert wrapped == vec["wrapped_key"] and len(wrapped) == 60
    assert base64.b64encode(wrapped).decode() == vec["wrapped_key_b64"]


def test_password_vector_module(vectors, monkeypatch):
    vec = vectors["password"]
    password = vec["password"].encode()
    params = {"n": vec["n"], "r": vec["r"], "p": vec["p"]}
    rand = _fix_random(monkeypatch, pwm, vec["salt"], vec["kek"], vec["kek_nonce"])
    settings = pwm.new_settings(password, vec["volume_id"], scrypt=params)
    assert not rand.queue
    assert settings["volume_id"] == vec["volume_id"]
    assert settings["active_version"] == vec["key_version"]
    salt = base64.b64encode(vec["salt"]).decode()
    assert settings["kdf"] == {"name": "scrypt", "salt": salt, **params}
    assert settings["keys"] == [{"version": vec["key_version"], "sealed": vec["sealed_kek_b64"]}]
    assert pwm.derive_muk(password, settings["kdf"]) == vec["muk"]

    manager = pwm.PasswordKeyManager(settings, {"password": password})
    rand = _fix_random(monkeypatch, pwm, vec["dek_nonce"])
    env = manager.wrap_key(vec["dek"], {"volume_id": vec["volume_id"]})
    assert not rand.queue
    assert env == KeyEnvelope(
        vec["volume_id"], vec["key_version"], pwm.PROVIDER, vec["wrapped_key"]
    )
    assert manager.unwrap_key(env, {}) == vec["dek"]


def test_descriptor_example(vectors):
    raw = _doc_blocks("json")["descriptor-example"].encode()
    vec = vectors["password"]
    desc = Descriptor.decode(raw)
    assert desc.version == DESCRIPTOR_VERSION == 2 and desc.generation == 1
    assert desc.volume_id == vec["volume_id"] == desc.key_settings["volume_id"]
    assert desc.provider == pwm.PROVIDER
    assert desc.chunk_size == v1.DEFAULT_CHUNK and desc.object_format == "1"
    assert desc.key_settings["kdf"]["salt"] == base64.b64encode(vec["salt"]).decode()
    assert desc.encode() == raw  # shown exactly as the reference writer emits it


def test_complete_object_from_the_document(vectors, metadata_vectors):
    """Descriptor + password + metadata + body, all from FORMAT.md, give the plaintext."""
    meta = metadata_vectors["object-short"]
    pw_vec = vectors["password"]
    body_vec = vectors["object-short"]
    desc = Descriptor.decode(_doc_blocks("json")["descriptor-example"].encode())
    manager = pwm.PasswordKeyManager(desc.key_settings, {"password": pw_vec["password"].encode()})

    assert md.object_format(meta) == md.FORMAT_V1
    env = md.decode_envelope(meta)
    assert env == KeyEnvelope(pw_vec["volume_id"], 1, pwm.PROVIDER, pw_vec["wrapped_key"])
    dek = manager.unwrap_key(env, {})
    assert dek == body_vec["dek"] == pw_vec["dek"]
    assert v1.decrypt_bytes(dek, body_vec["body"]) == b"hello, s3cryptfs"
    attrs = md.PosixAttrs.decode(meta)
    assert attrs == md.PosixAttrs(0o100644, 1000, 1000, 1700000000123456789)

    written = {md.FORMAT: md.FORMAT_V1, **md.encode_envelope(env), **attrs.encode()}
    assert written == meta


# --- size arithmetic ----------------------------------------------------------------------------


def _interesting_sizes(chunk: int) -> list[int]:
    sizes = {0, 1, 2, 15, 16, 17, chunk - 1, chunk, chunk + 1, 10 * chunk + 7}
    for k in range(1, 6):
        sizes |= {k * chunk - 1, k * chunk, k * chunk + 1}
    return sorted(sizes)


@pytest.mark.parametrize("chunk", [4096, 8192, 65536, 1 << 20, 8 << 20])
def test_size_arithmetic(chunk):
    for plain in _interesting_sizes(chunk):
        body = v1.cipher_size(plain, chunk)
        assert body == ref_body_len(plain, chunk), plain
        assert v1.chunk_count(plain, chunk) == (body - 28 - plain) // 16
        assert v1.plain_size(body, chunk) == plain, plain
        assert ref_plain_len(body, chunk) == plain


def test_size_examples_from_the_document():
    examples = {0: 44, 16: 60, 4096: 4140, 4097: 4157, 8192: 8252, 10000: 10076}
    for plain, body in examples.items():
        assert v1.cipher_size(plain, 4096) == body
        assert v1.plain_size(body, 4096) == plain


def test_plain_size_accepts_exactly_the_valid_lengths():
    chunk = 4096
    stride = chunk + 16
    valid = {ref_body_len(p, chunk): p for p in range(0, 6 * chunk + 1)}
    for length in range(0, 28 + 6 * stride + 1):
        if length in valid:
            assert v1.plain_size(length, chunk) == valid[length]
        else:
            with pytest.raises(IntegrityError):
                v1.plain_size(length, chunk)


@pytest.mark.parametrize(
    "length",
    [0, 27, 28, 43, 4141, 4156, 28 + 2 * 4112 + 1, 28 + 2 * 4112 + 16],
)
def test_plain_size_rejects(length):
    """Too short for header + tag, or a final chunk holding only a tag after a full one."""
    with pytest.raises(IntegrityError):
        v1.plain_size(length, 4096)


def test_chunk_span_and_range_reads(vectors):
    vec = vectors["object-multi"]
    plaintext = _plaintext(vec)
    body = ref_encrypt(vec["dek"], vec["file_id"], 4096, plaintext)
    cipher = v1.ChunkCipher(vec["dek"], v1.Header.decode(body))
    chunk, stride, total = 4096, 4096 + 16, 3
    for i in range(total):
        offset, length = v1.chunk_span(i, chunk)
        assert (offset, length) == (28 + i * stride, stride)
        piece = cipher.open(i, body[offset : offset + length], i == total - 1)
        assert piece == plaintext[i * chunk : (i + 1) * chunk]
    for start, end in [(0, 1), (0, 10000), (4095, 4097), (4096, 8192), (5000, 9999), (9999, 10000)]:
        first, last = start // chunk, (end - 1) // chunk
        lo, hi = 28 + first * stride, min(28 + (last + 1) * stride, len(body))
        pieces = cipher.open_range(first, body[lo:hi], total)
        got = b"".join(pieces)[start - first * chunk : end - first * chunk]
        assert got == plaintext[start:end]


@pytest.mark.parametrize("size", [4096, 8192, 65536, 1 << 20, 8 << 20])
def test_chunk_size_valid(size):
    v1.check_chunk_size(size)
    assert v1.Header.new(size).chunk_size == size


@pytest.mark.parametrize("size", [0, 1, 2048, 4095, 4097, 6144, 65535, 16 << 20, 2**32 - 1])
def test_chunk_size_invalid(size):
    with pytest.raises(FormatError):
        v1.check_chunk_size(size)
    with pytest.raises(FormatError):
        v1.encrypt_bytes(bytes(32), b"x", size)


def test_new_header_draws_a_fresh_file_id():
    ids = {v1.Header.new().file_id for _ in range(64)}
    assert len(ids) == 64 and all(len(i) == 16 for i in ids)


def test_wrong_dek_length_refused():
    with pytest.raises(IntegrityError):
        v1.content_key(bytes(16), bytes(16))


# --- tampering ----------------------------------------------------------------------------------

DEK_A = bytes(range(32))
DEK_B = bytes(range(100, 132))
DATA = bytes((i * 7) % 256 for i in range(3 * 4096 + 500))  # four chunks, the last partial


def _body(dek: bytes = DEK_A, file_id: bytes = b"\x11" * 16, data: bytes = DATA) -> bytes:
    return ref_encrypt(dek, file_id, 4096, data)


def _chunks(body: bytes) -> list[bytes]:
    return [body[i : i + 4112] for i in range(28, len(body), 4112)]


def _refused(body: bytes, dek: bytes = DEK_A) -> None:
    with pytest.raises(IntegrityError):
        v1.decrypt_bytes(dek, body)


def test_untampered_bodies_decrypt():
    assert v1.decrypt_bytes(DEK_A, _body()) == DATA
    assert len(_chunks(_body())) == 4


def test_every_single_byte_flip_is_detected(vectors):
    cases = [
        (vectors[name]["body"], vectors[name]["dek"]) for name in ("object-short", "object-empty")
    ]
    for body, dek in [*cases, (_body(), DEK_A)]:
        for pos in range(len(body)):
            for mask in (0x01, 0x80) if len(body) < 100 else (0x04,):
                tampered = bytearray(body)
                tampered[pos] ^= mask
                _refused(bytes(tampered), dek)


def test_truncation_anywhere_is_detected():
    body = _body()
    for length in range(len(body)):
        _refused(body[:length])


def test_truncation_at_chunk_boundaries_is_detected(vectors):
    body = _body()
    for k in range(1, 4):
        cut = body[: 28 + k * 4112]
        assert v1.plain_size(len(cut), 4096) == k * 4096  # a valid length: the flag catches it
        _refused(cut)
    exact = vectors["object-exact"]
    full = ref_encrypt(exact["dek"], exact["file_id"], 4096, _plaintext(exact))
    _refused(full[: 28 + 4112], exact["dek"])
    _refused(full[:28], exact["dek"])


def test_extension_is_detected():
    body = _body()
    other = _body(file_id=b"\x22" * 16)
    _refused(body + b"\0")
    _refused(body + b"\0" * 16)
    _refused(body + _chunks(other)[0])
    _refused(body + _chunks(body)[-1])


def test_reordered_or_duplicated_chunks_are_detected():
    body = _body()
    c = _chunks(body)
    header = body[:28]
    _refused(header + c[1] + c[0] + c[2] + c[3])
    _refused(header + c[0] + c[2] + c[1] + c[3])
    _refused(header + c[0] + c[0] + c[2] + c[3])
    _refused(header + c[0] + c[1] + c[3])


def test_splicing_between_objects_with_the_same_dek_is_detected():
    a = _body(file_id=b"\x11" * 16)
    b = _body(file_id=b"\x22" * 16)  # same DEK, same plaintext, different file_id
    ca, cb = _chunks(a), _chunks(b)
    _refused(a[:28] + ca[0] + cb[1] + ca[2] + ca[3])
    _refused(b[:28] + ca[0] + ca[1] + ca[2] + ca[3])
    _refused(a[:28] + cb[0] + cb[1] + cb[2] + cb[3])


def test_body_swapped_between_objects_is_detected():
    _refused(_body(dek=DEK_B), DEK_A)
    _refused(_body(dek=DEK_A), DEK_B)


def test_last_flag_is_enforced():
    header = v1.Header(4096, b"\x33" * 16)
    cipher = v1.ChunkCipher(DEK_A, header)
    raw = header.encode()
    parts = [DATA[:4096], DATA[4096:8192], DATA[8192:9000]]

    def build(flags: list[bool]) -> bytes:
        return raw + b"".join(
            cipher.seal(i, p, f) for i, (p, f) in enumerate(zip(parts, flags, strict=True))
        )

    assert v1.decrypt_bytes(DEK_A, build([False, False, True])) == DATA[:9000]
    _refused(build([False, False, False]))  # no chunk marked last
    _refused(build([False, True, True]))  # a middle chunk marked last
    with pytest.raises(IntegrityError):
        cipher.open(0, build([False, False, True])[28 : 28 + 4112], True)


def _header_with(**changes: Any) -> bytes:
    fields = {"magic": b"S3CF", "version": 1, "alg": 1, "reserved": b"\0\0", "chunk": 4096}
    fields.update(changes)
    return struct.pack(
        ">4sBB2sI16s",
        fields["magic"],
        fields["version"],
        fields["alg"],
        fields["reserved"],
        fields["chunk"],
        b"\x44" * 16,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"magic": b"S3CG"}, "magic"),
        ({"magic": b"\0\0\0\0"}, "magic"),
        ({"version": 0}, "version 0"),
        ({"version": 2}, "version 2"),
        ({"alg": 2}, "algorithm"),
        ({"reserved": b"\0\1"}, "reserved"),
        ({"chunk": 0}, "chunk size"),
        ({"chunk": 5000}, "chunk size"),
        ({"chunk": 16 << 20}, "chunk size"),
    ],
)
def test_bad_header_is_a_format_error(changes, message):
    raw = _header_with(**changes)
    with pytest.raises(FormatError, match=message):
        v1.Header.decode(raw)
    with pytest.raises(FormatError):
        v1.decrypt_bytes(DEK_A, raw + b"\0" * 16)


def test_short_header_is_refused():
    for length in (0, 4, 27):
        with pytest.raises(IntegrityError):
            v1.Header.decode(_header_with()[:length])


class _ShortReads(io.RawIOBase):
    """A raw stream that returns at most 1000 bytes per read, like a pipe or a socket."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 1000 if size < 0 else min(size, 1000)
        piece = self._data[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece


def test_encrypt_stream_fills_chunks_from_short_reads():
    out = io.BytesIO()
    plain, written = v1.encrypt_stream(DEK_A, _ShortReads(DATA), out, 4096)
    assert (plain, written) == (len(DATA), v1.cipher_size(len(DATA), 4096))
    assert v1.decrypt_bytes(DEK_A, out.getvalue()) == DATA


# --- object metadata ----------------------------------------------------------------------------


def test_envelope_round_trip():
    env = KeyEnvelope("vol-1", 7, "s3cryptfs-password", bytes(range(60)))
    meta = md.encode_envelope(env)
    assert meta == {
        "encryption-wrapped-key": base64.b64encode(bytes(range(60))).decode(),
        "encryption-kms-id": "vol-1",
        "encryption-kms-provider": "s3cryptfs-password",
        "encryption-key-version": "7",
    }
    assert md.decode_envelope(meta) == env
    assert md.decode_envelope({**meta, md.FORMAT: "1", md.MODE: "100600"}) == env


def test_envelope_without_key_id_omits_kms_id():
    env = KeyEnvelope("", 1, "other", b"\x01\x02\x03")
    meta = md.encode_envelope(env)
    assert md.KMS_ID not in meta
    assert md.decode_envelope(meta) == env


def _good_meta() -> dict[str, str]:
    return md.encode_envelope(KeyEnvelope("v", 1, "s3cryptfs-password", bytes(60)))


@pytest.mark.parametrize(
    "change",
    [
        {md.WRAPPED_KEY: None},
        {md.KMS_PROVIDER: None},
        {md.WRAPPED_KEY: ""},
        {md.KMS_PROVIDER: ""},
        {md.WRAPPED_KEY: "not base64!"},
        {md.WRAPPED_KEY: "QUJD" + "A"},  # bad length
        {md.WRAPPED_KEY: "QUI"},  # padding missing
        {md.WRAPPED_KEY: "QU\nJD"},
        {md.WRAPPED_KEY: "-_-_"},  # URL-safe alphabet
        {md.KEY_VERSION: None},
        {md.KEY_VERSION: ""},
        {md.KEY_VERSION: "one"},
        {md.KEY_VERSION: "1.5"},
    ],
)
def test_decode_envelope_refuses(change):
    meta = _good_meta()
    for name, value in change.items():
        if value is None:
            del meta[name]
        else:
            meta[name] = value
    with pytest.raises(FormatError):
        md.decode_envelope(meta)


def test_posix_attrs_round_trip():
    attrs = md.PosixAttrs(mode=0o100644, uid=1000, gid=100, mtime_ns=1_700_000_000_123_456_789)
    meta = attrs.encode()
    assert meta == {
        "s3cryptfs-mode": "100644",
        "s3cryptfs-uid": "1000",
        "s3cryptfs-gid": "100",
        "s3cryptfs-mtime-ns": "1700000000123456789",
    }
    assert md.PosixAttrs.decode(meta) == attrs
    for mode, text in ((0o120777, "120777"), (0o040755, "40755"), (0o104755, "104755")):
        assert md.PosixAttrs(mode=mode).encode() == {md.MODE: text}
        assert md.PosixAttrs.decode({md.MODE: text}).mode == mode
    assert md.PosixAttrs().encode() == {}
    assert md.PosixAttrs.decode({}) == md.PosixAttrs()


def test_posix_attrs_are_read_leniently():
    meta = {md.MODE: "644", md.UID: "root", md.GID: "", md.MTIME: "1e9"}
    assert md.PosixAttrs.decode(meta) == md.PosixAttrs()
    for mode in ("9999", "rwxr-xr-x", "170644", "30644"):
        assert md.PosixAttrs.decode({md.MODE: mode}).mode is None, mode
    # Special files are modes of their own (the reader keeps them for empty objects only).
    for mode in ("60644", "20666", "140755", "10644"):
        assert md.PosixAttrs.decode({md.MODE: mode}).mode == int(mode, 8), mode
    assert md.PosixAttrs.decode({md.MODE: "20600", md.RDEV: "259"}).rdev == 259
    assert md.PosixAttrs.decode({md.RDEV: "-1"}).rdev is None


def test_format_dispatch():
    assert md.object_format({}) == "plain"
    assert md.object_format({"encrypted": "true", md.WRAPPED_KEY: "AAAA"}) == "plain"
    assert md.object_format({md.FORMAT: "1"}) == "1"
    for value in ("2", "0", "", "1.0", "v1"):
        with pytest.raises(FormatError):
            md.object_format({md.FORMAT: value})


# --- volume descriptor --------------------------------------------------------------------------


def test_descriptor_key():
    assert descriptor_key("") == ".s3cryptfs/volume.json"
    assert descriptor_key("photos/") == "photos/.s3cryptfs/volume.json"


DAK = bytes(range(32))


def _signed(desc: Descriptor, dak: bytes = DAK) -> Descriptor:
    """A descriptor signed as a writer would (the seals are stand-ins: only their presence
    matters to decode)."""
    auth = DescriptorAuth()
    if desc.password_settings() is not None:
        auth.password = b"p" * 60
    if desc.provider != pwm.PROVIDER:
        auth.kms = KmsSeal(desc.provider, "key-1", 1, b"w" * 40)
    desc.auth = auth
    desc.sign(dak)
    return desc


def test_descriptor_round_trip():
    desc = Descriptor(
        volume_id=Descriptor.new_volume_id(),
        chunk_size=1 << 20,
        provider="s3cryptfs-password",
        key_settings={"a": [1, 2], "b": {"c": "d"}},
        generation=7,
    )
    assert len(desc.volume_id) == 32 and int(desc.volume_id, 16) >= 0
    raw = _signed(desc).encode()
    assert raw.endswith(b"}\n")
    doc = json.loads(raw)
    assert doc["s3cryptfs"] == "volume" and doc["version"] == 2 and doc["object_format"] == "1"
    assert doc["generation"] == 7
    decoded = Descriptor.decode(raw)
    assert decoded == desc
    decoded.verify(DAK)
    with pytest.raises(DescriptorAuthError, match="does not authenticate"):
        decoded.verify(bytes(32))


def _descriptor_doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(_signed(Descriptor("abc", provider="p", key_settings={"x": 1})).encode())
    for name, value in changes.items():
        if value is None:
            del doc[name]
        else:
            doc[name] = value
    return doc


@pytest.mark.parametrize("version", [0, 3, 99, "1", "2", None, True])
def test_descriptor_unknown_version_refused(version):
    doc = _descriptor_doc(version=version)
    with pytest.raises(VolumeError, match=re.escape(repr(version)) + ".*not supported"):
        Descriptor.decode(json.dumps(doc).encode())


def test_descriptor_version_1_is_read_only_for_the_upgrade():
    doc = _descriptor_doc(version=1, generation=None, auth=None)
    doc["rotation"] = {"max_age_days": 0, "last": 1700000000.25}
    raw = json.dumps(doc).encode()
    with pytest.raises(LegacyDescriptor, match="s3cryptfs upgrade"):
        Descriptor.decode(raw)
    legacy = Descriptor.decode(raw, legacy=True)
    assert legacy.version == 1 and legacy.auth is None and legacy.rotated_at == 1700000000
    with pytest.raises(DescriptorAuthError):
        legacy.verify(DAK)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"volume"',
        json.dumps(_descriptor_doc(s3cryptfs="other")).encode(),
        json.dumps(_descriptor_doc(s3cryptfs=None)).encode(),
        json.dumps(_descriptor_doc(object_format="2")).encode(),
        json.dumps(_descriptor_doc(chunk_size=1000)).encode(),
        json.dumps(_descriptor_doc(chunk_size=16 << 20)).encode(),
        json.dumps(_descriptor_doc(chunk_size="big")).encode(),
        json.dumps(_descriptor_doc(volume_id=None)).encode(),
        json.dumps(_descriptor_doc(chunk_size=None)).encode(),
        json.dumps(_descriptor_doc(key_manager=None)).encode(),
        json.dumps(_descriptor_doc(key_manager={"settings": {}})).encode(),
        json.dumps(_descriptor_doc(generation=None)).encode(),
        json.dumps(_descriptor_doc(generation="1")).encode(),
        json.dumps(_descriptor_doc(auth=None)).encode(),
        json.dumps(_descriptor_doc(auth={"password": "cA=="})).encode(),
        json.dumps(_descriptor_doc(auth={"mac": "AAAA"})).encode(),
        json.dumps(_descriptor_doc(allow_plaintext="yes")).encode(),
        json.dumps(_descriptor_doc(generation=1.0)).encode(),
        json.dumps(_descriptor_doc(chunk_size=65536.0)).encode(),
        json.dumps(_descriptor_doc(future=1e3)).encode(),
        b'{"s3cryptfs": "volume", "version": 2, "pad": "' + b"x" * (1 << 20) + b'"}',
    ],
)
def test_descriptor_refused(raw):
    with pytest.raises((VolumeError, DescriptorAuthError)):
        Descriptor.decode(raw)


def test_descriptor_seals_must_match_its_providers():
    # A KMS volume without a kms seal, or a volume holding the password manager without a
    # password seal, cannot be opened by every machine that should: refused before any use.
    doc = _descriptor_doc()
    del doc["auth"]["kms"]
    doc["auth"]["password"] = base64.b64encode(b"p" * 60).decode()
    with pytest.raises(DescriptorAuthError, match="no kms seal"):
        Descriptor.decode(json.dumps(doc).encode())
    doc = _descriptor_doc()
    doc["previous_key_managers"] = [{"provider": pwm.PROVIDER, "settings": {}}]
    with pytest.raises(DescriptorAuthError, match="no password seal"):
        Descriptor.decode(json.dumps(doc).encode())
    doc = _descriptor_doc()
    doc["auth"]["kms"]["provider"] = "awskms"
    with pytest.raises(DescriptorAuthError, match="not one of its KMS"):
        Descriptor.decode(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "change",
    [
        {"allow_plaintext": True},
        {"object_format": "gateway", "gateway": {"wrap": "password"}},
        {"generation": 99},
        {"key_manager": {"provider": "p", "settings": {"x": 1, "endpoint_url": "http://evil"}}},
        {"previous_key_managers": [{"provider": "q", "settings": {}}]},
        {"chunk_size": 4096},
        {"future_field": "anything"},
    ],
)
def test_every_field_is_covered_by_the_mac(change):
    doc = _descriptor_doc()
    doc.update(change)
    desc = Descriptor.decode(json.dumps(doc).encode())
    with pytest.raises(DescriptorAuthError, match="does not authenticate"):
        desc.verify(DAK)


def test_the_mac_does_not_depend_on_the_layout_and_keeps_unknown_fields():
    doc = _descriptor_doc(future_field={"x": 1})
    doc["auth"]["mac"] = "A" * 43 + "="
    desc = Descriptor.decode(json.dumps(doc).encode())
    assert desc.extra == {"future_field": {"x": 1}}
    _signed(desc)
    signed = json.loads(desc.encode())
    assert signed["future_field"] == {"x": 1}  # kept on rewrite
    compact = json.dumps(signed, separators=(",", ":")).encode()
    reordered = json.dumps(dict(reversed(list(signed.items()))), indent=4).encode()
    for raw in (compact, reordered):
        Descriptor.decode(raw).verify(DAK)


def test_descriptor_auth_vector(vectors):
    vec = vectors["descriptor-auth"]
    vid = vec["volume_id"]
    assert vec["dak_aad"] == b"s3cryptfs dak\x00" + vid.encode()
    assert AESGCM(vec["muk"]).decrypt(
        vec["dak_nonce"], vec["sealed_dak"][12:], vec["dak_aad"]
    ) == vec["dak"]
    assert mac_key(vec["dak"], vid) == vec["mac_key"]
    assert fingerprint(vec["dak"], vid) == vec["fingerprint"]
    desc = Descriptor.decode(_doc_blocks("json")["descriptor-example"].encode())
    assert desc.signed is not None
    assert hashlib.sha256(desc.signed).digest() == vec["signing_input_sha256"]
    assert desc.auth is not None and desc.auth.mac == vec["mac"]
    assert desc.auth.password == vec["sealed_dak"]
    desc.verify(vec["dak"])
    # The password manager of the example opens the seal to the same DAK.
    manager = pwm.PasswordKeyManager(desc.key_settings, {}, _muk=vec["muk"])
    assert manager.open_auth_key(desc.auth.password) == vec["dak"]
    with pytest.raises(DescriptorAuthError):
        manager.open_auth_key(vec["sealed_dak"][:-1] + b"\x00")


def test_descriptor_defaults_and_unknown_fields():
    doc = _descriptor_doc(object_format=None, future_field={"x": 1})
    doc["key_manager"] = {"provider": "p"}
    desc = Descriptor.decode(json.dumps(doc).encode())
    assert desc.object_format == "1" and desc.key_settings == {} and desc.provider == "p"
    assert desc.extra == {"future_field": {"x": 1}}


# --- password key manager -----------------------------------------------------------------------

PASSWORD = b"correct password"
VOLUME = "00112233445566778899aabbccddeeff"


@pytest.fixture(scope="module")
def settings() -> dict[str, Any]:
    return pwm.new_settings(PASSWORD, VOLUME, scrypt=FAST_SCRYPT)


@pytest.fixture(scope="module")
def manager(settings) -> pwm.PasswordKeyManager:
    return pwm.PasswordKeyManager(settings, {"password": PASSWORD})


def test_new_settings_shape(settings):
    assert settings["volume_id"] == VOLUME and settings["active_version"] == 1
    kdf = settings["kdf"]
    assert kdf["name"] == "scrypt" and {k: kdf[k] for k in "nrp"} == FAST_SCRYPT
    assert len(base64.b64decode(kdf["salt"], validate=True)) == 16
    (entry,) = settings["keys"]
    assert entry["version"] == 1 and len(base64.b64decode(entry["sealed"], validate=True)) == 60
    assert pwm.DEFAULT_SCRYPT == {"n": 2**17, "r": 8, "p": 1}


def test_password_round_trip(manager):
    assert isinstance(manager, KeyManager)
    assert manager.provider == pwm.PROVIDER == "s3cryptfs-password"
    assert manager.active_key_version() == 1
    manager.health_check()
    dek = bytes(range(50, 82))
    env = manager.wrap_key(dek, {"volume_id": VOLUME})
    assert (env.provider, env.key_id, env.key_version) == (pwm.PROVIDER, VOLUME, 1)
    assert len(env.ciphertext) == 60
    assert manager.unwrap_key(env, {}) == dek
    again = manager.wrap_key(dek, {})
    assert again.ciphertext[:12] != env.ciphertext[:12]  # fresh nonce per wrap
    assert manager.unwrap_key(md.decode_envelope(md.encode_envelope(env)), {}) == dek
    assert "ciphertext=<60 bytes>" in repr(env)


def test_independent_unwrap_of_module_wrap(manager, settings):
    """The module's wrap opens with the document's formulas alone."""
    dek = bytes(range(32))
    env = manager.wrap_key(dek, {})
    muk = hashlib.scrypt(
        PASSWORD,
        salt=base64.b64decode(settings["kdf"]["salt"]),
        n=2**14,
        r=8,
        p=1,
        maxmem=64 << 20,
        dklen=32,
    )
    sealed = base64.b64decode(settings["keys"][0]["sealed"])
    kek = AESGCM(muk).decrypt(sealed[:12], sealed[12:], ref_key_aad(b"kek", VOLUME, 1))
    blob = env.ciphertext
    assert AESGCM(kek).decrypt(blob[:12], blob[12:], ref_key_aad(b"dek", VOLUME, 1)) == dek
    with pytest.raises(InvalidTag):
        AESGCM(kek).decrypt(blob[:12], blob[12:], ref_key_aad(b"dek", VOLUME, 2))


def test_wrong_password(settings):
    for password in (b"wrong password", PASSWORD + b"\n", PASSWORD.upper()):
        with pytest.raises(WrongPasswordError):
            pwm.PasswordKeyManager(settings, {"password": password})
    assert issubclass(WrongPasswordError, VolumeError)


def test_missing_password_refused(settings):
    for secrets in ({}, {"password": b""}, {"password": "text, not bytes"}):
        with pytest.raises(VolumeError):
            pwm.PasswordKeyManager(settings, secrets)


def test_sealed_keks_are_bound_to_the_volume(settings):
    moved = {**settings, "volume_id": "another volume"}
    with pytest.raises(WrongPasswordError):
        pwm.PasswordKeyManager(moved, {"password": PASSWORD})
    renumbered = {**settings, "keys": [{**settings["keys"][0], "version": 2}], "active_version": 2}
    with pytest.raises(WrongPasswordError):
        pwm.PasswordKeyManager(renumbered, {"password": PASSWORD})


def test_tampered_wrapped_key(manager):
    env = manager.wrap_key(bytes(32), {})
    for pos in range(60):
        blob = bytearray(env.ciphertext)
        blob[pos] ^= 0x01
        with pytest.raises(UnwrapFailed):
            manager.unwrap_key(KeyEnvelope(VOLUME, 1, pwm.PROVIDER, bytes(blob)), {})


@pytest.mark.parametrize("length", [0, 12, 59, 61, 96])
def test_wrapped_key_of_wrong_length(manager, length):
    with pytest.raises(InvalidEnvelope):
        manager.unwrap_key(KeyEnvelope(VOLUME, 1, pwm.PROVIDER, bytes(length)), {})


def test_unknown_key_version(manager):
    env = manager.wrap_key(bytes(32), {})
    for version in (0, 2, -1, 2**32):
        with pytest.raises(KeyNotFound):
            manager.unwrap_key(KeyEnvelope(VOLUME, version, pwm.PROVIDER, env.ciphertext), {})


def test_key_id_of_another_volume(manager):
    env = manager.wrap_key(bytes(32), {})
    with pytest.raises(KeyNotFound):
        manager.unwrap_key(KeyEnvelope("other", 1, pwm.PROVIDER, env.ciphertext), {})
    assert manager.unwrap_key(KeyEnvelope("", 1, pwm.PROVIDER, env.ciphertext), {}) == bytes(32)


def test_wrong_provider(manager):
    env = manager.wrap_key(bytes(32), {})
    for provider in ("password", "memory", "", "S3CRYPTFS-PASSWORD"):
        with pytest.raises(InvalidEnvelope):
            manager.unwrap_key(KeyEnvelope(VOLUME, 1, provider, env.ciphertext), {})


def test_rotation_keeps_old_versions(settings):
    muk = pwm.derive_muk(PASSWORD, settings["kdf"])
    rotated = {
        **settings,
        "active_version": 2,
        "keys": [
            *settings["keys"],
            {"version": 2, "sealed": pwm.seal_kek(muk, b"\x07" * 32, VOLUME, 2)},
        ],
    }
    old = pwm.PasswordKeyManager(settings, {"password": PASSWORD})
    new = pwm.PasswordKeyManager(rotated, {"password": PASSWORD})
    env1 = old.wrap_key(b"\x01" * 32, {})
    env2 = new.wrap_key(b"\x02" * 32, {})
    assert (env1.key_version, env2.key_version) == (1, 2)
    assert new.unwrap_key(env1, {}) == b"\x01" * 32
    assert new.unwrap_key(env2, {}) == b"\x02" * 32
    with pytest.raises(KeyNotFound):
        old.unwrap_key(env2, {})
    with pytest.raises(UnwrapFailed):  # the version is bound in the AAD
        new.unwrap_key(KeyEnvelope(VOLUME, 1, pwm.PROVIDER, env2.ciphertext), {})


def test_active_version_must_exist(settings):
    with pytest.raises(VolumeError):
        pwm.PasswordKeyManager({**settings, "active_version": 3}, {"password": PASSWORD})


@pytest.mark.parametrize(
    "kdf_change",
    [
        {"name": "pbkdf2"},
        {"n": 2**13},
        {"n": 3 * 2**14},
        {"r": 0},
        {"p": 0},
        {"salt": "not base64!"},
    ],
)
def test_kdf_parameters_checked(settings, kdf_change):
    kdf = {**settings["kdf"], **kdf_change}
    with pytest.raises(VolumeError):
        pwm.derive_muk(PASSWORD, kdf)
    with pytest.raises(VolumeError):
        pwm.PasswordKeyManager({**settings, "kdf": kdf}, {"password": PASSWORD})


def test_close_twice(settings):
    km = pwm.PasswordKeyManager(settings, {"password": PASSWORD})
    env = km.wrap_key(bytes(32), {})
    km.close()
    km.close()
    with pytest.raises(KeyManagerError):
        km.unwrap_key(env, {})


def test_seal_into_writes_what_seal_returns():
    """The streamed upload seals chunks in place (seal_into); the bytes must be seal()'s."""
    from s3cryptfs.format import v1 as fmt

    header = fmt.Header.new(4096)
    cipher = fmt.ChunkCipher(bytes(range(32)), header)
    plain = bytes(range(256)) * 16
    out = bytearray(2 * (4096 + fmt.TAG_LEN))
    view = memoryview(out)
    for i in range(2):
        stride = 4096 + fmt.TAG_LEN
        cipher.seal_into(7 + i, memoryview(plain), i == 1, view[i * stride : (i + 1) * stride])
    assert bytes(out) == cipher.seal(7, plain, False) + cipher.seal(8, plain, True)
    assert cipher.open(8, bytes(out[4096 + fmt.TAG_LEN :]), True) == plain


@pytest.mark.parametrize("chunk", [4096, 64 * 1024, 1024 * 1024])
def test_the_largest_file_is_the_largest_that_fits_in_one_object(chunk):
    from s3cryptfs.limits import OBJECT_MAX

    top = v1.max_plain_size(OBJECT_MAX, chunk)
    assert v1.cipher_size(top, chunk) <= OBJECT_MAX < v1.cipher_size(top + 1, chunk)
    assert top > OBJECT_MAX * 0.99  # the tags take well under 1 %
