"""The key envelope: what an object's metadata says about its wrapped data key.

Defined here, in the format layer, because it is on-bucket data (docs/FORMAT.md, docs/KEYS.md):
format/ parses and writes it without knowing any key manager, and keys/ (which may import
format/, never the reverse) wraps and unwraps it. ``s3cryptfs.keys.base`` re-exports it for
plugins.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyEnvelope:
    """A wrapped data key and what is needed to find the key that unwraps it."""

    key_id: str
    key_version: int
    provider: str
    ciphertext: bytes

    def __repr__(self) -> str:  # never print the wrapped bytes whole
        return (
            f"KeyEnvelope(provider={self.provider!r}, key_id={self.key_id!r}, "
            f"key_version={self.key_version}, ciphertext=<{len(self.ciphertext)} bytes>)"
        )
