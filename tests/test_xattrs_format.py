"""Extended attributes on the bucket (docs/FORMAT.md 6.1 and 8.5) against the code. Pure: no
servers. The vector is read from the document and rebuilt by an independent implementation."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from s3cryptfs.errors import FormatError, IntegrityError
from s3cryptfs.format import xattrs as xa
from s3cryptfs.vfs import attrindex
from s3cryptfs.vfs.attrindex import IndexEntry
from tests.test_format import _doc_blocks, _fields, _typed, ref_hkdf_sha256

DIR_MODE = 0o40755
FILE_MODE = 0o100644


@pytest.fixture(scope="module")
def vector():
    return {k: _typed(k, v) for k, v in _fields(_doc_blocks("vector")["xattrs"]).items()}


def ref_set(xattrs: dict[bytes, bytes]) -> bytes:
    out = b""
    for name in sorted(xattrs):
        out += bytes([len(name)]) + name + len(xattrs[name]).to_bytes(2, "big") + xattrs[name]
    return out


def test_vector_independent(vector):
    wanted = {b"user.a": b"\x00\xff", b"user.color": b"blue"}
    assert ref_set(wanted) == vector["set"]
    key = ref_hkdf_sha256(vector["dek"], b"s3cryptfs v1 xattrs")
    assert key == vector["xattrs_key"]
    aad = b"s3cryptfs xattrs\x00\x01"
    blob = b"\x01" + vector["nonce"] + AESGCM(key).encrypt(vector["nonce"], vector["set"], aad)
    assert base64.b64encode(blob).decode() == vector["value"]


def test_vector_module(vector):
    wanted = {b"user.color": b"blue", b"user.a": b"\x00\xff"}
    assert xa.encode_set(wanted) == vector["set"]
    assert xa.seal(vector["dek"], wanted, vector["nonce"]) == vector["value"]
    assert xa.open_blob(vector["dek"], vector["value"]) == wanted
    fresh = xa.seal(vector["dek"], wanted)
    assert fresh != vector["value"] and xa.open_blob(vector["dek"], fresh) == wanted


def _entry(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + len(value).to_bytes(2, "big") + value


@pytest.mark.parametrize(
    "raw",
    [
        _entry(b"user.b", b"1") + _entry(b"user.a", b"2"),  # out of order
        _entry(b"user.a", b"1") + _entry(b"user.a", b"2"),  # repeated
        _entry(b"user.", b"1"),  # nothing after the prefix
        _entry(b"trusted.a", b"1"),  # another namespace
        _entry(b"user.s3cryptfs.state", b"clean"),  # reserved
        _entry(b"user.a\x00b", b"1"),  # a NUL
        _entry(b"user.a", b"12")[:-1],  # truncated value
        b"\x07user.a",  # truncated name
        _entry(b"user.a", b"x" * 1100),  # over the limit
    ],
)
def test_malformed_sets_are_refused(raw):
    with pytest.raises(FormatError):
        xa.decode_set(raw)


def test_blobs_from_the_bucket_are_checked(vector):
    dek = vector["dek"]
    value = vector["value"]
    with pytest.raises(IntegrityError):
        xa.open_blob(bytes(32), value)  # another object's key
    blob = bytearray(base64.b64decode(value))
    blob[20] ^= 1
    with pytest.raises(IntegrityError):
        xa.open_blob(dek, base64.b64encode(bytes(blob)).decode())
    blob = bytearray(base64.b64decode(value))
    blob[0] = 2
    with pytest.raises(FormatError, match="version 2"):
        xa.open_blob(dek, base64.b64encode(bytes(blob)).decode())
    for bad in ("not base64!", value + "\n", "AAAA", "A" * (xa.BLOB_MAX_CHARS + 4)):
        with pytest.raises(FormatError):
            xa.open_blob(dek, bad)
    largest = {b"user.a": b"x" * (xa.SET_MAX - xa.entry_size(b"user.a", b""))}
    assert len(xa.seal(dek, largest)) == xa.BLOB_MAX_CHARS
    assert xa.open_blob(dek, xa.seal(dek, largest)) == largest


def test_the_largest_sealed_set_fits_in_s3_metadata_beside_the_largest_envelope():
    # An AWS KMS envelope (a ~190-byte ciphertext blob, a key ARN) and every attribute of ours.
    meta = {
        "s3cryptfs-format": "1",
        "encryption-wrapped-key": base64.b64encode(bytes(210)).decode(),
        "encryption-kms-id": "arn:aws:kms:us-east-1:123456789012:key/mrk-" + "0" * 32,
        "encryption-kms-provider": "awskms",
        "encryption-key-version": "4294967295",
        "s3cryptfs-mode": "100644",
        "s3cryptfs-uid": "4294967295",
        "s3cryptfs-gid": "4294967295",
        "s3cryptfs-mtime-ns": "1" * 19,
        xa.META_NAME: "A" * xa.BLOB_MAX_CHARS,
    }
    assert xa.metadata_size(meta) <= xa.METADATA_MAX


def test_index_keeps_directory_attributes_and_stays_version_1_without_them():
    plain = {"f": IndexEntry('"e"', FILE_MODE, 1, 2, 3), "d": IndexEntry("", DIR_MODE, 1, 2, 3)}
    doc = json.loads(attrindex.encode("p", plain))
    assert doc["version"] == 1 and all(len(row) == 5 for row in doc["entries"].values())
    assert attrindex.decode("p", attrindex.encode("p", plain)) == plain
    raw = xa.encode_set({b"user.dir": b"yes"})
    with_x = {**plain, "d": IndexEntry("", DIR_MODE, 1, 2, 3, raw)}
    encoded = attrindex.encode("p", with_x)
    assert json.loads(encoded)["version"] == 2
    assert attrindex.decode("p", encoded) == with_x


@pytest.mark.parametrize(
    "row",
    [
        ["", DIR_MODE, 1, 2, 3, "not base64!"],
        ["", DIR_MODE, 1, 2, 3, base64.b64encode(_entry(b"user.b", b"") * 2).decode()],
        ["", DIR_MODE, 1, 2, 3, 7],
        ["", DIR_MODE, 1, 2, 3, "", "extra"],
    ],
)
def test_index_with_a_malformed_set_is_refused(row):
    doc = {"s3cryptfs": "dir-index", "version": 2, "path": "p", "entries": {"d": row}}
    with pytest.raises((ValueError, FormatError)):
        attrindex.decode("p", json.dumps(doc).encode())


def test_version_1_index_cannot_carry_attributes():
    row = ["", DIR_MODE, 1, 2, 3, base64.b64encode(_entry(b"user.a", b"1")).decode()]
    doc = {"s3cryptfs": "dir-index", "version": 1, "path": "p", "entries": {"d": row}}
    with pytest.raises(ValueError):
        attrindex.decode("p", json.dumps(doc).encode())


def test_index_version_3_carries_the_atime_of_files_and_directories():
    from s3cryptfs.vfs.attrindex import IndexEntry, decode, encode

    plain = {"f": IndexEntry('"e"', 0o100644, 0, 0, 5)}
    assert json.loads(encode("p", plain))["version"] == 1
    timed = {
        "f": IndexEntry('"e"', 0o100644, 0, 0, 5, atime_ns=7),
        "g": IndexEntry('"x"', 0o100600, 1, 1, 9),
        "d": IndexEntry("", 0o40755, 1, 1, 9, xattrs=xa.encode_set({b"user.a": b"1"})),
        "e": IndexEntry("", 0o40700, 1, 1, 9, atime_ns=8),
    }
    doc = json.loads(encode("p", timed))
    assert doc["version"] == 3 and doc["entries"]["f"] == ['"e"', 0o100644, 0, 0, 5, "", 7]
    assert doc["entries"]["e"] == ["", 0o40700, 1, 1, 9, "", 8]
    assert decode("p", encode("p", timed)) == timed
    for bad in (-1, 2**63, "7", True, 1.5):
        doc["entries"]["f"][6] = bad
        with pytest.raises(ValueError):
            decode("p", json.dumps(doc).encode())


@pytest.mark.parametrize("atime", [-1, -(10**18), 2**63, 2**40 * 10**9])
def test_an_atime_readers_refuse_is_left_out_of_the_index(atime):
    """`touch -a -d 1960-01-01` of one file must not make every reader refuse its
    directory's index (and HEAD every file instead): that atime stays in the object only."""
    from s3cryptfs.vfs.attrindex import IndexEntry, decode, encode

    entries = {
        "old": IndexEntry('"e"', 0o100644, 0, 0, 5, atime_ns=atime),
        "new": IndexEntry('"x"', 0o100644, 0, 0, 5, atime_ns=7),
    }
    back = decode("p", encode("p", entries))
    assert back["old"] == IndexEntry('"e"', 0o100644, 0, 0, 5)
    assert back["new"].atime_ns == 7
