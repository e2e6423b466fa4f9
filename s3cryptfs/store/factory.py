"""The one place that picks an ObjectStore implementation from the settings (--s3-client)."""

from __future__ import annotations

import urllib.parse

from s3cryptfs.errors import ConfigError
from s3cryptfs.store.base import ObjectStore, StoreSettings
from s3cryptfs.store.s3 import S3Store

CLIENTS = ("boto3", "native")


def check_endpoint(url: str | None) -> None:
    """A usage error for an endpoint that is no http(s) URL with a host, before a client
    fails on it with a message of its own parser (or a traceback)."""
    if url is None:
        return
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--endpoint-url {url!r} is not an S3 endpoint: give http://HOST[:PORT] or "
            "https://HOST[:PORT]"
        )


def open_store(settings: StoreSettings) -> ObjectStore:
    check_endpoint(settings.endpoint_url)
    if settings.client == "boto3":
        return S3Store(settings)
    if settings.client == "native":
        # Imported on demand: awscrt starts its own threads, and boto3 mounts need none.
        from s3cryptfs.store.native import NativeStore

        return NativeStore(settings)
    raise ConfigError(f"--s3-client {settings.client!r}: choose one of {', '.join(CLIENTS)}")
