"""`s3cryptfs init`: create a volume (its descriptor) in a bucket or prefix."""

from __future__ import annotations

import argparse
import logging
import os
import time

from s3cryptfs import config
from s3cryptfs.cli.kms_mode import check_seed_key_manager_setting
from s3cryptfs.errors import ConfigError, S3CryptFSError
from s3cryptfs.exitcodes import EXIT_OK

log = logging.getLogger("s3cryptfs")


def cmd_init(args: argparse.Namespace) -> int:
    from s3cryptfs.format import v1
    from s3cryptfs.format.descriptor import Descriptor
    from s3cryptfs.keys import password as pw
    from s3cryptfs.keys.ring import LocalKeys
    from s3cryptfs.mount import check_bucket, make_store
    from s3cryptfs.volume import VolumeAuthority

    url = config.parse_url(args.url)
    chunk = config.parse_size(args.chunk_size)
    try:
        v1.check_chunk_size(chunk)
    except S3CryptFSError as exc:
        raise ConfigError(str(exc)) from None
    volume_id = Descriptor.new_volume_id()
    check_seed_key_manager_setting(args)
    gateway = args.object_format == "gateway"
    gateway_settings: dict[str, object] = {}
    if gateway:
        from s3cryptfs.format import gateway as gw

        gateway_settings = {
            "wrap": args.gateway_wrap,
            "iterations": args.gateway_iterations,
            "algorithm": gw.ALG_AES,
            "chunk_size": 65536,
        }
        try:
            gw.WriteSettings.from_dict(gateway_settings)
        except S3CryptFSError as exc:
            raise ConfigError(str(exc)) from None
        if args.gateway_wrap == "cosmian-kmip" and args.key_manager != "cosmian-kmip":
            raise ConfigError(
                "--gateway-wrap cosmian-kmip needs --key-manager cosmian-kmip: the gateway reads "
                "KMIP-wrapped keys only from its Cosmian provider"
            )
    local = LocalKeys()
    manager: pw.PasswordKeyManager | None = None
    if args.key_manager == pw.PROVIDER:
        password = config.get_password(args.password_file, confirm=True)
        if gateway:
            # The gateway's password already exists: it is what its objects need, as it is.
            try:
                pw.check_new_password(password)
            except S3CryptFSError as exc:
                log.warning("the gateway's password is weak (%s); keeping it", exc)
        else:
            pw.check_new_password(password)
        store = make_store(url, args.endpoint_url, args.region, retry_deadline=20)
        check_bucket(store)
        local.password = password
        manager = pw.PasswordKeyManager.create(password, volume_id)
        settings = manager.settings()
    else:
        from s3cryptfs.keys.config import load_kms_config
        from s3cryptfs.ops.commands import kms_settings

        provider, options, secrets = load_kms_config(args.kms_config, os.environ)
        if provider is not None:
            local.add(provider, options, secrets)
        store = make_store(url, args.endpoint_url, args.region, retry_deadline=20)
        check_bucket(store)
        settings = kms_settings(args, volume_id)
    desc = Descriptor(
        volume_id=volume_id,
        rotated_at=int(time.time()),
        chunk_size=chunk,
        provider=args.key_manager,
        key_settings=settings,
        object_format="gateway" if gateway else "1",
        gateway=gateway_settings,
        allow_plaintext=args.allow_plaintext,
    )
    authority = VolumeAuthority(store, url, args.endpoint_url, local)
    try:
        authority.create(desc, adopt=manager)
    finally:
        if authority.ring is not None:
            authority.ring.close()
    kind = "gateway format" if gateway else f"{chunk // 1024} KiB chunks"
    print(f"created volume {url} (id {volume_id}, {kind}, key manager {args.key_manager})")
    print(f"volume fingerprint: {authority.fingerprint}")
    return EXIT_OK

