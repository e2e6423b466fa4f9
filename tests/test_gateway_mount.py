"""A bucket shared with the Go S3 Encryption Gateway, through a real mount.

Golden objects are built from the known-answer vectors (docs/INTEROP.md §7) and put into SeaweedFS
as the gateway would store them; files written through a gateway-format mount are decrypted from
the raw objects by `independent_decrypt` below, a reader written from docs/INTEROP.md §4.1 alone (it
shares no code with s3cryptfs.format.gateway)."""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import hmac
import json
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from tests.test_gateway_format import (
    BODY_A,
    BODY_B,
    BODY_C,
    BODY_G,
    HELLO,
    PW,
    SALT_A,
    md_a,
    md_b,
    md_c,
)
from tests.test_key_kmip import keywrap_server, kmip_pki  # noqa: F401 - session fixtures
from tests.test_robustness import get_body, objects

BODY_D = bytes.fromhex("3728970bb9c02f467f41efc217ff072159583a8b5dd4962f27b253edf08b69")
WRAPPED_D = bytes.fromhex(
    "bd2a276ae8c7464c7e8b396674ac6e0e9558c84c6009b3fa413cf06a67a200823e4d720df2419fa9"
)
MASTER_KEY = bytes(range(32))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def md_d() -> dict[str, str]:
    """Object D (§7): single AEAD, DEK wrapped by the memory provider."""
    return md_c(
        **{
            "encryption-content-type": "application/octet-stream",
            "encryption-wrapped-key": b64(WRAPPED_D),
            "encryption-kms-provider": "memory",
            "encryption-kms-id": "memory-v1",
            "encryption-key-version": "1",
        }
    )


def single_aead(plain: bytes, *, legacy: bool, gz: bool) -> tuple[bytes, dict]:
    """A single-AEAD password-direct object built from §4.2 (length-prefixed or legacy AAD,
    optionally gzipped inside)."""
    iv = os.urandom(12)
    data = gzip.compress(plain) if gz else plain
    if legacy:
        aad = f"alg:AES256-GCM|salt:{b64(SALT_A)}|iv:{b64(iv)}|osz:{len(plain)}".encode()
    else:
        fields = [b"AES256-GCM", SALT_A, iv, b"", b"", str(len(plain)).encode()]
        aad = b"".join(struct.pack(">I", len(f)) + f for f in fields)
    md = {
        "encrypted": "true",
        "encryption-algorithm": "AES256-GCM",
        "encryption-key-salt": b64(SALT_A),
        "encryption-iv": b64(iv),
        "encryption-original-size": str(len(plain)),
        "encryption-kdf-params": "pbkdf2-sha256:100000",
        "original-content-length": str(len(plain)),
    }
    if gz:
        md["compression-enabled"] = "true"
        md["compression-algorithm"] = "gzip"
        md["compression-original-size"] = str(len(plain))
    return AESGCM(pbkdf2(SALT_A, 100_000)).encrypt(iv, data, aad), md


def pbkdf2(salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", PW.encode(), salt, iterations, 32)


def independent_decrypt(md: dict[str, str], body: bytes, master_key: bytes | None = None) -> bytes:
    """A reader of chunked objects (§4.1), written out on its own."""
    assert md["encrypted"] == "true" and md["encryption-chunked"] == "true"
    manifest = json.loads(base64.b64decode(md["encryption-manifest"]))
    cs, base_iv = manifest["cs"], base64.b64decode(manifest["iv"])
    assert manifest["ivd"] == "hkdf-sha256"
    blob = base64.b64decode(md["encryption-wrapped-key"])
    if md["encryption-kms-provider"] == "password":
        (iterations,) = struct.unpack(">I", blob[:4])
        kek = pbkdf2(blob[4:36], iterations)
        dek = AESGCM(kek).decrypt(blob[36:48], blob[48:], None)
    elif md["encryption-kms-provider"] == "cosmian-kmip":
        dek = aes_key_unwrap(master_key, blob)  # the KMIP key's material (RFC 3394, §3.4)
    else:
        assert md["encryption-kms-provider"] == "memory" and md["encryption-kms-id"] == "memory-v1"
        dek = aes_key_unwrap(master_key, blob)
    aead = AESGCM(dek) if md["encryption-algorithm"] == "AES256-GCM" else ChaCha20Poly1305(dek)
    out = []
    for i, pos in enumerate(range(0, len(body), cs + 16)):
        msg = b"chunk-iv" + struct.pack(">I", i) + b"\x01"
        nonce = hmac.new(base_iv, msg, hashlib.sha256).digest()[:12]
        out.append(aead.decrypt(nonce, body[pos : pos + cs + 16], None))
    plain = b"".join(out)
    assert int(md["encryption-original-size"]) == len(plain)
    assert int(md["original-content-length"]) == len(plain)
    return plain


@pytest.fixture
def gw_password_file(tmp_path):
    path = tmp_path / "gateway-password"
    path.write_text(PW + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def master_key_file(tmp_path):
    path = tmp_path / "master-key"
    path.write_text(MASTER_KEY.hex())
    path.chmod(0o600)
    return path


def put(s3client, volume, name: str, body: bytes, md: dict[str, str]) -> None:
    s3client.put_object(Bucket=volume.bucket, Key=volume.prefix + name, Body=body, Metadata=md)


def read_errno(path) -> int:
    with pytest.raises(OSError) as info:
        path.read_bytes()
    return info.value.errno


def test_mount_reads_golden_gateway_objects(
    make_volume, gw_password_file, master_key_file, s3client
):
    vol = make_volume(password_file=gw_password_file)
    # The gateway was there first: its objects exist before the volume does.
    golden = {
        "a-direct.txt": (BODY_A, md_a()),
        "b-wrapped.txt": (BODY_B, md_b()),
        "g-chacha.txt": (BODY_G, md_a(**{"encryption-algorithm": "ChaCha20-Poly1305"})),
        "c-single.txt": (BODY_C, md_c()),
        "d-single-memory.txt": (BODY_D, md_d()),
        "docs/nested.txt": (BODY_A, md_a()),
    }
    big = os.urandom(300_000)
    key = pbkdf2(SALT_A, 600_000)
    legacy_iv = bytes(range(12))
    chunks = []
    for i, pos in enumerate(range(0, len(big), 65536)):
        nonce = legacy_iv[:8] + (int.from_bytes(legacy_iv[8:], "big") ^ i).to_bytes(4, "big")
        chunks.append(AESGCM(key).encrypt(nonce, big[pos : pos + 65536], None))
    manifest = json.dumps({"v": 1, "cs": 65536, "cc": 0, "iv": b64(legacy_iv)}).encode()
    golden["legacy-xor.bin"] = (
        b"".join(chunks),
        md_a(
            **{
                "encryption-manifest": b64(manifest),
                "encryption-original-size": str(len(big)),
                "original-content-length": str(len(big)),
                "enc-iv-deriv": "",
            }
        ),
    )
    text = b"line of text\n" * 500
    golden["single-gzip.txt"] = single_aead(text, legacy=False, gz=True)
    golden["single-legacy-aad.txt"] = single_aead(HELLO, legacy=True, gz=False)
    for name, (body, md) in golden.items():
        put(s3client, vol, name, body, md)
    vol.init("--format", "gateway")
    assert set(objects(s3client, vol.bucket)) >= {vol.prefix + n for n in golden}, "init touched"
    vol.mount("--gateway-master-key-file", master_key_file)
    m = vol.mountpoint
    assert sorted(os.listdir(m)) == sorted({n.split("/")[0] for n in golden}), (
        "gateway objects are listed as files"
    )
    for name in ("a-direct.txt", "b-wrapped.txt", "g-chacha.txt", "c-single.txt"):
        assert (m / name).read_bytes() == HELLO, name
        assert (m / name).stat().st_size == len(HELLO), name
    assert (m / "d-single-memory.txt").read_bytes() == HELLO
    assert (m / "docs" / "nested.txt").read_bytes() == HELLO
    assert (m / "legacy-xor.bin").stat().st_size == len(big)
    assert (m / "legacy-xor.bin").read_bytes() == big
    with open(m / "legacy-xor.bin", "rb") as f:  # a range inside the fourth chunk
        f.seek(200_000)
        assert f.read(1000) == big[200_000:201_000]
    assert (m / "single-gzip.txt").read_bytes() == text
    assert (m / "single-gzip.txt").stat().st_size == len(text)
    assert (m / "single-legacy-aad.txt").read_bytes() == HELLO
    # Our own files live beside the gateway's in the same volume.
    (m / "ours.txt").write_bytes(b"written by s3cryptfs\n")
    vol.remount()
    assert (m / "ours.txt").read_bytes() == b"written by s3cryptfs\n"
    assert (m / "b-wrapped.txt").read_bytes() == HELLO


@pytest.mark.expect_log_errors(
    r"body holds \d+ B but the object records",
    r"failed authentication",
    r"not encrypted \(this volume does not allow",
)
def test_tampered_and_plaintext_gateway_objects_are_refused(
    make_volume, gw_password_file, s3client
):
    vol = make_volume(password_file=gw_password_file)
    big = os.urandom(3 * 65536 + 100)
    from s3cryptfs.format import gateway as gw  # the writer only builds the input here

    body, md = gw.encrypt_chunked(big, PW, iterations=100_000, wrap=True)
    put(s3client, vol, "whole.bin", body, md)
    # The gateway itself would serve this as a valid shorter file: the last chunk is gone.
    put(s3client, vol, "truncated.bin", body[: 3 * (65536 + 16)], md)
    flipped = bytearray(body)
    flipped[70_000] ^= 1
    put(s3client, vol, "flipped.bin", bytes(flipped), md)
    put(s3client, vol, "plain.txt", b"not encrypted\n", {})
    vol.init("--format", "gateway")
    vol.mount()
    m = vol.mountpoint
    assert (m / "whole.bin").read_bytes() == big
    assert read_errno(m / "truncated.bin") == errno.EIO
    assert read_errno(m / "flipped.bin") == errno.EIO
    assert read_errno(m / "plain.txt") == errno.EIO
    vol.umount()

    allowing = make_volume(bucket=vol.bucket, prefix="open/", password_file=gw_password_file)
    put(s3client, allowing, "plain.txt", b"not encrypted\n", {})
    allowing.init("--format", "gateway", "--allow-plaintext")
    allowing.mount()
    assert (allowing.mountpoint / "plain.txt").read_bytes() == b"not encrypted\n"


SIZES = {"empty": 0, "one": 1, "chunk": 65536, "chunk-plus-one": 65537, "several": 200_001}


def test_files_written_in_gateway_mode_are_gateway_objects(make_volume, gw_password_file, s3client):
    vol = make_volume(password_file=gw_password_file)
    vol.init("--format", "gateway", "--gateway-iterations", "100000")
    vol.mount()
    m = vol.mountpoint
    want = {name: os.urandom(size) for name, size in SIZES.items()}
    for name, data in want.items():
        (m / name).write_bytes(data)
    (m / "sub").mkdir()
    (m / "sub" / "moved-later").write_bytes(b"rename me\n")
    os.rename(m / "sub" / "moved-later", m / "renamed")
    os.chmod(m / "one", 0o640)  # a metadata-only update (server-side copy)
    want["renamed"] = b"rename me\n"
    vol.umount()  # everything uploaded
    for name, data in want.items():
        key = vol.prefix + name
        head = s3client.head_object(Bucket=vol.bucket, Key=key)
        md = head["Metadata"]
        assert "s3cryptfs-format" not in md, "a gateway object must not carry our marker"
        assert md["encryption-kms-provider"] == "password"
        assert md["encryption-kdf-params"] == "pbkdf2-sha256:100000"
        assert len(base64.b64decode(md["encryption-wrapped-key"])) == 96
        assert independent_decrypt(md, get_body(s3client, vol.bucket, key)) == data, name
    assert vol.prefix + "sub/moved-later" not in objects(s3client, vol.bucket)
    vol.mount()
    for name, data in want.items():
        assert (m / name).read_bytes() == data
    assert (m / "one").stat().st_mode & 0o777 == 0o640


def test_memory_wrapped_gateway_volume(make_volume, gw_password_file, master_key_file, s3client):
    vol = make_volume(password_file=gw_password_file)
    vol.init("--format", "gateway", "--gateway-wrap", "memory")
    proc = vol.mount(check=False)  # new files could not be written: refuse at once
    assert proc.returncode != 0 and "--gateway-master-key-file" in proc.stderr
    assert not vol.is_mounted()
    vol.mount("--gateway-master-key-file", master_key_file)
    m = vol.mountpoint
    data = os.urandom(100_000)
    (m / "secret.bin").write_bytes(data)
    vol.umount()
    key = vol.prefix + "secret.bin"
    md = s3client.head_object(Bucket=vol.bucket, Key=key)["Metadata"]
    assert md["encryption-kms-provider"] == "memory"
    assert md["encryption-kms-id"] == "memory-v1"
    body = get_body(s3client, vol.bucket, key)
    assert independent_decrypt(md, body, master_key=MASTER_KEY) == data


def mpu_object(plain_parts: list[bytes], upload_id: str) -> tuple[bytes, bytes]:
    """An encrypted multipart object as the gateway stores it, built from docs/INTEROP.md §5
    alone: returns (body, manifest JSON)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    dek, iv_prefix = os.urandom(32), os.urandom(12)
    uid_hash = hashlib.sha256(upload_id.encode()).digest()
    body, parts = b"", []
    for number, plain in enumerate(plain_parts, start=1):
        enc = b""
        for k, pos in enumerate(range(0, len(plain), 65536)):
            info = iv_prefix + struct.pack(">II", number, k)
            iv = HKDF(hashes.SHA256(), 12, uid_hash, info).derive(dek)
            enc += AESGCM(dek).encrypt(iv, plain[pos : pos + 65536], None)
        chunks = -(-len(plain) // 65536)
        parts.append(
            {
                "pn": number,
                "etag": "x",
                "plain_len": len(plain),
                "enc_len": len(enc),
                "chunks": chunks,
            }
        )
        body += enc
    salt, nonce = os.urandom(32), os.urandom(12)
    blob = struct.pack(">I", 100_000) + salt + nonce
    blob += AESGCM(pbkdf2(salt, 100_000)).encrypt(nonce, dek, None)
    envelope = {"KeyID": "", "KeyVersion": 1, "Provider": "password", "Ciphertext": b64(blob)}
    manifest = {
        "v": 1,
        "alg": "AES256-GCM",
        "cs": 65536,
        "iv_prefix": iv_prefix.hex(),
        "uid_hash": base64.urlsafe_b64encode(uid_hash).decode(),
        "wrapped_dek": json.dumps(envelope),
        "kms_provider": "password",
        "parts": parts,
        "total_plain": sum(len(p) for p in plain_parts),
    }
    return body, json.dumps(manifest).encode()


def put_mpu(s3client, volume, name: str, plain_parts: list[bytes]) -> None:
    from s3cryptfs.format import gateway as gw  # builds the (ordinary) manifest object only

    body, manifest = mpu_object(plain_parts, f"upload-{name}")
    mbody, mmd = gw.encrypt_chunked(manifest, PW, iterations=100_000)
    put(s3client, volume, name + ".mpu-manifest", mbody, {**mmd, "encryption-mpu-manifest": "true"})
    ptr = volume.prefix + name + ".mpu-manifest"
    md = {"encrypted-mpu": "true", "encryption-fallback": "mpu", "encryption-fallback-ptr": ptr}
    put(s3client, volume, name, body, md)


@pytest.mark.expect_log_errors(r"its multipart manifest")
def test_encrypted_multipart_objects(make_volume, gw_password_file, s3client):
    vol = make_volume(password_file=gw_password_file)
    parts = [os.urandom(100_000), os.urandom(70_000), os.urandom(10)]  # short chunks in every part
    whole = b"".join(parts)
    put_mpu(s3client, vol, "big.bin", parts)
    put_mpu(s3client, vol, "orphan.bin", [b"x" * 5])
    s3client.delete_object(Bucket=vol.bucket, Key=vol.prefix + "orphan.bin.mpu-manifest")
    vol.init("--format", "gateway")
    vol.mount()
    m = vol.mountpoint
    assert sorted(os.listdir(m)) == ["big.bin", "orphan.bin"]  # the manifest is not a file
    assert (m / "big.bin").stat().st_size == len(whole)
    assert (m / "big.bin").read_bytes() == whole
    with open(m / "big.bin", "rb") as f:
        f.seek(99_990)  # across the end of part 1 into part 2
        assert f.read(30) == whole[99_990:100_020]
    assert read_errno(m / "orphan.bin") == errno.EIO  # its manifest is gone
    os.rename(m / "big.bin", m / "moved.bin")
    keys = objects(s3client, vol.bucket)
    assert vol.prefix + "moved.bin.mpu-manifest" in keys
    assert vol.prefix + "big.bin" not in keys and vol.prefix + "big.bin.mpu-manifest" not in keys
    vol.remount()
    assert (m / "moved.bin").read_bytes() == whole
    (m / "dir").mkdir()
    os.rename(m / "moved.bin", m / "dir" / "moved.bin")
    os.rename(m / "dir", m / "dir2")  # a directory rename carries the pointer along too
    ptr = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + "dir2/moved.bin")["Metadata"]
    assert ptr["encryption-fallback-ptr"] == vol.prefix + "dir2/moved.bin.mpu-manifest"
    vol.remount()
    assert os.listdir(m / "dir2") == ["moved.bin"]
    assert (m / "dir2" / "moved.bin").read_bytes() == whole
    os.unlink(m / "dir2" / "moved.bin")
    assert not any("moved.bin" in k for k in objects(s3client, vol.bucket))


def test_cosmian_kmip_gateway_volume(make_volume, keywrap_server, s3client, tmp_path):  # noqa: F811
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap
    from servers import LOOPBACK

    from s3cryptfs.format import gateway as gw
    from tests.kms_volume import mount_kms
    from tests.test_key_kmip import CLIENT, _key_material

    pair = keywrap_server.pki.clients[CLIENT]
    cfg = tmp_path / "kms.toml"
    cfg.write_text(
        "[key_manager]\n"
        'provider = "cosmian-kmip"\n'
        f'host = "{LOOPBACK}"\n'
        f"port = {keywrap_server.port}\n"
        f'ca = "{keywrap_server.pki.ca}"\n'
        f'cert = "{pair.cert}"\n'
        f'key = "{pair.key}"\n'
        "timeout = 5\n"
    )
    vol = make_volume()
    wrap = ("--format", "gateway", "--gateway-wrap", "cosmian-kmip")
    refused = vol.init(*wrap, check=False)  # the password manager cannot wrap for the gateway
    assert refused.returncode != 0 and "--key-manager cosmian-kmip" in refused.stderr
    vol.init("--key-manager", "cosmian-kmip", "--kms-config", cfg, *wrap)
    desc = json.loads(get_body(s3client, vol.bucket, vol.prefix + ".s3cryptfs/volume.json"))
    key_id = desc["key_manager"]["settings"]["keys"][0]["id"]
    kek = _key_material(keywrap_server, key_id)
    # An object the gateway wrote through the same KMS key (RFC 3394 under the key, §3.4).
    dek = os.urandom(32)
    body, md = gw.encrypt_chunked(HELLO * 5000, PW, iterations=100_000, dek=dek, wrap=True)
    md.update(
        {
            "encryption-wrapped-key": b64(aes_key_wrap(kek, dek)),
            "encryption-kms-provider": "cosmian-kmip",
            "encryption-kms-id": key_id,
            "encryption-key-version": "1",
        }
    )
    put(s3client, vol, "from-gateway.bin", body, md)
    mount_kms(vol, cfg)
    m = vol.mountpoint
    assert (m / "from-gateway.bin").read_bytes() == HELLO * 5000
    data = os.urandom(150_000)
    (m / "ours.bin").write_bytes(data)
    vol.umount()
    head = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + "ours.bin")["Metadata"]
    assert (head["encryption-kms-provider"], head["encryption-kms-id"]) == ("cosmian-kmip", key_id)
    raw = get_body(s3client, vol.bucket, vol.prefix + "ours.bin")
    assert independent_decrypt(head, raw, master_key=kek) == data


def test_fsck_and_cat_check_gateway_objects(make_volume, gw_password_file, s3client):
    vol = make_volume(password_file=gw_password_file)
    put(s3client, vol, "a.txt", BODY_A, md_a())
    put(s3client, vol, "c.txt", BODY_C, md_c())
    put_mpu(s3client, vol, "mpu.bin", [os.urandom(70_000), b"tail"])
    vol.init("--format", "gateway")
    ok = vol.run("fsck", vol.url, *vol.common_args(), "--full")
    assert "0 bad object(s)" in ok.stdout, ok.stdout
    # a.txt, c.txt and the multipart object's manifest; the multipart object itself
    assert "gateway pbkdf2 version 0: 3 ok" in ok.stdout, ok.stdout
    assert "gateway multipart version 0: 1 ok" in ok.stdout, ok.stdout
    assert vol.run("cat", f"s3://{vol.bucket}/{vol.prefix}a.txt", *vol.common_args()).stdout == (
        HELLO.decode()
    )
    put(s3client, vol, "truncated.txt", BODY_C[:-1], md_c())
    put(s3client, vol, "plain.txt", b"clear", {})
    bad = vol.run("fsck", vol.url, *vol.common_args(), "--full", check=False)
    assert bad.returncode == 1 and "2 bad object(s)" in bad.stdout, bad.stdout
    assert f"BAD {vol.prefix}truncated.txt" in bad.stdout
    assert f"BAD {vol.prefix}plain.txt" in bad.stdout
