"""The volume descriptor: one small JSON object under ``<prefix>.s3cryptfs/volume.json``.

It holds no secret in clear (the password manager's keys in it are sealed under the password),
but it decides which key manager wraps new data keys, in which format files are written and
whether plaintext is served: whoever can write to the bucket must not be able to change it.
Descriptor version 2 is therefore authenticated: an HMAC over its canonical form under a key
(the descriptor authentication key, DAK) that only holders of the volume's secrets can open.
docs/FORMAT.md section 4 is the normative description; this module is pure (no I/O).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from s3cryptfs.errors import DescriptorAuthError, FormatError, VolumeError
from s3cryptfs.format import v1

DESCRIPTOR_VERSION = 2
LEGACY_VERSION = 1  # unauthenticated; read only by `s3cryptfs upgrade`
META_DIR = ".s3cryptfs"
DESCRIPTOR_NAME = "volume.json"
# A descriptor is a few KiB; anything near this is not one (store reads stop before it too:
# limits.DESCRIPTOR_MAX).
MAX_DESCRIPTOR_BYTES = 1 << 20

GATEWAY_FORMAT = "gateway"
OBJECT_FORMATS = ("1", GATEWAY_FORMAT)
GATEWAY_WRAPS = ("password", "memory", "cosmian-kmip")
PASSWORD_PROVIDER = "s3cryptfs-password"

AUTH_KEY_LEN = 32
MAC_LEN = 32
_MAC_DOMAIN = b"s3cryptfs descriptor v2\x00"


def descriptor_key(prefix: str) -> str:
    return f"{prefix}{META_DIR}/{DESCRIPTOR_NAME}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise VolumeError(f"volume descriptor: {what} is not a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise VolumeError(f"volume descriptor: {what} is not valid base64") from None


@dataclass
class KmsSeal:
    """The DAK wrapped by a key manager other than the password one (an object-like envelope)."""

    provider: str
    key_id: str
    key_version: int
    wrapped: bytes

    def to_doc(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "key_id": self.key_id,
            "key_version": self.key_version,
            "wrapped": _b64(self.wrapped),
        }

    @staticmethod
    def from_doc(doc: Any) -> KmsSeal:
        if not isinstance(doc, dict):
            raise VolumeError("volume descriptor: auth.kms is not an object")
        try:
            return KmsSeal(
                provider=str(doc["provider"]),
                key_id=str(doc.get("key_id", "")),
                key_version=int(doc["key_version"]),
                wrapped=_unb64(doc["wrapped"], "auth.kms.wrapped"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VolumeError(f"volume descriptor: auth.kms is missing {exc}") from None


@dataclass
class DescriptorAuth:
    """How to open the DAK (one seal per anchor) and the MAC it makes."""

    mac: bytes = b""
    password: bytes | None = None  # nonce || GCM(MUK, DAK): docs/FORMAT.md section 5.5
    kms: KmsSeal | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mac": _b64(self.mac)}
        if self.password is not None:
            doc["password"] = _b64(self.password)
        if self.kms is not None:
            doc["kms"] = self.kms.to_doc()
        return doc

    @staticmethod
    def from_doc(doc: Any) -> DescriptorAuth:
        if not isinstance(doc, dict):
            raise VolumeError("volume descriptor: auth is not an object")
        if "mac" not in doc:
            raise VolumeError("volume descriptor: auth has no mac")
        mac = _unb64(doc["mac"], "auth.mac")
        if len(mac) != MAC_LEN:
            raise VolumeError(f"volume descriptor: auth.mac is {len(mac)} bytes, not {MAC_LEN}")
        password = _unb64(doc["password"], "auth.password") if "password" in doc else None
        kms = KmsSeal.from_doc(doc["kms"]) if "kms" in doc else None
        if password is None and kms is None:
            raise VolumeError("volume descriptor: auth has neither a password nor a kms seal")
        return DescriptorAuth(mac, password, kms)


@dataclass
class Descriptor:
    volume_id: str
    chunk_size: int = v1.DEFAULT_CHUNK
    provider: str = PASSWORD_PROVIDER
    key_settings: dict[str, Any] = field(default_factory=dict)
    object_format: str = "1"
    version: int = DESCRIPTOR_VERSION
    # Other managers whose objects may still be in the volume (after a migrate): read only.
    # Each is {"provider": name, "settings": {...}}; never the active provider.
    previous: list[dict[str, Any]] = field(default_factory=list)
    # Scheduled rotation (`keys schedule`, `keys rotate --due`): the policy and the time of the
    # last rotation (or of init), kept here so every admin machine sees the same schedule.
    rotation_days: int = 0
    rotated_at: int | None = None
    # object_format "gateway": how new files are written in the S3 Encryption Gateway's format
    # ({"wrap": "password" | "memory", "iterations": N, "algorithm": ..., "chunk_size": N}).
    gateway: dict[str, Any] = field(default_factory=dict)
    # Objects with no encryption marker: refused (EIO) unless the volume allows reading them.
    allow_plaintext: bool = False
    # Raised by one at every write: a reader that has seen generation N refuses anything older
    # (an old descriptor put back keeps a valid MAC, and may hold keys since retired).
    generation: int = 0
    auth: DescriptorAuth | None = None
    # Top-level fields of a newer writer: kept on rewrite, covered by the MAC.
    extra: dict[str, Any] = field(default_factory=dict)
    # What the MAC covers, as read (None for a descriptor built in memory).
    signed: bytes | None = field(default=None, compare=False, repr=False)

    def providers(self) -> dict[str, dict[str, Any]]:
        """Every provider the volume can hold objects of, with its settings (active first)."""
        found = {self.provider: self.key_settings}
        for entry in self.previous:
            found.setdefault(entry["provider"], entry["settings"])
        return found

    def password_settings(self) -> dict[str, Any] | None:
        return self.providers().get(PASSWORD_PROVIDER)

    @staticmethod
    def new_volume_id() -> str:
        return os.urandom(16).hex()

    def body(self) -> dict[str, Any]:
        """The document without the MAC: what the MAC is computed over."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "s3cryptfs": "volume",
                "version": self.version,
                "volume_id": self.volume_id,
                "object_format": self.object_format,
                "chunk_size": self.chunk_size,
                "key_manager": {"provider": self.provider, "settings": self.key_settings},
            }
        )
        if self.version >= DESCRIPTOR_VERSION:
            doc["generation"] = self.generation
        if self.previous:
            doc["previous_key_managers"] = self.previous
        if self.rotation_days or self.rotated_at is not None:
            doc["rotation"] = {"max_age_days": self.rotation_days, "last": self.rotated_at}
        if self.gateway:
            doc["gateway"] = self.gateway
        if self.allow_plaintext:
            doc["allow_plaintext"] = True
        if self.auth is not None:
            auth = self.auth.to_doc()
            del auth["mac"]
            doc["auth"] = auth
        return doc

    def encode(self) -> bytes:
        doc = self.body()
        if self.auth is not None:
            doc["auth"]["mac"] = _b64(self.auth.mac)
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @staticmethod
    def decode(raw: bytes, *, legacy: bool = False) -> Descriptor:
        """Parse (not verify: see ``verify``). Version 1 only when *legacy* (the upgrade)."""
        if len(raw) > MAX_DESCRIPTOR_BYTES:
            raise VolumeError(
                f"volume descriptor is {len(raw)} bytes, more than the "
                f"{MAX_DESCRIPTOR_BYTES} a descriptor may have"
            )
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise VolumeError(f"volume descriptor is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("s3cryptfs") != "volume":
            raise VolumeError("volume descriptor is not an s3cryptfs descriptor")
        version = doc.get("version")
        if version == LEGACY_VERSION and type(version) is int and not legacy:
            raise LegacyDescriptor(
                "the volume descriptor is version 1, which is not authenticated (anyone who "
                "can write to the bucket could change it): upgrade it once, from a machine "
                "you trust, with: s3cryptfs upgrade URL"
            )
        if type(version) is not int or version not in (LEGACY_VERSION, DESCRIPTOR_VERSION):
            raise VolumeError(
                f"volume descriptor version {version!r} is not supported by this s3cryptfs "
                f"(it reads version {DESCRIPTOR_VERSION}); upgrade s3cryptfs"
            )
        if version == DESCRIPTOR_VERSION:
            try:
                json.loads(raw, parse_float=_no_float, parse_constant=_no_float)
            except _FloatFound:
                raise VolumeError(
                    "volume descriptor has a number with a fraction or an exponent: version 2 "
                    "holds integers only"
                ) from None
        try:
            km = doc["key_manager"]
            desc = Descriptor(
                volume_id=_text(doc["volume_id"], "volume_id"),
                chunk_size=_int(doc["chunk_size"], "chunk_size"),
                provider=_text(km["provider"], "key_manager.provider"),
                key_settings=_obj(km.get("settings", {}), "key_manager.settings"),
                object_format=_text(doc.get("object_format", "1"), "object_format"),
                version=version,
                previous=[
                    {
                        "provider": _text(e["provider"], "previous provider"),
                        "settings": _obj(e.get("settings", {}), "previous settings"),
                    }
                    for e in doc.get("previous_key_managers", [])
                ],
            )
            rotation = _obj(doc.get("rotation") or {}, "rotation")
            desc.rotation_days = _int(rotation.get("max_age_days", 0), "rotation.max_age_days")
            last = rotation.get("last")
            desc.rotated_at = None if last is None else int(last)
            desc.gateway = _obj(doc.get("gateway") or {}, "gateway")
            plain = doc.get("allow_plaintext", False)
            if not isinstance(plain, bool):
                raise VolumeError("volume descriptor: allow_plaintext must be true or false")
            desc.allow_plaintext = plain
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VolumeError(f"volume descriptor is missing or has a bad field: {exc}") from None
        if desc.object_format not in OBJECT_FORMATS:
            raise VolumeError(f"volume object format {desc.object_format!r} is not supported")
        if desc.object_format == GATEWAY_FORMAT and desc.gateway.get("wrap") not in GATEWAY_WRAPS:
            raise VolumeError("volume descriptor: gateway format without a valid gateway.wrap")
        try:
            v1.check_chunk_size(desc.chunk_size)
        except (FormatError, TypeError) as exc:  # TypeError: not a number
            raise VolumeError(f"volume descriptor: {exc}") from None
        known = {
            "s3cryptfs",
            "version",
            "volume_id",
            "object_format",
            "chunk_size",
            "key_manager",
            "previous_key_managers",
            "rotation",
            "gateway",
            "allow_plaintext",
            "generation",
            "auth",
        }
        desc.extra = {k: v for k, v in doc.items() if k not in known}
        if version == DESCRIPTOR_VERSION:
            desc.generation = _int(doc.get("generation"), "generation")
            if "auth" not in doc:
                raise DescriptorAuthError("volume descriptor version 2 has no auth block")
            desc.auth = DescriptorAuth.from_doc(doc["auth"])
            _check_seals(desc)
            body = dict(doc)
            body["auth"] = {k: v for k, v in doc["auth"].items() if k != "mac"}
            desc.signed = signing_input(body)
        return desc

    # --- authentication ----------------------------------------------------------------------

    def verify(self, dak: bytes) -> None:
        """Raise DescriptorAuthError unless the MAC read is the one *dak* makes."""
        expected = b""
        if self.auth is not None and self.signed is not None:
            expected = hmac.new(mac_key(dak, self.volume_id), self.signed, hashlib.sha256).digest()
        if self.auth is None or not hmac.compare_digest(expected, self.auth.mac):
            raise DescriptorAuthError(
                "the volume descriptor does not authenticate: it was changed by someone who "
                "does not hold the volume's keys; refusing it"
            )

    def sign(self, dak: bytes) -> None:
        """Compute the MAC over the current content (``auth`` must hold the seals)."""
        assert self.auth is not None, "seal the DAK for its anchors before signing"
        self.version = DESCRIPTOR_VERSION
        self.signed = signing_input(self.body())
        self.auth.mac = hmac.new(
            mac_key(dak, self.volume_id), self.signed, hashlib.sha256
        ).digest()


class LegacyDescriptor(VolumeError):
    """A version 1 (unauthenticated) descriptor where version 2 is required."""


class _FloatFound(Exception):
    pass


def _no_float(text: str) -> Any:
    raise _FloatFound(text)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise VolumeError(f"volume descriptor: {what} must be a string")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise VolumeError(f"volume descriptor: {what} must be an integer")
    return value


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VolumeError(f"volume descriptor: {what} must be an object")
    return dict(value)


def _check_seals(desc: Descriptor) -> None:
    """The seals a version 2 descriptor must carry (docs/FORMAT.md section 4.2)."""
    assert desc.auth is not None
    if desc.password_settings() is not None and desc.auth.password is None:
        raise DescriptorAuthError(
            "volume descriptor: it has the password key manager but no password seal"
        )
    if desc.provider != PASSWORD_PROVIDER and desc.auth.kms is None:
        raise DescriptorAuthError(
            f"volume descriptor: its key manager {desc.provider} has no kms seal"
        )
    kms = desc.auth.kms
    if kms is not None and (
        kms.provider == PASSWORD_PROVIDER or kms.provider not in desc.providers()
    ):
        raise DescriptorAuthError(
            f"volume descriptor: the kms seal names provider {kms.provider!r}, which is not "
            "one of its KMS key managers"
        )


def signing_input(body: dict[str, Any]) -> bytes:
    """The bytes the MAC covers: a domain label, then the canonical JSON of *body* (sorted
    keys, no whitespace, UTF-8, minimal escapes; integers only)."""
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return _MAC_DOMAIN + canonical.encode("utf-8")


def _hkdf(dak: bytes, label: bytes, volume_id: str, length: int) -> bytes:
    info = label + b"\x00" + volume_id.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(dak)


def mac_key(dak: bytes, volume_id: str) -> bytes:
    return _hkdf(dak, b"s3cryptfs descriptor mac", volume_id, 32)


def fingerprint(dak: bytes, volume_id: str) -> str:
    """What a person compares: 16 bytes, shown as 8 groups of 4 hex digits. One-way: it tells
    nothing of the DAK."""
    raw = _hkdf(dak, b"s3cryptfs descriptor fingerprint", volume_id, 16).hex()
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def normalize_fingerprint(text: str) -> str:
    digits = "".join(c for c in text.lower() if c in "0123456789abcdef")
    if len(digits) != 32:
        raise VolumeError(f"{text!r} is not a volume fingerprint (32 hex digits)")
    return "-".join(digits[i : i + 4] for i in range(0, 32, 4))


def new_auth_key() -> bytes:
    return os.urandom(AUTH_KEY_LEN)
