"""The volume descriptor: one small JSON object under ``<prefix>.s3cryptfs/volume.json``.

It holds no secret in clear: the password manager's keys in it are sealed under the password.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from s3cryptfs.errors import VolumeError
from s3cryptfs.format import v1

DESCRIPTOR_VERSION = 1
META_DIR = ".s3cryptfs"
DESCRIPTOR_NAME = "volume.json"


GATEWAY_FORMAT = "gateway"
OBJECT_FORMATS = ("1", GATEWAY_FORMAT)
GATEWAY_WRAPS = ("password", "memory", "cosmian-kmip")


def descriptor_key(prefix: str) -> str:
    return f"{prefix}{META_DIR}/{DESCRIPTOR_NAME}"


@dataclass
class Descriptor:
    volume_id: str
    chunk_size: int = v1.DEFAULT_CHUNK
    provider: str = "s3cryptfs-password"
    key_settings: dict[str, Any] = field(default_factory=dict)
    object_format: str = "1"
    version: int = DESCRIPTOR_VERSION
    # Other managers whose objects may still be in the volume (after a migrate): read only.
    # Each is {"provider": name, "settings": {...}}; never the active provider.
    previous: list[dict[str, Any]] = field(default_factory=list)
    # Scheduled rotation (`keys schedule`, `keys rotate --due`): the policy and the time of the
    # last rotation (or of init), kept here so every admin machine sees the same schedule.
    rotation_days: int = 0
    rotated_at: float | None = None
    # object_format "gateway": how new files are written in the S3 Encryption Gateway's format
    # ({"wrap": "password" | "memory", "iterations": N, "algorithm": ..., "chunk_size": N}).
    gateway: dict[str, Any] = field(default_factory=dict)
    # Objects with no encryption marker: refused (EIO) unless the volume allows reading them.
    allow_plaintext: bool = False

    def providers(self) -> dict[str, dict[str, Any]]:
        """Every provider the volume can hold objects of, with its settings (active first)."""
        found = {self.provider: self.key_settings}
        for entry in self.previous:
            found.setdefault(entry["provider"], entry["settings"])
        return found

    @staticmethod
    def new_volume_id() -> str:
        return os.urandom(16).hex()

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "s3cryptfs": "volume",
            "version": self.version,
            "volume_id": self.volume_id,
            "object_format": self.object_format,
            "chunk_size": self.chunk_size,
            "key_manager": {"provider": self.provider, "settings": self.key_settings},
        }
        if self.previous:
            doc["previous_key_managers"] = self.previous
        if self.rotation_days or self.rotated_at is not None:
            doc["rotation"] = {"max_age_days": self.rotation_days, "last": self.rotated_at}
        if self.gateway:
            doc["gateway"] = self.gateway
        if self.allow_plaintext:
            doc["allow_plaintext"] = True
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @staticmethod
    def decode(raw: bytes) -> Descriptor:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise VolumeError(f"volume descriptor is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("s3cryptfs") != "volume":
            raise VolumeError("volume descriptor is not an s3cryptfs descriptor")
        version = doc.get("version")
        if version != DESCRIPTOR_VERSION:
            raise VolumeError(
                f"volume descriptor version {version!r} is not supported by this s3cryptfs "
                f"(it reads version {DESCRIPTOR_VERSION}); upgrade s3cryptfs"
            )
        try:
            km = doc["key_manager"]
            desc = Descriptor(
                volume_id=str(doc["volume_id"]),
                chunk_size=int(doc["chunk_size"]),
                provider=str(km["provider"]),
                key_settings=dict(km.get("settings", {})),
                object_format=str(doc.get("object_format", "1")),
                previous=[
                    {"provider": str(e["provider"]), "settings": dict(e.get("settings", {}))}
                    for e in doc.get("previous_key_managers", [])
                ],
            )
            rotation = doc.get("rotation") or {}
            desc.rotation_days = int(rotation.get("max_age_days", 0))
            last = rotation.get("last")
            desc.rotated_at = None if last is None else float(last)
            desc.gateway = dict(doc.get("gateway") or {})
            desc.allow_plaintext = doc.get("allow_plaintext") is True
        except (KeyError, TypeError, ValueError) as exc:
            raise VolumeError(f"volume descriptor is missing or has a bad field: {exc}") from None
        if desc.object_format not in OBJECT_FORMATS:
            raise VolumeError(f"volume object format {desc.object_format!r} is not supported")
        if desc.object_format == GATEWAY_FORMAT and desc.gateway.get("wrap") not in GATEWAY_WRAPS:
            raise VolumeError("volume descriptor: gateway format without a valid gateway.wrap")
        try:
            v1.check_chunk_size(desc.chunk_size)
        except Exception as exc:
            raise VolumeError(f"volume descriptor: {exc}") from None
        return desc
