"""Upper bounds on what an object in the bucket can make us download whole or compute.

The bucket is not trusted (docs/SEMANTICS.md, "Size limits"): anyone with write access may plant
a huge volume descriptor, directory index, multipart manifest or symlink, or a key derivation
that needs gigabytes. Each such read is checked against a bound here before the work starts.
The limits on names and keys are here too (s3cryptfs/vfs/names.py applies them).
"""

from __future__ import annotations

from s3cryptfs.errors import ObjectTooLarge, S3CryptFSError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- objects read whole ------------------------------------------------------------------------

DESCRIPTOR_MAX = 1 * MiB  # .s3cryptfs/volume.json: a few KiB even with hundreds of key versions
DIR_INDEX_MAX = 32 * MiB  # a directory index: ~100 B per entry, so ~300,000 entries
MPU_MANIFEST_MAX = 16 * MiB  # a gateway multipart manifest: ~100 B per part, 10,000 parts at most
PATH_MAX = 4096  # Linux's limit on a symlink target, terminating NUL included
# The largest body PATH_MAX bytes of plaintext make in any format we read: ours at its smallest
# chunk size (a 28 B header and one 16 B tag), or the gateway's (one tag, no header).
SYMLINK_BODY_MAX = PATH_MAX + 28 + 16
# Gateway single-AEAD objects have one tag over the whole body: they are downloaded whole before
# one byte can be checked. The default of --max-whole-object.
WHOLE_OBJECT_DEFAULT = 256 * MiB

# --- files ------------------------------------------------------------------------------------

# S3's largest object: a file's whole encrypted body is one object, so its plaintext must fit
# in this with the format's header and tags (ObjectCodec.max_file_size).
OBJECT_MAX = 5 * 1024 * GiB
# Room a seal leaves free in the cache directory's file system, for the journal's records, the
# closed-file records and the log (Journal.check_room, before a body is written).
CACHE_RESERVE = 64 * MiB

# --- names ------------------------------------------------------------------------------------

NAME_MAX = 255  # bytes of one name, as on ext4 (statfs's f_namemax says so)
KEY_MAX = 1024  # bytes of an S3 key, prefix included (S3's own limit, SeaweedFS's too)

# --- key derivation parameters a document can set ----------------------------------------------

# scrypt (the password manager's descriptor, key exports): memory is 128 * n * r bytes.
SCRYPT_MAX_N = 2**20
SCRYPT_MAX_R = 32
SCRYPT_MAX_P = 16
SCRYPT_MAX_MEMORY = 1 * GiB


def human(size: int) -> str:
    """A byte count for a message: ``256 MiB``, ``4140 bytes``."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def check_size(what: str, key: str, size: int, limit: int) -> None:
    """Refuse an object of *size* bytes that is read whole, before it is read."""
    if size > limit:
        raise ObjectTooLarge(
            f"{what} {key} is {size} bytes, more than the {human(limit)} allowed: not read"
        )


def check_scrypt(n: int, r: int, p: int, what: str, exc: type[S3CryptFSError]) -> None:
    """Refuse scrypt parameters beyond the bounds above, before anything is derived (the
    lower bounds and the power of two are the caller's: its messages predate these)."""
    if n > SCRYPT_MAX_N or r > SCRYPT_MAX_R or p > SCRYPT_MAX_P or 128 * n * r > SCRYPT_MAX_MEMORY:
        raise exc(
            f"{what}: scrypt parameters n={n}, r={r}, p={p} exceed the limits "
            "(n <= 2^20, r <= 32, p <= 16, 128*n*r <= 1 GiB)"
        )
