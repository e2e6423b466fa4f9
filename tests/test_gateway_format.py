"""Known-answer, tamper and round-trip tests for s3cryptfs.format.gateway (pure, fast)."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from s3cryptfs.errors import (
    FormatError,
    IntegrityError,
    InvalidEnvelope,
    KeyNotFound,
    UnwrapFailed,
    WrongPasswordError,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format.gateway import keywrap
from s3cryptfs.format.gateway import metadata as gw_metadata

PW = "correct-horse-battery-staple"
SALT_A = bytes(range(32))
IV_A = bytes.fromhex("6465666768696a6b6c6d6e6f")
MANIFEST_A = (
    "eyJ2IjoxLCJjcyI6NjU1MzYsImNjIjowLCJpdiI6IlpHVm1aMmhwYW10c2JXNXYiLCJpdmQiOiJoa2RmLXNoYTI1NiJ9"
)
BODY_A = bytes.fromhex("93b6b5c514dcd685c524f287635cd7a3e469e2d8e4abf269b1c11e7da3e647")
BODY_B = bytes.fromhex("cf83adb44e8ad8bd12b35446754c01a3dd9c398a033e1373e9cacf58c4306d")
BODY_G = bytes.fromhex("d384066f850fcd4c586f288b10d25d3a0b7224ec8a4933ed3dd4257d95007b")
WK_B = (
    "AAknwAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHCQkJCQkJCQkJCQkJrzVtc+4QFBeTj7oGg8JEbxOa+tDG"
    "dYZzTt4uyQFeCVLsljYgiowZRVT0Ui4bhpRs"
)
WK_OLD = (
    "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcJCQkJCQkJCQkJCQnG2EFaeFodDxaeZD7DKQmXNwv8w0TXm7jK"
    "Rhhr+K3Y1fOdZVY+NBT46n6Mw6yogqU="
)
DEK_B = bytes(range(0xC8, 0xE8))
HELLO = b"Hello, gateway!"


def md_a(**extra: str) -> dict[str, str]:
    md = {
        "encrypted": "true",
        "encryption-algorithm": "AES256-GCM",
        "encryption-key-salt": base64.b64encode(SALT_A).decode(),
        "encryption-iv": base64.b64encode(IV_A).decode(),
        "encryption-chunked": "true",
        "encryption-chunk-size": "65536",
        "encryption-manifest": MANIFEST_A,
        "enc-iv-deriv": "hkdf-sha256",
        "encryption-kdf-params": "pbkdf2-sha256:600000",
        "encryption-original-size": "15",
        "original-content-length": "15",
    }
    md.update(extra)
    return md


def md_b() -> dict[str, str]:
    return md_a(
        **{
            "encryption-wrapped-key": WK_B,
            "encryption-kms-provider": "password",
            "encryption-key-version": "1",
        }
    )


# --- §7: the gateway's own known answers ----------------------------------------------------------


def test_pbkdf2_kat_100k():
    assert gw.pbkdf2("testpassword", b"\x01" * 32, 100_000).hex() == (
        "555408728bbbb92a70c5759b5a514f85a58a2f5067561607831cc759f99b9d07"
    )


def test_pbkdf2_kat_600k():
    assert gw.pbkdf2("testpassword", b"\x01" * 32, 600_000).hex() == (
        "6172973d78018899fcecd7ba5c454a977f87cd72ea1ce124dfa6cef6fa819108"
    )


def test_rfc3394_kat_memory_unwrap():
    wrapped = bytes.fromhex(
        "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
    )
    data = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
    assert gw.unwrap_memory_dek(wrapped, bytes(range(32))) == data
    assert gw.unwrap_memory_dek(wrapped, bytes(range(32)).hex()) == data


# --- §7: values from an independent reading -------------------------------------------------------


@pytest.mark.parametrize(
    "i,exp",
    [
        (0, "db7df6ca0cc5a02d8c4ccb55"),
        (1, "234ae9ee5a51a22475cb26c2"),
        (2, "58b97ae1f219d99e9e6dbce5"),
        (65535, "5bc9d51975dc17272eead351"),
    ],
)
def test_hkdf_nonce(i, exp):
    assert gw.chunk_nonce(bytes(range(12)), i, "hkdf-sha256").hex() == exp


@pytest.mark.parametrize(
    "i,exp",
    [
        (0, "000102030405060708090a0b"),
        (1, "000102030405060708090a0a"),
        (2, "000102030405060708090a09"),
        (65535, "00010203040506070809f5f4"),
    ],
)
def test_legacy_nonce(i, exp):
    assert gw.chunk_nonce(bytes(range(12)), i, None).hex() == exp


def test_object_a_key_and_body():
    assert gw.data_key(md_a(), password=PW).hex() == (
        "996ae7616ce97075c59ca508374bd7c997c83cbdf36ed459cbe714cbdd4865d9"
    )
    assert gw.decrypt_all(md_a(), BODY_A, password=PW) == HELLO


def test_object_b_password_wrapped():
    assert gw.data_key(md_b(), password=PW) == DEK_B
    assert gw.decrypt_all(md_b(), BODY_B, password=PW) == HELLO


def test_old_92_byte_blob():
    blob = base64.b64decode(WK_OLD)
    assert len(blob) == 92
    assert gw.unwrap_password_dek(blob, PW) == DEK_B


def test_object_g_chacha():
    md = md_a(**{"encryption-algorithm": "ChaCha20-Poly1305"})
    assert gw.decrypt_all(md, BODY_G, password=PW) == HELLO


def test_object_d_memory_wrap_vector():
    wrapped = bytes.fromhex(
        "bd2a276ae8c7464c7e8b396674ac6e0e9558c84c6009b3fa413cf06a67a200823e4d720df2419fa9"
    )
    assert gw.unwrap_memory_dek(wrapped, bytes(range(32))) == bytes(range(0x40, 0x60))


def test_sizes_vector():
    md = md_a()
    man = base64.b64encode(b'{"v":1,"cs":16384,"cc":0,"iv":"ZGVmZ2hpamtsbW5v"}').decode()
    md["encryption-manifest"] = man
    del md["encryption-original-size"], md["original-content-length"]
    lay = gw.chunked_layout(md)
    assert lay.ciphertext_size(40000) == 40048
    assert lay.plaintext_size(40048) == 40000
    assert lay.ivd is None


# --- dispatch, ranges -------------------------------------------------------------------


def test_is_gateway_object():
    assert gw.is_gateway_object(md_a())
    assert gw.is_gateway_object({"x-amz-meta-e": "true"})
    assert gw.is_gateway_object({"encrypted-mpu": "true"})
    assert not gw.is_gateway_object({"s3cryptfs-format": "1", "encrypted": "true"})
    assert not gw.is_gateway_object({"content-type": "text/plain"})


def test_compact_aliases_read():
    aliases = gw_metadata._COMPACT.items()
    md = {short: md_a()[full] for short, full in aliases if full in md_a()}
    assert gw.decrypt_all(md, BODY_A, password=PW) == HELLO


def test_ciphertext_range():
    lay = gw.chunked_layout(md_a())
    assert lay.ciphertext_range(0, 1) == (0, 0, 65552)
    assert lay.ciphertext_range(65536, 65536) == (1, 65552, 2 * 65552)
    assert lay.ciphertext_range(65535, 2) == (0, 0, 2 * 65552)


# --- tamper -----------------------------------------------------------------------------


@pytest.mark.parametrize("pos", [0, 14, 15, 30])
def test_flip_byte(pos):
    body = bytearray(BODY_A)
    body[pos] ^= 1
    with pytest.raises(IntegrityError):
        gw.decrypt_all(md_a(), bytes(body), password=PW)


def test_wrong_password_wrapped():
    with pytest.raises(WrongPasswordError):
        gw.decrypt_all(md_b(), BODY_B, password="not-the-password")


def test_wrong_password_direct():
    with pytest.raises(IntegrityError):
        gw.decrypt_all(md_a(), BODY_A, password="not-the-password")


def test_wrong_master_key():
    wrapped = aes_key_wrap(bytes(32), DEK_B)
    md = md_a(
        **{
            "encryption-wrapped-key": base64.b64encode(wrapped).decode(),
            "encryption-kms-provider": "memory",
            "encryption-kms-id": "memory-v1",
        }
    )
    assert gw.decrypt_all(md, BODY_B, master_key=bytes(32)) == HELLO
    with pytest.raises(UnwrapFailed):
        gw.decrypt_all(md, BODY_B, master_key=bytes([1]) * 32)


def test_missing_password():
    with pytest.raises(KeyNotFound):
        gw.decrypt_all(md_a(), BODY_A)


def test_unknown_provider():
    md = md_b()
    md["encryption-kms-provider"] = "cosmian-kmip"
    with pytest.raises(KeyNotFound):
        gw.decrypt_all(md, BODY_B, password=PW)


def test_bad_manifest():
    with pytest.raises(FormatError):
        gw.decrypt_all(md_a(**{"encryption-manifest": "!!"}), BODY_A, password=PW)


def test_size_mismatch():
    with pytest.raises(IntegrityError):
        gw.decrypt_all(md_a(**{"encryption-original-size": "16"}), BODY_A, password=PW)


def test_drop_last_chunk():
    pt = bytes(range(256)) * 300  # 76800 B: 2 chunks at 64 KiB
    body, md = gw.encrypt_chunked(pt, PW, iterations=100_000)
    assert gw.decrypt_all(md, body, password=PW) == pt
    with pytest.raises(IntegrityError):
        gw.decrypt_all(md, body[:65552], password=PW)


def test_swap_chunks():
    pt = b"a" * 65536 + b"b" * 65536
    body, md = gw.encrypt_chunked(pt, PW, iterations=100_000)
    with pytest.raises(IntegrityError):
        gw.decrypt_all(md, body[65552:] + body[:65552], password=PW)


# --- writer round trips -----------------------------------------------------------------


def test_writer_reproduces_object_a():
    body, md = gw.encrypt_chunked(HELLO, PW, salt=SALT_A, base_iv=IV_A)
    assert body == BODY_A
    assert md["encryption-manifest"] == MANIFEST_A


@pytest.mark.parametrize("alg", [gw.ALG_AES, gw.ALG_CHACHA])
@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("size", [0, 1, 16384, 16385, 50000])
def test_round_trip(alg, wrap, size):
    pt = bytes((i * 7) & 0xFF for i in range(size))
    body, md = gw.encrypt_chunked(
        pt, PW, iterations=100_000, chunk_size=16384, algorithm=alg, wrap=wrap
    )
    assert len(body) == gw.chunked_layout(md).ciphertext_size(size)
    assert gw.decrypt_all(md, body, password=PW) == pt
    lay = gw.chunked_layout(md)
    key = gw.data_key(md, password=PW)
    if size > 16384:
        first, start, end = lay.ciphertext_range(16384, 10)
        assert lay.decrypt_range(key, first, body[start:end])[:10] == pt[16384:16394]


# --- key parsing, cache, sizes ----------------------------------------------------------


def test_master_key_parsing():
    assert gw.parse_master_key("00" * 16) == bytes(16)  # 32 hex chars: AES-128 KEK
    assert gw.parse_master_key("ab" * 32) == b"\xab" * 32
    assert gw.parse_master_key("x" * 32) == b"x" * 32  # not hex: raw bytes
    with pytest.raises(InvalidEnvelope):
        gw.parse_master_key("")
    with pytest.raises(InvalidEnvelope):
        gw.parse_master_key("short")


def test_kdf_params():
    assert gw.parse_kdf_params(None) == 100_000
    assert gw.parse_kdf_params("pbkdf2-sha256:600000") == 600_000
    for bad in (
        "pbkdf2-sha256:99999",
        "argon2id:3:65536:4",
        "pbkdf2-sha256:x",
        "pbkdf2-sha256:99999999",
    ):
        with pytest.raises(FormatError):
            gw.parse_kdf_params(bad)


def test_pbkdf2_cache_hit(monkeypatch):
    keywrap._PBKDF2_CACHE.clear()
    first = gw.pbkdf2("cache-pw", b"\x02" * 32, 100_000)
    monkeypatch.setattr(keywrap.hashlib, "pbkdf2_hmac", lambda *a: pytest.fail("not cached"))
    assert gw.pbkdf2("cache-pw", b"\x02" * 32, 100_000) == first


def test_lru_evicts():
    lru = keywrap._LRU(2)
    for i in range(3):
        lru.put((b"p", bytes([i]), 1), bytes([i]))
    assert lru.get((b"p", b"\x00", 1)) is None
    assert lru.get((b"p", b"\x02", 1)) == b"\x02"


def test_plaintext_size_without_record():
    md = md_a()
    del md["encryption-original-size"], md["original-content-length"]
    lay = gw.chunked_layout(md)
    assert lay.original_size is None
    assert lay.plaintext_size(31) == 15
    assert lay.plaintext_size(65552 + 17) == 65537
    with pytest.raises(IntegrityError):
        lay.plaintext_size(65552 + 16)


def test_empty_object_and_truncated_to_empty():
    body, md = gw.encrypt_chunked(b"", PW, iterations=100_000)
    assert body == b"" and "encryption-original-size" not in md
    assert gw.decrypt_all(md, body, password=PW) == b""
    body, md = gw.encrypt_chunked(b"x", PW, iterations=100_000)
    with pytest.raises(IntegrityError):
        gw.decrypt_all(md, b"", password=PW)


def test_refuses_unsupported_variants():
    for extra in (
        {"encryption-chunked": "false"},
        {"encryption-fallback": "true"},
        {"compression-enabled": "true"},
        {"encryption-algorithm": "AES128-CBC"},
    ):
        with pytest.raises(FormatError):
            gw.chunked_layout(md_a(**extra))
    with pytest.raises(FormatError):
        gw.chunked_layout({"encrypted-mpu": "true"})


def test_bad_chunk_size_in_manifest():
    man = base64.b64encode(b'{"v":1,"cs":4096,"cc":0,"iv":"ZGVmZ2hpamtsbW5v"}').decode()
    with pytest.raises(FormatError):
        gw.chunked_layout(md_a(**{"encryption-manifest": man}))


def test_writer_wrapped_blob_is_96_bytes():
    body, md = gw.encrypt_chunked(HELLO, PW, iterations=100_000, wrap=True)
    blob = base64.b64decode(md["encryption-wrapped-key"])
    assert len(blob) == 96 and blob[:4] == (100_000).to_bytes(4, "big")
    assert md["encryption-kms-provider"] == "password" and "encryption-kms-id" not in md
    with pytest.raises(WrongPasswordError):
        gw.decrypt_all(md, body, password="wrong-password-here")


def test_read_range():
    pt = bytes((i * 13) & 0xFF for i in range(50000))
    body, md = gw.encrypt_chunked(pt, PW, iterations=100_000, chunk_size=16384)
    lay = gw.chunked_layout(md)
    key = gw.data_key(md, password=PW)
    size = lay.plaintext_size(len(body))
    assert size == 50000

    def fetch(s, e):
        return body[s:e]

    for off, ln in [(0, 1), (16383, 2), (40000, 20000), (49999, 5), (50000, 1), (100, 0)]:
        assert lay.read_range(key, off, ln, size, fetch) == pt[off : off + ln]
    with pytest.raises(IntegrityError):
        lay.read_range(key, 49000, 10, size, lambda s, e: body[s : e - 16])


# --- the block-cache interface (ChunkedCipher, SingleCipher) ---------------------------------

BODY_C = bytes.fromhex("07511f794f24d02295624d090f8e68ba502c21c24400e3207173344a5db2fb")


def md_c(**extra: str) -> dict[str, str]:
    """Object C (§7): single AEAD, password-direct, length-prefixed AAD."""
    md = {
        "encrypted": "true",
        "encryption-algorithm": "AES256-GCM",
        "encryption-key-salt": base64.b64encode(SALT_A).decode(),
        "encryption-iv": base64.b64encode(bytes.fromhex("32333435363738393a3b3c3d")).decode(),
        "encryption-original-size": "15",
        "encryption-original-etag": "555cbb7e30e29398932aa95cf538c1e6",  # never trusted
        "encryption-kdf-params": "pbkdf2-sha256:600000",
        "encryption-content-type": "text/plain",
        "original-content-length": "15",
    }
    md.update(extra)
    return md


def test_single_aead_object_c_vector():
    c = gw.body_cipher(md_c(), password=PW)
    assert isinstance(c, gw.SingleCipher)
    assert c.plain_size_of(len(BODY_C)) == 15
    assert c.span(0, 0, len(BODY_C)) == (0, len(BODY_C) - 1)
    assert c.open_range(0, BODY_C, 1) == [HELLO]


def test_single_aead_aad_binds_the_recorded_size_and_type():
    for tampered in (
        md_c(**{"encryption-original-size": "14"}),
        md_c(**{"encryption-content-type": "x"}),
    ):
        with pytest.raises(IntegrityError):
            gw.body_cipher(tampered, password=PW).open_range(0, BODY_C, 1)


def test_single_aead_gzip_bomb_is_refused():
    import gzip as gz

    key = gw.pbkdf2(PW, SALT_A, 600_000)
    md = md_c(**{"compression-enabled": "true", "compression-algorithm": "gzip"})
    md["encryption-original-size"] = "10"
    iv = base64.b64decode(md["encryption-iv"])
    aad = gw.single_aads(gw.normalize_metadata(md), "AES256-GCM", SALT_A, iv)[0]
    body = AESGCM(key).encrypt(iv, gz.compress(b"\0" * 1_000_000), aad)
    with pytest.raises(IntegrityError):
        gw.body_cipher(md, password=PW).open_range(0, body, 1)


def test_chunked_cipher_refuses_a_body_shorter_than_recorded():
    pt = bytes(range(256)) * 1000
    body, md = gw.encrypt_chunked(pt, PW, iterations=100_000, chunk_size=16384)
    c = gw.body_cipher(md, password=PW)
    assert isinstance(c, gw.ChunkedCipher)
    assert c.plain_size_of(len(body)) == len(pt)
    assert c.chunk_count(len(pt)) == -(-len(pt) // 16384)
    start, end = c.span(2, 3, len(body))
    assert b"".join(c.open_range(2, body[start : end + 1], 16)) == pt[2 * 16384 : 4 * 16384]
    with pytest.raises(IntegrityError):
        c.plain_size_of(len(body) - (16384 + 16))  # the gateway would serve this as valid


def test_streaming_writer_matches_the_reference_reader():
    import io

    pt = os.urandom(200_001)
    out = io.BytesIO()
    settings = gw.WriteSettings(iterations=100_000)
    blob = gw.PasswordKek(PW, 100_000).wrap(dek := os.urandom(32))
    envelope = {  # what the gateway's password key manager's envelope encodes to
        "encryption-wrapped-key": base64.b64encode(blob).decode(),
        "encryption-kms-provider": "password",
        "encryption-key-version": "1",
    }
    md, plain, body_len, cipher = gw.seal_chunked_stream(
        io.BytesIO(pt), out, dek, settings, envelope
    )
    assert (plain, body_len) == (len(pt), len(out.getvalue()))
    assert gw.decrypt_all(md, out.getvalue(), password=PW) == pt
    assert b"".join(cipher.open_range(0, out.getvalue(), 4)) == pt


def test_password_kek_stretches_once_and_uses_fresh_nonces():
    w = gw.PasswordKek(PW, 100_000)
    a, b = (w.wrap(bytes(32)) for _ in range(2))
    assert a[4:36] == b[4:36]  # one salt (one PBKDF2) per wrapper
    assert a[36:48] != b[36:48]  # a fresh nonce per object
    assert gw.unwrap_password_dek(a, PW) == bytes(32)


# --- encrypted multipart uploads (§5) ---------------------------------------------------------


def test_mpu_iv_kat():
    import hashlib

    dek = bytes.fromhex("0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20")
    salt = hashlib.sha256(b"test-upload-id-12345").digest()
    iv = gw.mpu_iv(dek, salt, bytes.fromhex("aabbccddeeff112233445566"), 1, 0)
    assert iv.hex() == "25676f1b3de70cfc8276d810"


def _manifest(**extra):
    import json

    doc = {
        "v": 1,
        "alg": "AES256GCM",
        "cs": 65536,
        "iv_prefix": "aa" * 12,
        "uid_hash": "Djkbh36fEyajCuxwZ1GKdpLDWV-JggUls96yBWTuDZ8=",
        "wrapped_dek": json.dumps({"Provider": "password", "Ciphertext": "AAAA"}),
        "parts": [
            {"pn": 1, "plain_len": 70000, "enc_len": 70032, "chunks": 2},
            {"pn": 2, "plain_len": 10, "enc_len": 26, "chunks": 1},
        ],
        "total_plain": 70010,
    }
    doc.update(extra)
    return json.dumps(doc).encode()


def test_mpu_manifest_parsing_and_chunk_map():
    m = gw.parse_mpu_manifest(_manifest())
    assert m.algorithm == gw.ALG_AES  # the pre-0.6.4 name
    c = gw.MpuCipher(m, bytes(32))
    assert c.chunk_count(m.total_plain) == 3
    assert [c.chunk_start(i) for i in range(3)] == [0, 65536, 70000]
    assert (c.chunk_of(65535), c.chunk_of(65536), c.chunk_of(70009)) == (0, 1, 2)
    assert c.span(1, 2, 70058) == (65552, 70057)
    assert c.plain_size_of(70058) == 70010
    with pytest.raises(IntegrityError):
        c.plain_size_of(70057)


@pytest.mark.parametrize(
    "bad",
    [
        {"v": 2},
        {"cs": 100},
        {"iv_prefix": "zz"},
        {"total_plain": 1},
        {"parts": [{"pn": 1, "plain_len": 70000, "enc_len": 70016, "chunks": 2}]},
        {"parts": [{"pn": 2, "plain_len": 1, "enc_len": 17, "chunks": 1}] * 2},
        {"wrapped_dek": "not json"},
    ],
)
def test_mpu_manifest_refuses_inconsistent_documents(bad):
    with pytest.raises(FormatError):
        gw.parse_mpu_manifest(_manifest(**bad))


def test_mpu_manifest_pointer_must_be_the_companion():
    assert gw.mpu_manifest_key("a/b", {"encryption-fallback-ptr": "a/b.mpu-manifest"}) == (
        "a/b.mpu-manifest"
    )
    with pytest.raises(FormatError):
        gw.mpu_manifest_key("a/b", {"encryption-fallback-ptr": "other.mpu-manifest"})
