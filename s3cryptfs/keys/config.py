"""Machine-local key manager configuration: a TOML file plus environment variables.

The volume descriptor holds what every machine shares (provider name, key ids, key versions);
how THIS machine reaches the key server (addresses, certificates) and its secrets (tokens,
passphrases) come from ``--kms-config FILE``::

    [key_manager]
    provider = "vault"
    address = "https://127.0.0.1:8200"
    token_file = "/etc/s3cryptfs/vault-token"      # or S3CRYPTFS_VAULT_TOKEN / VAULT_TOKEN

    [key_manager.secrets]                           # optional; better kept in the environment
    token = "..."

Merge rule (see ``merge_settings``): the local options are laid over the descriptor's settings,
so connection fields set locally win; the descriptor keeps the key identity.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from typing import Any

from s3cryptfs.errors import ConfigError
from s3cryptfs.keys.registry import provider_names

# Environment variables that carry secrets: name -> (provider or None for any, secret name).
SECRET_ENV: dict[str, tuple[str | None, str]] = {
    "S3CRYPTFS_VAULT_TOKEN": ("vault", "token"),
    "VAULT_TOKEN": ("vault", "token"),
    "S3CRYPTFS_KEYSTORE_PASSPHRASE": ("keystore", "passphrase"),
    "S3CRYPTFS_KEYSTORE_DB_PASSWORD": ("keystore", "db_password"),
    "S3CRYPTFS_KMIP_KEY_PASSWORD": ("kmip", "key_password"),
    "S3CRYPTFS_COSMIAN_KMIP_KEY_PASSWORD": ("cosmian-kmip", "key_password"),
}
# Generic form for any plugin: S3CRYPTFS_SECRET_<NAME> -> secrets["<name>"].
GENERIC_PREFIX = "S3CRYPTFS_SECRET_"
# Option names that hold a path to a file whose content is a secret: "<name>_file" -> "<name>".
FILE_SUFFIX = "_file"
SECRET_FILE_OPTIONS = ("token_file", "passphrase_file", "db_password_file", "key_password_file")
# Secrets the built-in managers read. Under [key_manager] itself they would be taken for
# connection options and silently ignored (and the file's mode never checked): refused there.
SECRET_NAMES = (
    "token",
    "passphrase",
    "db_password",
    "key_password",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
)


def _read_secret_file(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} file {path} is readable by group or others; run: chmod 600 {path}"
        )
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\r\n")


def load_kms_config(
    path: str | None, env: Mapping[str, str]
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """(provider, options, secrets) from *path* (may be None) and *env*.

    Secrets come, in increasing priority, from ``[key_manager.secrets]`` in the file, files named
    by ``*_file`` options, and the environment. Nothing here is ever logged.
    """
    provider: str | None = None
    options: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read key manager config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"key manager config {path} is not valid TOML: {exc}") from None
        table = doc.get("key_manager")
        if not isinstance(table, dict):
            raise ConfigError(f"key manager config {path} has no [key_manager] table")
        raw_provider = table.get("provider")
        if not isinstance(raw_provider, str) or not raw_provider:
            raise ConfigError(f'key manager config {path}: [key_manager] needs provider = "..."')
        known = provider_names()
        if raw_provider not in known:
            # Checked here, not when the volume's manager is built: a typo would otherwise reach
            # no manager, and the volume's own would complain of a missing setting.
            raise ConfigError(
                f"key manager config {path}: unknown provider {raw_provider!r} "
                f"(known: {', '.join(known)})"
            )
        provider = raw_provider
        misplaced = [name for name in table if name in SECRET_NAMES]
        if misplaced:
            raise ConfigError(
                f"key manager config {path}: secrets are not read from [key_manager] itself "
                f"({', '.join(misplaced)}): put them under [key_manager.secrets] in a file only "
                "you can read (chmod 600), use a *_file option, or the environment (docs/KMS.md)"
            )
        file_secrets = table.get("secrets", {})
        if not isinstance(file_secrets, dict):
            raise ConfigError(f"key manager config {path}: [key_manager.secrets] must be a table")
        if file_secrets:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"key manager config {path} holds secrets but is readable by group or "
                    f"others (mode {mode:04o}); run: chmod 600 {path}"
                )
        secrets.update(file_secrets)
        for name, value in table.items():
            if name in ("provider", "secrets"):
                continue
            if name in SECRET_FILE_OPTIONS:
                secrets[name[: -len(FILE_SUFFIX)]] = _read_secret_file(str(value), name)
                continue
            options[name] = value
    for name, value in env.items():
        if not value:
            continue
        if name in SECRET_ENV:
            wanted, secret = SECRET_ENV[name]
            applies = provider is None or wanted is None or wanted == provider
            # S3CRYPTFS_* wins over the bare VAULT_TOKEN of the vault CLI.
            if applies and (name.startswith("S3CRYPTFS_") or secret not in secrets):
                secrets[secret] = value
        elif name.startswith(GENERIC_PREFIX):
            secrets[name[len(GENERIC_PREFIX) :].lower()] = value
    return provider, options, secrets


def merge_settings(
    provider: str, descriptor_settings: Mapping[str, Any], local_options: Mapping[str, Any]
) -> dict[str, Any]:
    """The settings a manager is built with: the descriptor's key identity, with this machine's
    options laid over.

    Only the fields the provider declares as shared are taken from the descriptor: how to reach
    the key server (address, port, CA, TLS checks, database) comes from this machine alone, so
    a descriptor written elsewhere (or by someone else) never points a mount at another server.
    Local options win, so a key identity set here pins it.
    """
    from s3cryptfs.keys.registry import shared_settings

    merged = shared_settings(provider, descriptor_settings)
    merged.update(local_options)
    return merged
