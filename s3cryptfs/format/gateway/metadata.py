"""The gateway's object metadata: names, compact aliases, dispatch, the checked fields, and the
envelope of an object's data key.

Everything here is read from metadata that anyone with write access to the bucket can set, so
each value is validated (bounded work factors, sizes, base64) before it is used (§1, §2).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from s3cryptfs.errors import FormatError, InvalidEnvelope
from s3cryptfs.format.envelope import KeyEnvelope
from s3cryptfs.format.metadata import decode_envelope

TAG = 16
NONCE = 12
KEY = 32
SALT = 32
MIN_CHUNK = 16_384
MAX_CHUNK = 1_048_576
LEGACY_ITERATIONS = 100_000
DEFAULT_ITERATIONS = 600_000  # what the gateway 0.8 writes, and our writer by default
# Work factors read from metadata (anyone who can write to the bucket sets them) are refused
# above this: the gateway's own bound on wrapped keys, so every object it can read passes.
MAX_ITERATIONS = 2_000_000

ALG_AES = "AES256-GCM"
ALG_CHACHA = "ChaCha20-Poly1305"

# The gateway's own key providers (§3.2, §3.3): their secrets are the gateway's configuration,
# never a KMS, so no volume descriptor names them.
PASSWORD = "password"
MEMORY = "memory"
# Key id of a derivation envelope (see key_envelope), followed by the iteration count.
DERIVATION_KEY_ID = "pbkdf2-sha256:"

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


def b64d(value: str, what: str, exc: type[Exception] = FormatError) -> bytes:
    """Strict base64 of a metadata field; *exc* names the error kind a bad value is."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise exc(f"gateway: {what} is not valid base64") from e


def manifest_v1(raw: bytes, what: str) -> dict[str, Any]:
    """A JSON object with "v": 1 (both manifest kinds start so)."""
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"gateway: {what} is not JSON") from e
    if not isinstance(doc, dict) or doc.get("v") != 1:
        raise FormatError(f"gateway: unknown {what} version")
    return doc


def recorded_size(md: Mapping[str, str]) -> int | None:
    """The plaintext size a (normalized) object records, if any."""
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


# --- the envelope of an object's data key (§3.1) ----------------------------------------------


def key_envelope(metadata: Mapping[str, str]) -> KeyEnvelope:
    """The envelope of a single-PUT object's data key, in the form every key manager takes.

    A wrapped key of the gateway's own providers is read as the gateway reads it (a key version
    that is not a number is 0: they ignore it); one of another provider (cosmian-kmip) as our own
    objects' envelopes, which use the same names. A password-direct object has no wrapped key:
    its key is PBKDF2 of the password over its salt, so it gets a *derivation envelope* for the
    ``password`` provider: key id ``pbkdf2-sha256:N`` (N its checked iteration count), version
    0, and the salt as ciphertext."""
    md = normalize_metadata(metadata)
    wrapped = md.get("encryption-wrapped-key", "")
    provider = md.get("encryption-kms-provider", "")
    if wrapped and provider in (PASSWORD, MEMORY):
        blob = b64d(wrapped, "wrapped key", InvalidEnvelope)
        try:
            version = int(md.get("encryption-key-version", ""), 10)
        except ValueError:
            version = 0
        return KeyEnvelope(md.get("encryption-kms-id", ""), version, provider, blob)
    if wrapped:
        return decode_envelope(md)
    salt = b64d(md.get("encryption-key-salt", ""), "salt")
    if len(salt) != SALT:
        raise FormatError("gateway: salt must be 32 B")
    iterations = parse_kdf_params(md.get("encryption-kdf-params"))
    return KeyEnvelope(f"{DERIVATION_KEY_ID}{iterations}", 0, PASSWORD, salt)


def is_derivation(envelope: KeyEnvelope) -> bool:
    """True for the envelope of a password-direct object (see key_envelope)."""
    return envelope.provider == PASSWORD and envelope.key_id.startswith(DERIVATION_KEY_ID)
