"""``s3cryptfs keys export`` and ``keys import``: the volume's keys, sealed, kept off the bucket."""

from __future__ import annotations

import argparse
import os

from s3cryptfs import config, limits
from s3cryptfs.errors import ConfigError, ObjectNotFound, PreconditionFailed, VolumeError
from s3cryptfs.format.descriptor import Descriptor, descriptor_key
from s3cryptfs.keys.password import check_new_password
from s3cryptfs.mount import check_bucket, make_store
from s3cryptfs.ops import keyexport

EXPORT_PASSWORD_ENV = "S3CRYPTFS_EXPORT_PASSWORD"


def _passphrase(args: argparse.Namespace, new: bool) -> bytes:
    if args.export_password_file:
        secret = config.read_password_file(args.export_password_file)
    elif os.environ.get(EXPORT_PASSWORD_ENV):
        secret = os.environ[EXPORT_PASSWORD_ENV].encode()
    else:
        import getpass
        import sys

        if not sys.stdin.isatty():
            raise ConfigError(
                "no export passphrase: use --export-password-file FILE, set "
                f"{EXPORT_PASSWORD_ENV}, or run on a terminal"
            )
        secret = getpass.getpass("Export passphrase: ").encode()
        if new and getpass.getpass("Repeat export passphrase: ").encode() != secret:
            raise ConfigError("the passphrases do not match")
    if new:
        check_new_password(secret)
    return secret


def cmd_export(args: argparse.Namespace) -> int:
    if not args.file:
        raise ConfigError("keys export: give --output FILE")
    url = config.parse_url(args.url)
    store = make_store(url, args.endpoint_url, args.region, retry_deadline=30)
    check_bucket(store)
    key = descriptor_key(url.prefix)
    try:
        raw, _ = store.get_bounded(key, limits.DESCRIPTOR_MAX, "volume descriptor")
    except ObjectNotFound:
        raise VolumeError(f"{url} is not an s3cryptfs volume ({key} is missing)") from None
    desc = Descriptor.decode(raw)
    blob = keyexport.seal(desc, str(url), _passphrase(args, new=True))
    fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    where = (
        "it holds the volume's keys, sealed under the volume password"
        if desc.provider == "s3cryptfs-password"
        else f"it holds references only: the keys stay in {desc.provider}"
    )
    print(f"exported the keys of {url} (volume {desc.volume_id}) to {args.file}; {where}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with open(args.file, "rb") as f:
        blob = f.read()
    desc, doc = keyexport.open_bundle(blob, _passphrase(args, new=False))
    url = config.parse_url(args.url)
    store = make_store(url, args.endpoint_url, args.region, retry_deadline=30)
    check_bucket(store)
    key = descriptor_key(url.prefix)
    body = desc.encode()
    try:
        current, info = store.get_bounded(key, limits.DESCRIPTOR_MAX, "volume descriptor")
        etag = info.etag
    except ObjectNotFound:
        current, etag = None, None
    if current is not None:
        if current == body:
            print(f"{url} already has this descriptor: nothing to do")
            return 0
        if not args.force:
            raise VolumeError(
                f"{url} already has a different descriptor ({key}); "
                "use --force to replace it with the export"
            )
    try:
        store.put(
            key,
            body,
            {},
            if_match=etag,
            if_none_match=etag is None,
            content_type="application/json",
        )
    except PreconditionFailed:
        raise VolumeError(f"{key} changed while importing: run the import again") from None
    print(f"restored the keys of volume {desc.volume_id} (exported from {doc['volume']}) to {url}")
    return 0
