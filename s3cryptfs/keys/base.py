"""The KeyManager protocol, after the Go gateway's interface (see docs/KEYS.md).

Contract every implementation keeps:
- safe to call from several threads at once;
- never logs or stores key material in clear;
- ``unwrap_key`` raises ``KeyNotFound`` for an unknown key id/version, ``UnwrapFailed`` when the
  ciphertext does not authenticate, ``InvalidEnvelope`` for a malformed envelope and
  ``ProviderUnavailable`` when its server cannot be reached;
- ``close`` may be called more than once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# Defined with the format (it is on-bucket data); re-exported here for key manager plugins.
from s3cryptfs.format.envelope import KeyEnvelope

__all__ = [
    "KeyAdmin",
    "KeyEnvelope",
    "KeyManager",
    "KeyManagerFactory",
    "KeyVersionInfo",
    "wraps_locally",
]


@runtime_checkable
class KeyManager(Protocol):
    """Wraps per-object data keys (DEKs) under a key it manages."""

    provider: str

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        """Wrap *dek* under the active key. *context* is bound where the provider can bind it."""
        ...

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        """Return the DEK inside *envelope*, or raise one of the KeyManagerError kinds."""
        ...

    def active_key_version(self) -> int:
        """The version new objects are wrapped under."""
        ...

    def health_check(self) -> None:
        """Raise ProviderUnavailable (or another KeyManagerError) when the manager cannot work."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...


def wraps_locally(manager: KeyManager) -> bool:
    """*manager* wraps and unwraps with keys it holds in memory, no server involved: each is
    a few microseconds and cannot block, so it may run on the event loop. Opt-in (a class
    attribute ``wraps_locally = True``): a manager that says nothing is taken to call a
    server."""
    return getattr(manager, "wraps_locally", False) is True


@dataclass(frozen=True)
class KeyVersionInfo:
    """One key version as a manager's administration side sees it."""

    version: int
    key_id: str
    state: str  # "active", "decrypt-only" (dual-read window) or "retired"
    created: float | None = None  # Unix time, when the manager knows it


@runtime_checkable
class KeyAdmin(Protocol):
    """Optional administration side of a KeyManager (``s3cryptfs keys ...``).

    Managers whose versions live in the volume descriptor (password, kmip, awskms) return the
    new descriptor settings from ``rotate``/``retire``; the caller writes the descriptor back
    with a conditional PUT. Managers whose versions live on their server (vault, keystore)
    change the server and return their settings unchanged.
    """

    def versions(self) -> list[KeyVersionInfo]:
        """Every version this manager knows, oldest first."""
        ...

    def rotate(self) -> dict[str, Any]:
        """Make a new active version; older ones stay readable. Returns descriptor settings."""
        ...

    def retire(self, version: int) -> dict[str, Any]:
        """Stop *version* from unwrapping (never the active one). Returns descriptor settings."""
        ...


class KeyManagerFactory(Protocol):
    """What the entry point ``s3cryptfs.key_managers`` names: a class or callable."""

    def __call__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> KeyManager: ...
