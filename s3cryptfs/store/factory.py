"""The one place that picks an ObjectStore implementation from the settings (--s3-client)."""

from __future__ import annotations

from s3cryptfs.errors import ConfigError
from s3cryptfs.store.base import ObjectStore, StoreSettings
from s3cryptfs.store.s3 import S3Store

CLIENTS = ("boto3", "native")


def open_store(settings: StoreSettings) -> ObjectStore:
    if settings.client == "boto3":
        return S3Store(settings)
    if settings.client == "native":
        # Imported on demand: awscrt starts its own threads, and boto3 mounts need none.
        from s3cryptfs.store.native import NativeStore

        return NativeStore(settings)
    raise ConfigError(f"--s3-client {settings.client!r}: choose one of {', '.join(CLIENTS)}")
