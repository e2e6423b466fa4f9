"""Read-modify-write of the volume descriptor with a conditional PUT.

Two admins running ``keys rotate`` at once must not clobber each other: the write carries
If-Match with the ETag that was read; the loser re-reads and re-applies its change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from s3cryptfs.config import VolumeURL
from s3cryptfs.errors import PreconditionFailed, VolumeError
from s3cryptfs.format.descriptor import Descriptor, descriptor_key
from s3cryptfs.mount import read_descriptor_etag
from s3cryptfs.store.s3 import S3Store

log = logging.getLogger(__name__)

ATTEMPTS = 5


def update_descriptor(
    store: S3Store, url: VolumeURL, change: Callable[[Descriptor], Descriptor | None]
) -> Descriptor:
    """Apply *change* to the current descriptor and write it back only if nobody else did.

    *change* gets a fresh descriptor each attempt (it may be called more than once) and returns
    the new one, or None for "nothing to write". Returns the descriptor now stored.
    """
    key = descriptor_key(url.prefix)
    for _ in range(ATTEMPTS):
        current, etag = read_descriptor_etag(store, url)
        updated = change(current)
        if updated is None:
            return current
        try:
            store.put(key, updated.encode(), {}, if_match=etag, content_type="application/json")
        except PreconditionFailed:
            log.warning("the volume descriptor changed while we updated it; trying again")
            continue
        return updated
    raise VolumeError(
        f"the volume descriptor {key} kept changing under us ({ATTEMPTS} attempts); try again"
    )
