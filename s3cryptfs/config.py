"""Configuration pieces shared by the commands: volume URLs, sizes, the password, paths."""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass

from s3cryptfs.errors import ConfigError

log = logging.getLogger(__name__)

PASSWORD_ENV = "S3CRYPTFS_PASSWORD"
SEED_PASSWORD_ENV = "ENCRYPTION_PASSWORD"  # the Go gateway's name for the same thing
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class VolumeURL:
    bucket: str
    prefix: str  # '' or ending in '/'

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_url(url: str) -> VolumeURL:
    if not url.startswith("s3://"):
        raise ConfigError(f"{url!r}: a volume is named s3://BUCKET or s3://BUCKET/PREFIX")
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"{bucket!r} is not a valid S3 bucket name")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ConfigError("the prefix must not contain empty path segments ('//')")
    return VolumeURL(bucket, prefix + "/" if prefix else "")


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1048576' -> bytes (binary multiples)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{text!r} is not a size (examples: 512M, 2G, 1048576)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def parse_mode(text: str) -> int:
    """'0644', '644', '0o644' -> 0o644. Permission bits only: it is the mode of every object that
    carries none, and --trust-attributes is what decides whether setuid, setgid and sticky bits
    from the bucket are shown."""
    digits = text.strip().lower().removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise ConfigError(f"{text!r} is not a permission mode (octal, 0 to 0777: 0644, 0750...)")
    return int(digits, 8)


def read_password_file(path: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read password file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"password file {path} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    with open(path, "rb") as f:
        data = f.read()
    # One trailing newline is what editors and `echo` add; it is not part of the password.
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ConfigError(f"password file {path} is empty")
    return data


def credential_password_path() -> str | None:
    """The password handed over by systemd (LoadCredential=password:...), if there is one."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = os.path.join(directory, "password")
    return path if os.path.exists(path) else None


def password_offered(password_file: str | None) -> bool:
    """True when a password is given without asking: a file, the environment, systemd."""
    return bool(
        password_file
        or os.environ.get(PASSWORD_ENV)
        or os.environ.get(SEED_PASSWORD_ENV)
        or credential_password_path()
    )


def get_password(password_file: str | None, confirm: bool = False) -> bytes:
    """From --password-file, else $S3CRYPTFS_PASSWORD (or the gateway's $ENCRYPTION_PASSWORD),
    else a prompt on the terminal."""
    if password_file:
        return read_password_file(password_file)
    env = os.environ.get(PASSWORD_ENV)
    if env:
        return env.encode()
    credential = credential_password_path()
    if credential:
        return read_password_file(credential)
    seed = os.environ.get(SEED_PASSWORD_ENV)
    if seed:
        # The Go gateway's name, honoured for people coming from it (docs/CONFIGURATION.md).
        log.warning("using %s (the gateway's name); prefer %s", SEED_PASSWORD_ENV, PASSWORD_ENV)
        return seed.encode()
    if not sys.stdin.isatty():
        raise ConfigError(
            f"no password: use --password-file FILE, set {PASSWORD_ENV}, or run on a terminal"
        )
    first = getpass.getpass("Password: ").encode()
    if not first:
        raise ConfigError("empty password")
    if confirm and getpass.getpass("Repeat password: ").encode() != first:
        raise ConfigError("the passwords do not match")
    return first


def default_cache_root() -> str:
    if os.geteuid() == 0:
        return "/var/cache/s3cryptfs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "s3cryptfs")


def volume_cache_dir(root: str, endpoint: str | None, url: VolumeURL) -> str:
    """One directory per (endpoint, bucket, prefix): the journal must never mix volumes."""
    ident = f"{endpoint or 'aws'}|{url.bucket}|{url.prefix}".encode()
    return os.path.join(root, hashlib.sha256(ident).hexdigest()[:20])
