"""Upper bounds on what a document from the bucket (or a key store row, or a key export) can
make us compute or download whole: scrypt and PBKDF2 parameters, single-AEAD gateway bodies,
symlink bodies. Pure: no servers. A key derivation that should be refused is replaced by one
that fails the test if it runs."""

from __future__ import annotations

import base64
import os
import struct

import pytest

from s3cryptfs import limits
from s3cryptfs.errors import (
    ConfigError,
    FormatError,
    KeyManagerError,
    ObjectTooLarge,
    VolumeError,
    WrongPasswordError,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import v1
from s3cryptfs.format.gateway import keywrap
from s3cryptfs.keys import keystore
from s3cryptfs.keys import password as pw
from s3cryptfs.ops import keyexport
from tests.test_gateway_format import BODY_C, PW, md_c

# (n, r, p) beyond the bounds: n, then memory (128 * 2^20 * 16 = 2 GiB), r, p
TOO_MUCH = [(2**21, 8, 1), (2**20, 16, 1), (2**14, 33, 1), (2**14, 8, 17)]


class NoScrypt:
    """Stands in for cryptography's Scrypt: records what would have been derived."""

    calls: list[tuple[int, int, int]] = []

    def __init__(self, *, salt: bytes, length: int, n: int, r: int, p: int) -> None:
        NoScrypt.calls.append((n, r, p))

    def derive(self, secret: bytes) -> bytes:
        return b"\0" * 32


@pytest.fixture
def no_scrypt(monkeypatch):
    NoScrypt.calls = []
    for module in (pw, keyexport, keystore):
        monkeypatch.setattr(module, "Scrypt", NoScrypt)
    return NoScrypt.calls


def descriptor_kdf(n: int, r: int, p: int) -> dict:
    return {"name": "scrypt", "salt": base64.b64encode(b"s" * 16).decode(), "n": n, "r": r, "p": p}


@pytest.mark.parametrize("n,r,p", TOO_MUCH)
def test_descriptor_scrypt_beyond_bounds_is_refused_before_deriving(no_scrypt, n, r, p):
    with pytest.raises(VolumeError, match="exceed the limits") as info:
        pw.derive_muk(b"password", descriptor_kdf(n, r, p))
    assert str(info.value).startswith(f"volume descriptor: scrypt parameters n={n}, r={r}")
    assert no_scrypt == []


def test_descriptor_scrypt_at_the_bounds_is_derived(no_scrypt):
    pw.derive_muk(b"password", descriptor_kdf(2**20, 8, 16))  # 128 * 2^20 * 8 = 1 GiB exactly
    pw.derive_muk(b"password", descriptor_kdf(2**14, 32, 1))
    assert no_scrypt == [(2**20, 8, 16), (2**14, 32, 1)]


def export_blob(log_n: int, r: int, p: int) -> bytes:
    head = struct.pack(">8sBBBB16s12s", keyexport.MAGIC, 1, log_n, r, p, b"s" * 16, b"n" * 12)
    return head + b"\0" * 64


@pytest.mark.parametrize("log_n,r,p", [(21, 8, 1), (22, 8, 1), (20, 16, 1)])
def test_key_export_scrypt_beyond_bounds_is_refused_before_deriving(no_scrypt, log_n, r, p):
    with pytest.raises(ConfigError, match="^key export: scrypt parameters .* exceed the limits"):
        keyexport.open_bundle(export_blob(log_n, r, p), b"passphrase")
    assert no_scrypt == []


def test_keystore_scrypt_beyond_bounds_is_refused_before_deriving(no_scrypt):
    kdf = {"name": "scrypt", "salt": "00" * 16, "n": 2**21, "r": 8, "p": 1}
    with pytest.raises(KeyManagerError, match="^key store: scrypt parameters n=2097152"):
        keystore._derive(b"passphrase", kdf)
    assert no_scrypt == []


# --- the gateway's PBKDF2 ----------------------------------------------------------------------


@pytest.fixture
def pbkdf2_calls(monkeypatch):
    """Iteration counts PBKDF2 is run with (it returns a wrong key at once)."""
    calls: list[int] = []

    def fake(password, salt, iterations):
        calls.append(iterations)
        return b"\0" * gw.KEY

    monkeypatch.setattr(keywrap, "pbkdf2", fake)  # where the unwrap calls it
    return calls


def test_gateway_kdf_params_beyond_bound_are_refused_before_deriving(pbkdf2_calls):
    meta = {
        "encrypted": "true",
        "encryption-key-salt": base64.b64encode(b"s" * 32).decode(),
        "encryption-kdf-params": "pbkdf2-sha256:3000000",
    }
    with pytest.raises(FormatError, match=r"kdf iterations 3000000 out of range \(100000\.\."):
        gw.data_key(meta, password=PW)
    assert pbkdf2_calls == []
    with pytest.raises(FormatError):
        gw.parse_kdf_params(f"pbkdf2-sha256:{gw.MAX_ITERATIONS + 1}")
    assert gw.parse_kdf_params(f"pbkdf2-sha256:{gw.MAX_ITERATIONS}") == gw.MAX_ITERATIONS


def test_gateway_wrapped_key_prefix_beyond_bound_is_not_honoured(pbkdf2_calls):
    blob = struct.pack(">I", 3_000_000) + os.urandom(92)
    with pytest.raises(WrongPasswordError):
        gw.unwrap_password_dek(blob, PW)
    assert max(pbkdf2_calls) <= gw.MAX_ITERATIONS  # only the legacy layout's 100000 was tried


# --- objects downloaded whole ----------------------------------------------------------------


def test_single_aead_body_beyond_max_is_refused_before_it_is_fetched():
    unbounded = gw.body_cipher(md_c(), password=PW)
    size = unbounded.plain_size_of(len(BODY_C))
    assert unbounded.open_range(0, BODY_C, 1)[0]  # the vector still decrypts
    bounded = gw.body_cipher(md_c(), password=PW, max_body=len(BODY_C), name="k")
    assert bounded.plain_size_of(len(BODY_C)) == size
    small = gw.body_cipher(md_c(), password=PW, max_body=len(BODY_C) - 1, name="vol/c.bin")
    with pytest.raises(ObjectTooLarge):
        small.span(0, 0, len(BODY_C))  # what a reader fetches: the whole body
    with pytest.raises(ObjectTooLarge) as info:
        small.plain_size_of(len(BODY_C))
    assert str(info.value) == (
        f"gateway single-AEAD object vol/c.bin is {len(BODY_C)} bytes, more than the "
        f"{len(BODY_C) - 1} bytes allowed: not read"
    )


def test_symlink_body_bound_fits_every_format_we_read():
    most = limits.SYMLINK_BODY_MAX
    assert v1.cipher_size(limits.PATH_MAX, v1.MIN_CHUNK) == most  # ours, smallest chunks
    assert max(v1.cipher_size(limits.PATH_MAX, c) for c in (v1.MIN_CHUNK, v1.MAX_CHUNK)) == most
    assert most >= limits.PATH_MAX + gw.TAG  # the gateway's: one chunk or one AEAD, no header


def test_too_large_message_and_sizes():
    limits.check_size("directory index", "k", limits.DIR_INDEX_MAX, limits.DIR_INDEX_MAX)
    with pytest.raises(ObjectTooLarge) as info:
        limits.check_size("volume descriptor", "v/.s3cryptfs/volume.json", 5 * 2**20, 2**20)
    assert str(info.value) == (
        "volume descriptor v/.s3cryptfs/volume.json is 5242880 bytes, more than the 1 MiB "
        "allowed: not read"
    )
    assert limits.human(256 * 2**20) == "256 MiB" and limits.human(4140) == "4140 bytes"
