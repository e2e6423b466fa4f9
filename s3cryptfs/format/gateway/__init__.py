"""Objects of the Go "S3 Encryption Gateway": read (chunked, single-AEAD, encrypted multipart)
and written (chunked). docs/INTEROP.md says what is supported; section numbers (§) are those of
its description of the format ("The gateway's format, as s3cryptfs implements it").
Metadata-fallback objects raise FormatError.

Pure: imports nothing from FUSE, trio or boto3, and nothing from s3cryptfs.keys (the key
managers of the gateway's ``password`` and ``memory`` modes, s3cryptfs/keys/gateway.py, build
on keywrap here). One module per concern:

- ``metadata``: names and compact aliases, dispatch, the checked fields, the key envelope;
- ``keywrap``: PBKDF2, the provider-``password`` blobs, the ``memory`` RFC 3394 wrap;
- ``chunked``: the chunked format; ``single``: the single-AEAD format;
- ``multipart``: encrypted multipart objects and their manifests;
- ``reader``: the cipher of a single-PUT object; ``writer``: write settings and writers.

This package's namespace is the public surface: import from ``s3cryptfs.format.gateway``.
"""

from s3cryptfs.format.gateway.chunked import (
    ChunkedCipher,
    ChunkedLayout,
    chunk_nonce,
    chunked_layout,
)
from s3cryptfs.format.gateway.keywrap import (
    PasswordKek,
    data_key,
    parse_master_key,
    password_data_key,
    pbkdf2,
    unwrap_memory_dek,
    unwrap_password_dek,
    wrap_memory_dek,
    wrap_password_dek,
)
from s3cryptfs.format.gateway.metadata import (
    ALG_AES,
    ALG_CHACHA,
    DEFAULT_ITERATIONS,
    KEY,
    LEGACY_ITERATIONS,
    MAX_CHUNK,
    MAX_ITERATIONS,
    MEMORY,
    MIN_CHUNK,
    NONCE,
    PASSWORD,
    SALT,
    TAG,
    is_derivation,
    is_gateway_object,
    key_envelope,
    normalize_metadata,
    parse_kdf_params,
    recorded_size,
)
from s3cryptfs.format.gateway.multipart import (
    MPU_SUFFIX,
    MpuCipher,
    MpuManifest,
    MpuPart,
    is_mpu_object,
    mpu_envelope,
    mpu_iv,
    mpu_manifest_key,
    parse_mpu_manifest,
)
from s3cryptfs.format.gateway.reader import body_cipher, decrypt_all
from s3cryptfs.format.gateway.single import SingleCipher, single_aads
from s3cryptfs.format.gateway.writer import (
    WriteSettings,
    encrypt_chunked,
    seal_chunked_stream,
)

__all__ = [
    "ALG_AES",
    "ALG_CHACHA",
    "DEFAULT_ITERATIONS",
    "KEY",
    "LEGACY_ITERATIONS",
    "MAX_CHUNK",
    "MAX_ITERATIONS",
    "MEMORY",
    "MIN_CHUNK",
    "MPU_SUFFIX",
    "NONCE",
    "PASSWORD",
    "SALT",
    "TAG",
    "ChunkedCipher",
    "ChunkedLayout",
    "MpuCipher",
    "MpuManifest",
    "MpuPart",
    "PasswordKek",
    "SingleCipher",
    "WriteSettings",
    "body_cipher",
    "chunk_nonce",
    "chunked_layout",
    "data_key",
    "decrypt_all",
    "encrypt_chunked",
    "is_derivation",
    "is_gateway_object",
    "is_mpu_object",
    "key_envelope",
    "mpu_envelope",
    "mpu_iv",
    "mpu_manifest_key",
    "normalize_metadata",
    "parse_kdf_params",
    "parse_master_key",
    "parse_mpu_manifest",
    "password_data_key",
    "pbkdf2",
    "recorded_size",
    "seal_chunked_stream",
    "single_aads",
    "unwrap_memory_dek",
    "unwrap_password_dek",
    "wrap_memory_dek",
    "wrap_password_dek",
]
