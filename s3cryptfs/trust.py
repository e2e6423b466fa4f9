"""What this machine remembers of each volume it has opened: the pin.

A pin holds the fingerprint of the volume's descriptor authentication key, the highest
descriptor generation seen and the last descriptor that authenticated. It is what lets a
machine that opens the volume through a KMS alone (no password) tell the real descriptor from
one a bucket writer made with a KMS key of their own, refuse a descriptor put back from the
past, and mount while the KMS is down. Nothing secret is in it; it lives under the state
directory (docs/SECURITY.md), one file per volume location, written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from s3cryptfs.errors import ConfigError

log = logging.getLogger(__name__)

STATE_ENV = "S3CRYPTFS_STATE_DIR"


def default_state_dir() -> str:
    configured = os.environ.get(STATE_ENV)
    if configured:
        return configured
    if os.geteuid() == 0:
        return "/var/lib/s3cryptfs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "s3cryptfs")


@dataclass
class Pin:
    volume: str  # s3://bucket/prefix, for the person reading the file
    endpoint: str
    volume_id: str
    fingerprint: str
    generation: int
    descriptor: str  # the last descriptor that authenticated, as stored

    def to_doc(self) -> dict[str, Any]:
        return {
            "s3cryptfs": "pin",
            "volume": self.volume,
            "endpoint": self.endpoint,
            "volume_id": self.volume_id,
            "fingerprint": self.fingerprint,
            "generation": self.generation,
            "descriptor": self.descriptor,
        }


class TrustStore:
    """Pins by volume location (endpoint, bucket, prefix) under ``<state dir>/trust/``."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.join(root or default_state_dir(), "trust")

    def path(self, endpoint: str | None, volume: str) -> str:
        ident = f"{endpoint or 'aws'}|{volume}".encode()
        return os.path.join(self.root, hashlib.sha256(ident).hexdigest()[:24] + ".json")

    def load(self, endpoint: str | None, volume: str) -> Pin | None:
        path = self.path(endpoint, volume)
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"the pin of {volume} at {path} cannot be read ({exc}); check or delete it"
            ) from None
        try:
            return Pin(
                volume=str(doc["volume"]),
                endpoint=str(doc["endpoint"]),
                volume_id=str(doc["volume_id"]),
                fingerprint=str(doc["fingerprint"]),
                generation=int(doc["generation"]),
                descriptor=str(doc["descriptor"]),
            )
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"the pin of {volume} at {path} is damaged; check or delete it"
            ) from None

    def save(self, pin: Pin) -> None:
        path = self.path(pin.endpoint, pin.volume)
        try:
            os.makedirs(os.path.dirname(self.root), mode=0o700, exist_ok=True)
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".pin-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(pin.to_doc(), f, indent=2, sort_keys=True)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            # The volume still opens; the next contact is then a first contact again.
            log.warning("cannot record the pin of %s in %s: %s", pin.volume, self.root, exc)

    def forget(self, endpoint: str | None, volume: str) -> bool:
        try:
            os.unlink(self.path(endpoint, volume))
        except FileNotFoundError:
            return False
        return True
