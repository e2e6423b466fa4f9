"""Tests that change a volume descriptor do it as an administrator would: through the volume
authority, with the password, so the result is signed (a bare PUT is what an attacker does)."""

from __future__ import annotations

from collections.abc import Callable

from s3cryptfs.config import parse_url
from s3cryptfs.format.descriptor import Descriptor
from s3cryptfs.keys.ring import LocalKeys
from s3cryptfs.store.s3 import S3Store, StoreSettings
from s3cryptfs.volume import VolumeAuthority
from tests.conftest import PASSWORD


def volume_store(vol, seaweed) -> S3Store:
    return S3Store(
        StoreSettings(bucket=vol.bucket, endpoint_url=seaweed.endpoint_url),
        client=seaweed.client(),
    )


def open_authority(vol, seaweed, store: S3Store | None = None) -> VolumeAuthority:
    authority = VolumeAuthority(
        store or volume_store(vol, seaweed),
        parse_url(vol.url),
        vol.endpoint_url,
        LocalKeys(password=PASSWORD.encode()),
    )
    authority.open()
    return authority


def rewrite_descriptor(
    vol, seaweed, change: Callable[[Descriptor], Descriptor | None]
) -> Descriptor:
    """Apply *change* and write the descriptor back, signed with the volume's key."""
    authority = open_authority(vol, seaweed)
    try:
        return authority.update(change)
    finally:
        assert authority.ring is not None
        authority.ring.close()
