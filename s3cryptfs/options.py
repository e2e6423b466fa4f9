"""Every setting of `s3cryptfs mount`, declared once.

One `Option` per setting gives its name, type, default, help and where it may come from. From
this table come:

* the flags of `s3cryptfs mount` (s3cryptfs/cli/parser.py), and the shared flags of the other
  commands (``--endpoint-url``, ``--password-file``, ``--kms-config``...);
* the keys of the ``--config`` TOML file and the ``S3CRYPTFS_<NAME>`` environment variables
  (s3cryptfs/settings.py), and the options ``mount.s3cryptfs`` turns into flags
  (s3cryptfs/mounthelper.py);
* the values handed to each layer: `FsOptions` (vfs/core.py) is filled from the options of
  layer FS alone; the command builds `MountSpec` (mount.py) from the others;
* the option tables of docs/CONFIGURATION.md and docs/CLI.md (s3cryptfs/options_doc.py;
  tests/test_options.py fails when they are not current).

The names are a stable, documented surface: a flag, key or variable renamed here breaks fstab
lines, unit files and configuration files in the field.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from s3cryptfs import config
from s3cryptfs.errors import ConfigError

ENV_PREFIX = "S3CRYPTFS_"


class Kind(enum.Enum):
    """The type of a value; `.value` is how the documentation names it."""

    STRING = "string"
    PATH = "path"  # a local file or directory
    SIZE = "size"  # bytes, or a number with K, M, G or T (config.parse_size)
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    MODE = "mode"  # octal permission bits (config.parse_mode)
    LIST = "list of strings"


class Layer(enum.Enum):
    """Who consumes the value."""

    COMMAND = "command"  # the mount command itself: which file, whether to wait, logging
    MOUNT = "mount"  # MountSpec (mount.py): volume, S3, keys, the kernel mount, the process
    FS = "fs"  # FsOptions (vfs/core.py): what the filesystem does with files and caches


Value = str | int | float | bool | list[str] | None


@dataclass(frozen=True)
class Option:
    name: str  # the TOML key; the flag is --name-with-dashes, the variable S3CRYPTFS_NAME
    kind: Kind
    layer: Layer
    help: str  # one sentence for --help and the docs; `code spans` are shown without backticks
    default: Value = None
    # The default in words, when it is computed or None means something: "AWS", "off"
    # (Markdown: values in `code`).
    default_doc: str | None = None
    doc: str = ""  # more for the docs only (Markdown)
    flags: tuple[str, ...] | None = None  # None: (--name-with-dashes,); (): positional
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    dest: str | None = None  # the argparse attribute, when it is not the name
    # Where else it may come from, and why not when it may not (the reason is documented).
    in_file: bool = True
    env: bool = True
    not_everywhere: str = ""
    secret_file: bool = False  # names a file holding a secret (refused unless 0600)
    field: str | None = None  # the FsOptions field it fills (layer FS)
    minimum: int | None = None
    unset: Callable[[], Any] | None = None  # the value when none is given (FS layer)

    @property
    def attr(self) -> str:
        return self.dest or self.name

    @property
    def option_strings(self) -> tuple[str, ...]:
        return ("--" + self.name.replace("_", "-"),) if self.flags is None else self.flags

    @property
    def flag(self) -> str:
        """The long flag, or the name of the positional argument."""
        return self.option_strings[-1] if self.option_strings else self.name

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def convert(self, raw: Any, source: str) -> Any:
        """The value the layer gets, from what flags, environment or file gave; *source* says
        where it came from for the error message."""
        if raw is None:
            return self.unset() if self.unset is not None else None
        try:
            if self.kind is Kind.SIZE:
                return config.parse_size(raw)
            if self.kind is Kind.MODE:
                return config.parse_mode(raw)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if self.minimum is not None and raw < self.minimum:
            raise ConfigError(f"{source}: must be at least {self.minimum}, not {raw}")
        return raw


_NO_SHELL = (
    "not from the environment: a variable left in a shell must not redirect a mount or "
    "change its kernel options"
)

OPTIONS: tuple[Option, ...] = (
    # --- the volume and S3 ----------------------------------------------------------------------
    Option(
        "url",
        Kind.STRING,
        Layer.MOUNT,
        "the volume: `s3://BUCKET[/PREFIX]`",
        flags=(),
        metavar="s3://BUCKET[/PREFIX]",
        env=False,
        not_everywhere=_NO_SHELL,
    ),
    Option(
        "mountpoint",
        Kind.PATH,
        Layer.MOUNT,
        "where to mount it",
        flags=(),
        metavar="MOUNTPOINT",
        env=False,
        not_everywhere=_NO_SHELL,
    ),
    Option(
        "config",
        Kind.PATH,
        Layer.COMMAND,
        "TOML file with mount settings (docs/CONFIGURATION.md); flags and `S3CRYPTFS_*` "
        "environment variables override it",
        metavar="FILE",
        in_file=False,
        env=False,
        not_everywhere="a flag only (`config=FILE` in fstab): it names the file itself",
    ),
    Option(
        "endpoint_url",
        Kind.STRING,
        Layer.MOUNT,
        "S3 endpoint",
        default_doc="AWS",
        metavar="URL",
    ),
    Option(
        "region",
        Kind.STRING,
        Layer.MOUNT,
        "S3 region",
        default_doc="from the AWS configuration",
    ),
    Option(
        "s3_timeout",
        Kind.FLOAT,
        Layer.MOUNT,
        "how long one S3 operation is retried before it fails with EIO",
        default=45.0,
        metavar="SECONDS",
    ),
    Option(
        "s3_client",
        Kind.STRING,
        Layer.MOUNT,
        "which S3 client a mount uses: `native` (the AWS Common Runtime, for every object "
        "request) or `boto3`",
        default="native",
        doc="`native` costs a fraction of the CPU per request (docs/PERFORMANCE.md, 'S3 "
        "clients'); credentials, endpoint, region, retries and errors are those of `boto3`. "
        "docs/ARCHITECTURE.md says which operation uses which client.",
        choices=("boto3", "native"),
        metavar="CLIENT",
    ),
    # --- passwords and keys ---------------------------------------------------------------------
    Option(
        "password_file",
        Kind.PATH,
        Layer.COMMAND,
        "file holding the password (must not be readable by group or others); else "
        "`$S3CRYPTFS_PASSWORD`, else a prompt",
        doc="One trailing newline is ignored. docs/CONFIGURATION.md lists every source of the "
        "password, in order.",
        metavar="FILE",
        secret_file=True,
    ),
    Option(
        "kms_config",
        Kind.PATH,
        Layer.MOUNT,
        "TOML file with a `[key_manager]` table: this machine's KMS connection settings",
        doc="See docs/KMS.md. With it and no password offered, no password is asked unless "
        "the volume still holds password-wrapped objects. In a configuration file, a "
        "`[key_manager]` table of the file itself is used when this is not set.",
        metavar="FILE",
    ),
    Option(
        "audit_log",
        Kind.PATH,
        Layer.MOUNT,
        "append JSON lines of key operations (wrap, unwrap, rotate...) to PATH",
        default_doc="off",
        doc='See docs/KMS.md, "Audit log". It must not be a symbolic link (exit 2); it is '
        "created 0600.",
        metavar="PATH",
    ),
    Option(
        "gateway_master_key_file",
        Kind.PATH,
        Layer.MOUNT,
        "the S3 Encryption Gateway's memory-provider master key, for its objects wrapped with "
        "provider memory (must not be readable by group or others)",
        doc="Read as the gateway reads it: 32, 48 or 64 hex characters are decoded, anything else "
        "is the key's raw bytes (16, 24 or 32 of them); base64 is not decoded. One trailing "
        "newline is ignored. Also for volumes created with `--gateway-wrap memory` "
        "(docs/INTEROP.md).",
        metavar="FILE",
        secret_file=True,
    ),
    Option(
        "dek_cache_ttl",
        Kind.FLOAT,
        Layer.MOUNT,
        "how long an unwrapped data key stays in memory; 0 disables the cache",
        default=300.0,
        doc='At most 4096 keys (docs/KMS.md, "DEK cache").',
        metavar="SECONDS",
    ),
    Option(
        "descriptor_refresh",
        Kind.FLOAT,
        Layer.MOUNT,
        "re-read the volume descriptor before wrapping at most this often, so a key rotation "
        "done elsewhere reaches new files; before unwrapping at most every "
        "max(2, min(this, `--dek-cache-ttl`)) seconds, so a retire stops unwrapping",
        default=60.0,
        doc='See docs/KMS.md, "DEK cache".',
        metavar="SECONDS",
    ),
    # --- the kernel mount and the process -------------------------------------------------------
    Option(
        "options",
        Kind.LIST,
        Layer.MOUNT,
        "extra FUSE mount options, comma separated",
        doc="`suid` and `dev` are refused (exit 2): the mount is always `nosuid,nodev`.",
        flags=("-o",),
        metavar="OPTS",
        dest="fuse_opts",
        env=False,
        not_everywhere=_NO_SHELL,
    ),
    Option(
        "allow_other",
        Kind.BOOL,
        Layer.MOUNT,
        "let other users access the mount (needs `user_allow_other` in /etc/fuse.conf for "
        "non-root)",
        default=False,
    ),
    Option(
        "foreground",
        Kind.BOOL,
        Layer.COMMAND,
        "stay in the foreground",
        doc="It then logs to stderr, or to `--log-file`.",
        default=False,
        flags=("-f", "--foreground"),
        in_file=False,
        env=False,
        not_everywhere="a flag only: whether the command waits is for its caller to say "
        "(a systemd unit runs `mount -f`; mount(8) needs `mount.s3cryptfs` to return)",
    ),
    Option(
        "cache_dir",
        Kind.PATH,
        Layer.MOUNT,
        "write-back journal and caches, one subdirectory per volume",
        default_doc="`/var/cache/s3cryptfs` for root, else `~/.cache/s3cryptfs`",
        doc="Directories 0700, files 0600.",
        metavar="DIR",
    ),
    Option(
        "stop_timeout",
        Kind.FLOAT,
        Layer.MOUNT,
        "on a stop (SIGTERM, `umount(8)`), how long uploads may make no progress before the "
        "mount gives up waiting: what is left stays for the next mount, named in the log",
        default=120.0,
        metavar="SECONDS",
    ),
    Option(
        "metrics",
        Kind.STRING,
        Layer.MOUNT,
        "serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT listens on 127.0.0.1)",
        default_doc="off",
        doc="See docs/OPERATIONS.md, \"Metrics\".",
        metavar="ADDR:PORT",
    ),
    Option(
        "log_level",
        Kind.STRING,
        Layer.COMMAND,
        "how much to log: debug, info, warning or error",
        default="info",
        metavar="LEVEL",
        choices=("debug", "info", "warning", "error"),
    ),
    Option(
        "log_file",
        Kind.PATH,
        Layer.COMMAND,
        "log file of a mount in the background",
        default_doc="`mount.log` in the volume's cache directory",
        doc="It must not be a symbolic link (exit 2); it is created 0600.",
        metavar="FILE",
    ),
    # --- files and caches (FsOptions) ------------------------------------------------------------
    Option(
        "read_only",
        Kind.BOOL,
        Layer.FS,
        "mount read-only",
        default=False,
        field="read_only",
    ),
    Option(
        "uid",
        Kind.INT,
        Layer.FS,
        "owner of files that carry no owner",
        default_doc="you",
        field="uid",
        unset=os.getuid,
    ),
    Option(
        "gid",
        Kind.INT,
        Layer.FS,
        "group of files that carry no group",
        default_doc="yours",
        field="gid",
        unset=os.getgid,
    ),
    Option(
        "file_mode",
        Kind.MODE,
        Layer.FS,
        "permission bits of files that carry no mode, in octal",
        default="0644",
        metavar="MODE",
        field="file_mode",
    ),
    Option(
        "dir_mode",
        Kind.MODE,
        Layer.FS,
        "permission bits of directories that carry no mode, in octal",
        default="0755",
        metavar="MODE",
        field="dir_mode",
    ),
    Option(
        "trust_attributes",
        Kind.BOOL,
        Layer.FS,
        "show the setuid, setgid and sticky bits of modes stored in S3 (default: masked, "
        "since anyone who can write to the bucket can set them)",
        doc="See docs/SEMANTICS.md.",
        default=False,
        field="trust_attributes",
    ),
    Option(
        "hard_links",
        Kind.STRING,
        Layer.FS,
        "what `link()` does: `refuse` (EPERM) or `copy` (the new name gets a copy of the file)",
        doc="With `copy`, `cp -a`, `rsync -aH` and `tar x` of trees with hard links succeed, but "
        "the names are separate files from then on: writing one does not change the other. "
        "See docs/SEMANTICS.md.",
        default="refuse",
        metavar="MODE",
        choices=("refuse", "copy"),
        field="hard_links",
    ),
    Option(
        "sync_close",
        Kind.BOOL,
        Layer.FS,
        "`close()` returns only once the file is in S3",
        default=False,
        field="sync_close",
    ),
    Option(
        "dir_cache_ttl",
        Kind.FLOAT,
        Layer.FS,
        "how long a directory listing is trusted",
        default=5.0,
        metavar="SECONDS",
        field="dir_ttl",
    ),
    Option(
        "file_cache_ttl",
        Kind.FLOAT,
        Layer.FS,
        "how long an `open()` trusts what this mount last fetched of a file instead of asking "
        "S3 whether it changed; 0 (the default) asks at every open, so a file closed on "
        "another machine is seen whole at the next open",
        doc="See docs/SEMANTICS.md.",
        default=0.0,
        metavar="SECONDS",
        field="file_ttl",
    ),
    Option(
        "cache_size",
        Kind.SIZE,
        Layer.FS,
        "bound on encrypted data waiting for upload under `--cache-dir`; writers wait when it "
        "is full",
        default="2G",
        metavar="SIZE",
        field="journal_limit",
    ),
    Option(
        "memory_cache",
        Kind.SIZE,
        Layer.FS,
        "decrypted blocks kept in memory (a long sequential read keeps at most half of it)",
        default="64M",
        metavar="SIZE",
        field="memory_cache",
    ),
    Option(
        "disk_cache",
        Kind.SIZE,
        Layer.FS,
        "keep fetched ciphertext on disk under the cache dir, up to SIZE",
        default="0",
        default_doc="`0`: off",
        doc="Least recently used first out, kept across mounts; holds no plaintext.",
        metavar="SIZE",
        field="disk_cache",
    ),
    Option(
        "max_whole_object",
        Kind.SIZE,
        Layer.FS,
        "largest gateway single-AEAD object to download whole to decrypt it",
        default="256M",
        doc="Such objects are authenticated only as a whole; larger ones give EIO without "
        "being downloaded.",
        metavar="SIZE",
        field="max_whole_object",
    ),
    Option(
        "max_inodes",
        Kind.INT,
        Layer.FS,
        "files and directories the mount keeps while the kernel holds them; beyond it the "
        "kernel is asked to drop the least recently used files (0: no bound)",
        default=200_000,
        doc="Each known file costs the mount about 1.4 KiB, and the kernel keeps every name "
        "it looked up or listed until it runs short of memory, so a `find` or `ls -l` over "
        "millions of objects would grow the mount without this bound. A dropped file is "
        "looked up again when next used (from the directory's listing while it is trusted). "
        "Directories, open files and files not in S3 yet are never dropped. "
        "See docs/PERFORMANCE.md.",
        metavar="N",
        field="max_inodes",
        minimum=0,
    ),
    Option(
        "upload_concurrency",
        Kind.INT,
        Layer.FS,
        "files uploaded at the same time",
        default=16,
        doc="Lower it for a slow link, where parallel uploads only share the bandwidth.",
        metavar="N",
        field="upload_concurrency",
        minimum=1,
    ),
    Option(
        "upload_delay",
        Kind.FLOAT,
        Layer.FS,
        "how long a closed file waits, safe in the journal, before its upload starts",
        default=1.0,
        doc="A rename, `chmod`, `chown`, `utime`, rewrite or delete within that time changes "
        "the waiting upload instead of costing a copy in S3 (temporary files renamed into "
        "place, as `git`, `rsync` and editors write them; `tar` restoring attributes). "
        "`fsync`, `--sync-close` and the unmount do not wait for it. 0 starts at once.",
        metavar="SECONDS",
        field="upload_delay",
        minimum=0,
    ),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
IN_FILE: dict[str, Option] = {o.name: o for o in OPTIONS if o.in_file}

# FsOptions fields that no option sets, and why. tests/test_options.py fails on any other
# FsOptions field that no option fills: a setting nobody can set is dead code or a missing
# option.
FS_INTERNAL: dict[str, str] = {
    "io_threads": "worker threads for S3 reads, listings and staging-file I/O: not offered "
    "until someone measures what fewer threads do to reads that wait on each other",
    "stream_uploads": "turns off streamed uploads (cache/stream.py), for code that builds a "
    "Filesystem directly to test the other path",
    "upload_helper": "turns off the upload helper process (store/helper.py), for code that "
    "builds a Filesystem directly without a subprocess",
    "backslash_names": "not a choice but a fact about the S3 server: the mount probes whether "
    "it keeps a backslash in keys (vfs/names.py); code that builds a Filesystem directly sets it",
}


def default_words(option: Option, value: Value) -> str | None:
    """The default as the docs show it (--help without the backticks); None: nothing to show
    (a switch is off, a list empty)."""
    if option.default_doc is not None and value == option.default:
        return option.default_doc
    if value is None or isinstance(value, bool) or value == []:
        return None
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def source_of(option: Option, origin: dict[str, str]) -> str:
    """How an error message names where a value came from (settings.apply's origin)."""
    where = origin.get(option.name, "flag")
    if where == "environment":
        return option.env_name
    if where in ("flag", "default"):
        return option.flag
    return f"{where}: {option.name}"  # the configuration file


def layer_values(layer: Layer, values: dict[str, Any], origin: dict[str, str]) -> dict[str, Any]:
    """field -> converted value, for the options of *layer* that fill a field."""
    return {
        o.field: o.convert(values.get(o.attr), source_of(o, origin))
        for o in OPTIONS
        if o.layer is layer and o.field is not None
    }
