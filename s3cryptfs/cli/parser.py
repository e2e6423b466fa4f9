"""Building the argument parser of every command (`s3cryptfs --help`, docs/CLI.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeAlias

from s3cryptfs import __version__, config
from s3cryptfs.options import BY_NAME, OPTIONS, Kind, Option, default_words

_TYPES: dict[Kind, Callable[[str], Any]] = {Kind.INT: int, Kind.FLOAT: float}


def add_option(p: argparse.ArgumentParser, option: Option, default: str | None = None) -> None:
    """The flag (or positional argument) of *option*, as s3cryptfs/options.py declares it;
    *default* replaces the declared one for another command (status logs warnings only)."""
    value = option.default if default is None else default
    words = default_words(option, value)
    help_text = (option.help + (f" (default: {words})" if words else "")).replace("`", "")
    if not option.option_strings:
        # optional: `mount --config FILE` may leave the URL and the mount point to the file
        p.add_argument(option.attr, metavar=option.metavar, nargs="?", help=help_text)
        return
    kwargs: dict[str, Any] = {"dest": option.attr, "help": help_text}
    if option.kind is Kind.BOOL:
        kwargs["action"] = "store_true"
    elif option.kind is Kind.LIST:
        kwargs.update(action="append", default=[], metavar=option.metavar)
    else:
        kwargs.update(default=value, metavar=option.metavar, type=_TYPES.get(option.kind, str))
        if option.choices:
            kwargs["choices"] = list(option.choices)
    p.add_argument(*option.option_strings, **kwargs)


def add_common(p: argparse.ArgumentParser) -> None:
    for name in ("endpoint_url", "region", "password_file"):
        add_option(p, BY_NAME[name])
    add_log_level(p)


def add_log_level(p: argparse.ArgumentParser, default: str = "info") -> None:
    add_option(p, BY_NAME["log_level"], default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3cryptfs",
        description="Mount an S3 bucket as a folder whose files are encrypted on the client.",
    )
    parser.add_argument("--version", action="version", version=f"s3cryptfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        help="create a volume in a bucket or prefix",
        description="Create an encrypted volume: write its descriptor object.",
    )
    p.add_argument("url", metavar="s3://BUCKET[/PREFIX]")
    add_common(p)
    p.add_argument(
        "--chunk-size",
        default="64K",
        help="plaintext bytes per encrypted chunk, a power of two from 4K to 8M (default 64K)",
    )
    p.add_argument(
        "--key-manager",
        default="s3cryptfs-password",
        metavar="PROVIDER",
        help="key manager of the volume (default s3cryptfs-password); a KMS provider takes "
        "its connection settings from --kms-config",
    )
    p.add_argument(
        "--format",
        dest="object_format",
        choices=["s3cryptfs", "gateway"],
        default="s3cryptfs",
        help="format of new files: ours (default), or the S3 Encryption Gateway's chunked "
        "format (for a bucket the gateway also serves; docs/INTEROP.md)",
    )
    p.add_argument(
        "--gateway-wrap",
        choices=["password", "memory", "cosmian-kmip"],
        default="password",
        help="with --format gateway: wrap data keys as the gateway's single-password mode "
        "does (default), with its memory provider (needs --gateway-master-key-file at mount), "
        "or with the volume's cosmian-kmip key manager (--key-manager cosmian-kmip)",
    )
    p.add_argument(
        "--gateway-iterations",
        type=int,
        default=600_000,
        metavar="N",
        help="with --format gateway: PBKDF2 iterations recorded in new objects (default 600000)",
    )
    p.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="serve objects that carry no encryption marker as plaintext (default: refuse "
        "them with EIO, so nobody can swap a file for a plaintext one)",
    )
    add_kms(p)

    p = sub.add_parser(
        "mount",
        help="mount a volume",
        description="Mount a volume. Runs in the background once the mount is "
        "ready, unless --foreground is given.",
    )
    for option in OPTIONS:
        add_option(p, option)

    p = sub.add_parser(
        "status",
        help="what a running mount is doing",
        description="Show a running mount's pending uploads, caches, S3 requests and errors, "
        "and key manager health.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    add_log_level(p, "warning")

    p = sub.add_parser(
        "config",
        help="check a configuration file",
        description="Validate a mount configuration file and print the effective settings "
        "(flags > S3CRYPTFS_* environment > file > defaults), secrets masked.",
    )
    p.add_argument("action", choices=["check"])
    p.add_argument("file", metavar="FILE")
    add_log_level(p, "warning")

    p = sub.add_parser(
        "umount",
        help="upload every pending file, then unmount",
        description="Wait until every file written through the mount is in S3, then unmount.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--lazy",
        action="store_true",
        help="detach the mount even while processes use it (as umount -l): they keep it "
        "until they let go, the mount process serving them, then it uploads what they wrote and "
        "exits. Without it a mount in use is refused (exit 2, the processes named). Also "
        "detaches a mount whose process is gone",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up waiting when uploads make no progress for this long (S3 or the key "
        "manager away): the mount then stays up and the files not in S3 are listed "
        "(default 60)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with what is not in S3 yet: unmount anyway, keeping it for the next mount "
        "(exit 6). Never overrides a mount in use: --lazy does",
    )
    add_log_level(p, "warning")
    _add_admin_commands(sub)
    _add_offline_commands(sub)
    return parser


def add_kms(p: argparse.ArgumentParser) -> None:
    for name in ("kms_config", "audit_log", "gateway_master_key_file"):
        add_option(p, BY_NAME[name])


# A string: argparse's class is generic only to type checkers.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# `s3cryptfs keys ACTION`: every action with its one-line description, for --help.
KEY_ACTIONS = {
    "status": "providers, versions and their states (--count: objects per version)",
    "list": "the key versions only",
    "rotate": "make a new active version (--due: only when the schedule says so)",
    "retire": "VERSION: stop it from unwrapping (refused while objects use it)",
    "passwd": "re-seal the keys under a new password (--rotate: and revoke the old)",
    "export": "write the descriptor, sealed under a passphrase, to --output FILE",
    "import": "FILE: put an exported descriptor back (--force: over another one)",
    "schedule": "DAYS: the rotation period that `rotate --due` follows (0: none)",
    "trust": "pin the volume's fingerprint here (--fingerprint FP: only that one)",
}


def _key_actions_help() -> str:
    width = max(map(len, KEY_ACTIONS))
    lines = [f"  {name:<{width}}  {text}" for name, text in KEY_ACTIONS.items()]
    return "actions:\n" + "\n".join(lines)


def _add_admin_commands(sub: SubParsers) -> None:
    def volume_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "keys":
            # the epilog is a table: keep its line breaks
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.epilog = _key_actions_help()
            p.add_argument(
                "action", choices=list(KEY_ACTIONS), help="what to do (see actions below)"
            )
            # [VERSION|FILE] URL, split by cmd_admin: options may stand between them.
            p.add_argument("target", nargs="*", metavar="[VERSION|FILE] s3://BUCKET[/PREFIX]")
        else:
            p.add_argument("url", metavar="s3://BUCKET[/PREFIX]")
        add_common(p)
        add_kms(p)
        p.add_argument(
            "--jobs", type=int, default=8, metavar="N", help="parallel requests (default 8)"
        )
        return p

    p = volume_parser(
        "keys", "the volume's keys: show, rotate, retire, change the password, export, import"
    )
    p.add_argument("--count", action="store_true", help="count objects per version (walks all)")
    p.add_argument(
        "--force",
        action="store_true",
        help="retire even if objects still use it; import over a different descriptor",
    )
    p.add_argument("--output", metavar="FILE", help="export: where to write the sealed export")
    p.add_argument(
        "--due",
        action="store_true",
        help="rotate: only if the schedule (keys schedule DAYS) says a rotation is due",
    )
    p.add_argument(
        "--export-password-file",
        metavar="FILE",
        help="export/import: the export passphrase (0600 file); else "
        "$S3CRYPTFS_EXPORT_PASSWORD, else a prompt",
    )
    p.add_argument("--provider", help="retire: a previous provider's version (default: active)")
    p.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="retire: how long to wait for running mounts to stop using the version "
        "(default 120)",
    )
    p.add_argument(
        "--new-password-file",
        metavar="FILE",
        help="passwd: the new password (0600 file); else a prompt (asked twice)",
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help="passwd: also make a new key version and a new descriptor authentication key, "
        "re-wrap every object and retire the old versions (what the old password opened is "
        "then useless)",
    )
    p.add_argument(
        "--new-auth-key",
        action="store_true",
        help="rotate: also replace the descriptor authentication key (after a compromise; "
        "machines that use only a KMS must then run `keys trust`)",
    )
    p.add_argument(
        "--fingerprint",
        metavar="FP",
        help="trust: pin the volume only if its descriptor is signed with this fingerprint",
    )

    def resumable(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cache-dir",
            metavar="DIR",
            help=f"where the resume checkpoint lives (default {config.default_cache_root()})",
        )
        p.add_argument(
            "--from-start", action="store_true", help="ignore the checkpoint of an earlier run"
        )

    p = volume_parser(
        "upgrade",
        "authenticate a volume made by an older s3cryptfs (descriptor version 1 -> 2)",
    )
    p = volume_parser("rewrap", "re-wrap every object's data key under the active key")
    p.add_argument("--dry-run", action="store_true", help="only count objects per key version")
    resumable(p)
    add_progress(p)
    p = volume_parser("migrate", "move the volume to another key manager (e.g. password -> KMS)")
    resumable(p)
    add_progress(p)
    p.add_argument("--to", required=True, metavar="PROVIDER", help="the new key manager")
    p.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for running mounts to stop using the old key manager before "
        "it is dropped (default 120)",
    )
    p.add_argument(
        "--keep-old", action="store_true", help="keep the old key manager in the descriptor"
    )


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "plain", "none"),
        default="auto",
        help="how progress is shown: auto (a bar on a terminal, else nothing), bar, plain "
        "(a line every 10 seconds, for logs) or none (default auto)",
    )


def _add_offline_commands(sub: SubParsers) -> None:
    def object_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_common(p)
        add_kms(p)
        p.add_argument(
            "--volume",
            metavar="s3://BUCKET[/PREFIX]",
            help="the volume holding the object (default: found above the key)",
        )
        return p

    p = object_parser("cat", "decrypt one object to standard output (no mount needed)")
    p.add_argument("object", metavar="s3://BUCKET/KEY")
    p = object_parser("get", "decrypt one object into a local file (no mount needed)")
    p.add_argument("object", metavar="s3://BUCKET/KEY")
    p.add_argument("local", metavar="LOCAL")
    p = object_parser("put", "encrypt a local file into the volume (no mount needed)")
    p.add_argument("local", metavar="LOCAL")
    p.add_argument("object", metavar="s3://BUCKET/KEY")
    p.add_argument("--force", action="store_true", help="replace an existing object")
    p = sub.add_parser(
        "fsck",
        help="check every object of a volume (no mount needed)",
        description="check every object of a volume: format, envelope, data key, and with "
        "--full the authentication of every chunk",
    )
    p.add_argument("url", metavar="s3://BUCKET[/PREFIX]")
    add_common(p)
    add_kms(p)
    add_progress(p)
    p.add_argument("--full", action="store_true", help="download and authenticate every chunk")
    p.add_argument("--jobs", type=int, default=8, metavar="N", help="parallel checks (default 8)")

