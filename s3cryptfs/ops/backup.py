"""``s3cryptfs keys export`` and ``keys import``: the volume's keys, sealed, kept off the bucket."""

from __future__ import annotations

import argparse
import os

from s3cryptfs import config
from s3cryptfs.errors import ConfigError, VolumeError
from s3cryptfs.format.descriptor import PASSWORD_PROVIDER, Descriptor, descriptor_key
from s3cryptfs.keys.password import check_new_password
from s3cryptfs.mount import check_bucket, make_store
from s3cryptfs.ops import keyexport
from s3cryptfs.ops.commands import local_keys, open_admin
from s3cryptfs.volume import VolumeAuthority, read_raw

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


def _check_output(path: str) -> None:
    """Before any passphrase is asked: an export never replaces a file (it may be the only
    copy of an older export), and its directory must exist."""
    if os.path.lexists(path):
        raise ConfigError(
            f"keys export: {path} already exists; an export never replaces a file: "
            "choose another --output"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"keys export: cannot write {path}: its directory does not exist")


def cmd_export(args: argparse.Namespace) -> int:
    if not args.file:
        raise ConfigError("keys export: give --output FILE")
    _check_output(args.file)
    # Opened as any command opens it: what is exported has authenticated, and for a password
    # volume the password given has opened its keys (so "sealed under the volume password"
    # below is checked, not assumed).
    admin, desc = open_admin(args)
    try:
        blob = keyexport.seal(desc, str(admin.url), _passphrase(args, new=True))
    finally:
        admin.close()
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _check_output(args.file)  # made meanwhile: the same message as before the prompt
        raise
    except OSError as exc:
        raise ConfigError(f"keys export: cannot write {args.file}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    where = (
        "it holds the volume's keys, sealed under the volume password"
        if desc.provider == PASSWORD_PROVIDER
        else f"it holds references only: the keys stay in {desc.provider}"
    )
    print(f"exported the keys of {admin.url} (volume {desc.volume_id}) to {args.file}; {where}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Put an exported descriptor back: it must authenticate with this machine's keys, and it
    is written as a new generation (above the one in the bucket and the one pinned here), so
    machines that saw later descriptors take it instead of calling it a rollback."""
    try:
        with open(args.file, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise ConfigError(f"keys import: cannot read {args.file}: {exc.strerror}") from None
    exported, doc = keyexport.open_bundle(blob, _passphrase(args, new=False))
    url = config.parse_url(args.url)
    store = make_store(url, args.endpoint_url, args.region, retry_deadline=30)
    check_bucket(store)
    key = descriptor_key(url.prefix)
    try:
        current, etag = read_raw(store, url)
    except VolumeError:
        current, etag = None, None
    if current is not None:
        if Descriptor.decode(current, legacy=True).volume_id == exported.volume_id and (
            current == exported.encode()
        ):
            print(f"{url} already has this descriptor: nothing to do")
            return 0
        if not args.force:
            raise VolumeError(
                f"{url} already has a different descriptor ({key}); "
                "use --force to replace it with the export"
            )
    local = local_keys(args, PASSWORD_PROVIDER in exported.providers())
    authority = VolumeAuthority(store, url, args.endpoint_url, local)
    try:
        authority.adopt_exported(exported)
        restored = authority.replace(exported, etag)
    finally:
        if authority.ring is not None:
            authority.ring.close()
    print(
        f"restored the keys of volume {restored.volume_id} (exported from {doc['volume']}) to "
        f"{url} as generation {restored.generation}"
    )
    return 0
