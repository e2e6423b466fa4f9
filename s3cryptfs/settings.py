"""Mount configuration from a TOML file and ``S3CRYPTFS_*`` environment variables.

Precedence, highest first: command-line flags, environment variables, the file, defaults. The
keys and variables are those of s3cryptfs/options.py (docs/CONFIGURATION.md lists them all).
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
from s3cryptfs.options import IN_FILE, Kind, Option

# How a value of each kind looks in the TOML file (and is read from the environment).
_TOML_TYPES: dict[Kind, type[Any]] = {
    Kind.STRING: str,
    Kind.PATH: str,
    Kind.SIZE: str,
    Kind.MODE: str,
    Kind.BOOL: bool,
    Kind.INT: int,
    Kind.FLOAT: float,
    Kind.LIST: list,
}
_TEXT = {Kind.STRING, Kind.PATH, Kind.SIZE}

ENCRYPTION_KEYS = {"password", "key_manager"}


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


def _check_type(path: str, text: str, key: str, value: Any, option: Option) -> Any:
    """The value of *key* as the flag would give it, or a ConfigError naming the line."""
    where = _where(path, text, key)
    kind = option.kind
    number = isinstance(value, int) and not isinstance(value, bool)
    if kind is Kind.FLOAT and number:
        value = float(value)
    elif kind is Kind.MODE and number:
        value = _mode_text(where, key, value)
    elif kind in _TEXT and number:
        value = str(value)  # sizes like cache_size = 1024
    want = _TOML_TYPES[kind]
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        name = "str or int" if kind is Kind.MODE else want.__name__
        raise ConfigError(f"{where}: {key} must be a {name}, not {value!r}")
    if kind is Kind.LIST and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    if option.choices:
        # logging took "DEBUG" before the choices were checked here: still take it
        if value.lower() not in option.choices:
            raise ConfigError(
                f"{where}: {key} must be one of {', '.join(option.choices)}, not {value!r}"
            )
        value = value.lower()
    return value


def _mode_text(where: str, key: str, number: int) -> str:
    """A mode the TOML file gives as an integer, as the flag takes it: octal text."""
    # TOML's 0o644 is an integer; 644 is one too, in decimal, and means 0o1204
    if not 0 <= number <= 0o777:
        raise ConfigError(f"{where}: {key} = {number} is not a mode: write 0o644 or \"0644\"")
    return f"0{number:o}"


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
        if key not in IN_FILE:
            known = ", ".join(sorted(IN_FILE))
            raise ConfigError(f"{_where(path, text, key)}: unknown key {key!r} (known: {known})")
        cfg.values[key] = _check_type(path, text, key, value, IN_FILE[key])
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


def _env_value(option: Option, env: dict[str, str]) -> Any:
    name = option.env_name
    raw = env.get(name)
    if raw is None or not option.env:
        return None
    if option.kind is Kind.BOOL:
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no", ""):
            return False
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    if option.choices:
        if raw.lower() not in option.choices:  # any case, as in the file
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(option.choices)}")
        return raw.lower()
    want = _TOML_TYPES[option.kind]
    try:
        return want(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a {want.__name__}") from None


def apply(args: argparse.Namespace, cfg: FileConfig | None, env: dict[str, str]) -> dict[str, str]:
    """Fill *args* (what the flags gave) from env and file; returns key -> where it came from."""
    origin: dict[str, str] = {}
    for key, option in IN_FILE.items():
        attr = option.attr
        current = getattr(args, attr, None)
        if current not in (None, option.default, []):
            origin[key] = "flag"
            continue
        from_env = _env_value(option, env)
        if from_env is not None:
            setattr(args, attr, from_env)
            origin[key] = "environment"
        elif cfg is not None and key in cfg.values:
            value = cfg.values[key]
            setattr(args, attr, [",".join(value)] if option.kind is Kind.LIST else value)
            origin[key] = cfg.path
        elif current is not None:
            origin[key] = "default"
    return origin


def effective(args: argparse.Namespace, origin: dict[str, str], cfg: FileConfig | None) -> str:
    """The effective configuration as text, secrets masked (``config check``)."""
    lines = []
    for key, option in IN_FILE.items():
        value = getattr(args, option.attr, None)
        if value is None or value == []:
            continue
        lines.append(f"{key} = {value!r}  # {origin.get(key, 'default')}")
    if cfg is not None and cfg.password is not None:
        lines.append("encryption.password = '********'  # " + cfg.path)
    if cfg is not None and cfg.key_manager_enabled is not None:
        lines.append(f"encryption.key_manager.enabled = {cfg.key_manager_enabled}  # {cfg.path}")
    return "\n".join(lines)
