"""Mount configuration from a TOML file and ``S3CRYPTFS_*`` environment variables.

Precedence, highest first: command-line flags, environment variables, the file, defaults. Keys
are the mount flags' long names with ``_`` for ``-`` (docs/CONFIGURATION.md lists them all).
The Go gateway's ``[encryption]`` section is understood too (``password``,
``key_manager.enabled``), so its users' files are never silently misread.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from s3cryptfs.errors import ConfigError

# key -> (type, secret?)
KEYS: dict[str, tuple[type, bool]] = {
    "url": (str, False),
    "mountpoint": (str, False),
    "endpoint_url": (str, False),
    "region": (str, False),
    "password_file": (str, False),
    "kms_config": (str, False),
    "audit_log": (str, False),
    "gateway_master_key_file": (str, False),
    "cache_dir": (str, False),
    "cache_size": (str, False),
    "memory_cache": (str, False),
    "disk_cache": (str, False),
    "read_only": (bool, False),
    "allow_other": (bool, False),
    "uid": (int, False),
    "gid": (int, False),
    "sync_close": (bool, False),
    "trust_attributes": (bool, False),
    "max_whole_object": (str, False),
    "dir_cache_ttl": (float, False),
    "s3_timeout": (float, False),
    "stop_timeout": (float, False),
    "log_level": (str, False),
    "log_file": (str, False),
    "options": (list, False),
}
ENCRYPTION_KEYS = {"password", "key_manager"}
ENV_PREFIX = "S3CRYPTFS_"
_NOT_FROM_ENV = {"url", "mountpoint", "options"}  # too easy to leak into other mounts from a shell


@dataclass
class FileConfig:
    path: str
    values: dict[str, Any]
    password: bytes | None = None  # from [encryption] password (the gateway's layout)
    key_manager_enabled: bool | None = None


def _line_of(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line) or line.strip() == f"[{key}]":
            return number
    return 0


def _where(path: str, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line else path


def _check_type(path: str, text: str, key: str, value: Any, want: type) -> Any:
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # sizes like cache_size = 1024
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(
            f"{_where(path, text, key)}: {key} must be a {want.__name__}, not {value!r}"
        )
    if want is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{_where(path, text, key)}: {key} must be a list of strings")
    return value


def load_file(path: str) -> FileConfig:
    try:
        with open(path, "rb") as f:
            raw = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from None
    text = raw.decode("utf-8", "replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = FileConfig(path, {})
    for key, value in doc.items():
        if key == "encryption":
            _encryption(cfg, text, value, mode)
            continue
        if key == "key_manager":
            continue  # the KMS connection table, read by the key managers' own loader
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"{_where(path, text, key)}: unknown key {key!r} (known: {known})")
        cfg.values[key] = _check_type(path, text, key, value, KEYS[key][0])
    if "key_manager" in doc and "kms_config" not in cfg.values:
        cfg.values["kms_config"] = path  # the file carries its own [key_manager] table
    return cfg


def _encryption(cfg: FileConfig, text: str, section: Any, mode: int) -> None:
    path = cfg.path
    if not isinstance(section, dict):
        raise ConfigError(f"{_where(path, text, 'encryption')}: [encryption] must be a table")
    for key in section:
        if key not in ENCRYPTION_KEYS:
            raise ConfigError(
                f"{_where(path, text, key)}: unknown key encryption.{key} "
                "(known: password, key_manager.enabled)"
            )
    if "password" in section:
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path} holds a password but is readable by group or others: chmod 600 it"
            )
        cfg.password = str(section["password"]).encode()
    km = section.get("key_manager")
    if km is not None:
        if not isinstance(km, dict) or not isinstance(km.get("enabled", False), bool):
            raise ConfigError(
                f"{_where(path, text, 'key_manager')}: encryption.key_manager.enabled must be "
                "true or false"
            )
        cfg.key_manager_enabled = km.get("enabled")


def _env_value(key: str, want: type, env: dict[str, str]) -> Any:
    raw = env.get(ENV_PREFIX + key.upper())
    if raw is None or key in _NOT_FROM_ENV:
        return None
    name = ENV_PREFIX + key.upper()
    if want is bool:
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no", ""):
            return False
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    try:
        return want(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a {want.__name__}") from None


def apply(
    args: argparse.Namespace,
    defaults: dict[str, Any],
    cfg: FileConfig | None,
    env: dict[str, str],
) -> dict[str, str]:
    """Fill *args* (what the flags gave) from env and file; returns key -> where it came from."""
    origin: dict[str, str] = {}
    for key, (want, _) in KEYS.items():
        attr = "fuse_opts" if key == "options" else key
        current = getattr(args, attr, None)
        default = defaults.get(attr)
        if current not in (None, default, []):
            origin[key] = "flag"
            continue
        from_env = _env_value(key, want, env)
        if from_env is not None:
            setattr(args, attr, from_env)
            origin[key] = "environment"
        elif cfg is not None and key in cfg.values:
            value = cfg.values[key]
            setattr(args, attr, [",".join(value)] if key == "options" else value)
            origin[key] = cfg.path
        elif current is not None:
            origin[key] = "default"
    return origin


def effective(args: argparse.Namespace, origin: dict[str, str], cfg: FileConfig | None) -> str:
    """The effective configuration as text, secrets masked (``config check``)."""
    lines = []
    for key in KEYS:
        attr = "fuse_opts" if key == "options" else key
        value = getattr(args, attr, None)
        if value is None or value == []:
            continue
        lines.append(f"{key} = {value!r}  # {origin.get(key, 'default')}")
    if cfg is not None and cfg.password is not None:
        lines.append("encryption.password = '********'  # " + cfg.path)
    if cfg is not None and cfg.key_manager_enabled is not None:
        lines.append(f"encryption.key_manager.enabled = {cfg.key_manager_enabled}  # {cfg.path}")
    return "\n".join(lines)
