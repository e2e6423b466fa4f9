"""The Go gateway's KEY_MANAGER_ENABLED switch, checked by every command that takes a key
manager."""

from __future__ import annotations

import argparse
import os

from s3cryptfs.errors import ConfigError

SEED_KMS_ENV = "KEY_MANAGER_ENABLED"  # the Go gateway's switch for KMS mode


def check_seed_key_manager_setting(args: argparse.Namespace) -> None:
    """The Go gateway's KEY_MANAGER_ENABLED, read by every command that takes --kms-config so
    that it is never silently ignored: KMS mode asked for must be configured, and the
    password mode asked for must not meet a key manager."""
    raw = os.environ.get(SEED_KMS_ENV)
    if raw is None:
        return
    value = raw.strip().lower()
    if value not in ("true", "false"):  # as the gateway's documentation says: nothing else
        raise ConfigError(f"{SEED_KMS_ENV}={raw}: expected true or false")
    from s3cryptfs.keys.password import PROVIDER as PASSWORD_PROVIDER

    if args.command == "init":
        chosen, given, need = (
            args.key_manager != PASSWORD_PROVIDER,
            f"--key-manager {args.key_manager}",
            "--key-manager PROVIDER and --kms-config FILE",
        )
    elif args.command == "migrate":
        chosen, given, need = (
            args.to != PASSWORD_PROVIDER,
            f"--to {args.to}",
            "--to PROVIDER and --kms-config FILE",
        )
    else:
        chosen, given, need = bool(args.kms_config), "--kms-config", "--kms-config FILE"
    if value == "true" and not chosen:
        raise ConfigError(
            f"{SEED_KMS_ENV}={raw} (the gateway's setting) asks for KMS mode, but no key "
            f"manager was chosen: give {need}, or unset {SEED_KMS_ENV}"
        )
    if value == "false" and chosen:
        raise ConfigError(
            f"{SEED_KMS_ENV}={raw} (the gateway's setting) contradicts {given}: unset one of them"
        )

