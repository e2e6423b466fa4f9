"""``s3cryptfs upgrade``: make a version 1 descriptor (unauthenticated) a signed version 2 one.

Version 1 descriptors could be changed by anyone with write access to the bucket, so this step
is the one moment the descriptor is taken on trust: it runs on a machine the operator trusts,
checks what it can (the password opens the sealed keys; each KMS answers), prints every setting
that steers keys or formats for the operator to confirm, and refuses on a machine that has
already seen a signed descriptor of the volume (a version 1 one there means a replacement).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from s3cryptfs import config
from s3cryptfs.errors import DescriptorAuthError
from s3cryptfs.format.descriptor import (
    DESCRIPTOR_VERSION,
    GATEWAY_FORMAT,
    PASSWORD_PROVIDER,
    Descriptor,
)
from s3cryptfs.keys.registry import shared_settings
from s3cryptfs.keys.ring import KeyRing
from s3cryptfs.mount import check_bucket, make_store
from s3cryptfs.ops.commands import local_keys, open_admin
from s3cryptfs.trust import TrustStore
from s3cryptfs.volume import VolumeAuthority, read_raw


def _integers(value: Any) -> Any:
    """Version 2 holds integers only (its MAC covers a canonical form); version 1 writers put
    Unix times with fractions in a few places."""
    if isinstance(value, float):
        return int(value)
    if isinstance(value, dict):
        return {k: _integers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integers(v) for v in value]
    return value


def _shared(provider: str, settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    kept = shared_settings(provider, settings)
    return _integers(kept), sorted(set(settings) - set(kept))


def _summary(desc: Descriptor) -> list[str]:
    lines = [
        f"  volume id:      {desc.volume_id}",
        f"  key manager:    {desc.provider} {_identity(desc.provider, desc.key_settings)}",
    ]
    for entry in desc.previous:
        lines.append(
            f"  also reads:     {entry['provider']} "
            f"{_identity(entry['provider'], entry['settings'])}"
        )
    fmt = "s3cryptfs" if desc.object_format != GATEWAY_FORMAT else "gateway"
    if desc.object_format == GATEWAY_FORMAT:
        fmt += f" (data keys wrapped by: {desc.gateway.get('wrap')})"
    lines.append(f"  new files:      {fmt} format, {desc.chunk_size // 1024} KiB chunks")
    lines.append(f"  plaintext:      {'SERVED' if desc.allow_plaintext else 'refused'}")
    return lines


def _identity(provider: str, settings: dict[str, Any]) -> str:
    if provider == PASSWORD_PROVIDER:
        versions = [k.get("version") for k in settings.get("keys", [])]
        return f"(key versions {versions}, active {settings.get('active_version')})"
    shown = {k: v for k, v in settings.items() if k != "keys"}
    if "keys" in settings:
        shown["keys"] = [k.get("id", k) if isinstance(k, dict) else k for k in settings["keys"]]
    return str(shown)


def cmd_upgrade(args: argparse.Namespace) -> int:
    url = config.parse_url(args.url)
    store = make_store(url, args.endpoint_url, args.region, retry_deadline=30)
    check_bucket(store)
    raw, etag = read_raw(store, url)
    desc = Descriptor.decode(raw, legacy=True)
    if desc.version == DESCRIPTOR_VERSION:
        admin, current = open_admin(args)  # authenticates it, as any command would
        try:
            print(
                f"{url} is already authenticated (descriptor version {current.version}, "
                f"fingerprint {admin.authority.fingerprint})"
            )
        finally:
            admin.close()
        return 0
    trust = TrustStore()
    pin = trust.load(args.endpoint_url or "aws", str(url))
    if pin is not None:
        raise DescriptorAuthError(
            f"this machine has seen a signed descriptor of {url} (generation "
            f"{pin.generation}, fingerprint {pin.fingerprint}); an unsigned one there now "
            "means it was replaced. If the volume was really re-created, delete "
            f"{trust.path(args.endpoint_url or 'aws', str(url))} first"
        )
    dropped: list[str] = []
    desc.key_settings, gone = _shared(desc.provider, desc.key_settings)
    dropped += [f"{desc.provider}.{name}" for name in gone]
    for entry in desc.previous:
        entry["settings"], gone = _shared(entry["provider"], entry["settings"])
        dropped += [f"{entry['provider']}.{name}" for name in gone]
    desc.gateway = _integers(desc.gateway)
    desc.extra = _integers(desc.extra)

    local = local_keys(args, PASSWORD_PROVIDER in desc.providers())
    ring = KeyRing(desc, local)
    try:
        ring.open_all()  # the password opens the sealed keys; every KMS is built
        for provider in desc.providers():
            ring.manager(provider).health_check()
        print(f"upgrading {url}: descriptor version 1 -> {DESCRIPTOR_VERSION} (signed)")
        print("check that these are yours; from now on only key holders can change them:")
        print("\n".join(_summary(desc)))
        if dropped:
            print(
                "dropped from the descriptor (each machine's --kms-config gives them now): "
                + ", ".join(dropped)
            )
        authority = VolumeAuthority(store, url, args.endpoint_url, local, trust)
        authority.ring = ring
        authority.create(desc, replace_etag=etag)
    finally:
        ring.close()
    print(f"volume fingerprint: {authority.fingerprint}")
    if desc.allow_plaintext or desc.object_format == GATEWAY_FORMAT:
        print(
            "s3cryptfs: warning: this volume serves plaintext objects or writes the gateway's "
            "format; if you did not choose that, restore the descriptor from `keys export`",
            file=sys.stderr,
        )
    return 0
