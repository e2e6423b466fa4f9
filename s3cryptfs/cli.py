"""The command line: s3cryptfs init | mount | umount. Exit codes are documented in docs/CLI.md."""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
import time
from signal import SIGTERM

from s3cryptfs import __version__, config, hardening, mountcheck, settings
from s3cryptfs.errors import (
    AccessDenied,
    ConfigError,
    IntegrityError,
    KeyManagerError,
    PreconditionFailed,
    S3CryptFSError,
    StoreError,
    TransientStoreError,
    UnknownProvider,
    UploadConflict,
    VolumeError,
    WrongPasswordError,
)
from s3cryptfs.exitcodes import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_KEYS,
    EXIT_OK,
    EXIT_S3,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_VOLUME,
    EXIT_WRONG_PASSWORD,
)

log = logging.getLogger("s3cryptfs")



def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: AWS)")
    p.add_argument("--region", help="S3 region (default: from the AWS configuration)")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the password (must not be readable by group or others); "
        "else $S3CRYPTFS_PASSWORD, else a prompt",
    )
    _add_log_level(p)


def _add_log_level(p: argparse.ArgumentParser, default: str = "info") -> None:
    p.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help=f"default: {default}",
    )


MOUNT_DEFAULTS: dict[str, object] = {}


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
    _add_common(p)
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
    _add_kms(p)

    p = sub.add_parser(
        "mount",
        help="mount a volume",
        description="Mount a volume. Runs in the background once the mount is "
        "ready, unless --foreground is given.",
    )
    # URL may come from --config instead: `mount --config FILE MOUNTPOINT`.
    p.add_argument("url", metavar="s3://BUCKET[/PREFIX]", nargs="?")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    _add_common(p)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with mount settings (docs/CONFIGURATION.md); flags and S3CRYPTFS_* "
        "environment variables override it",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"write-back journal and cache (default {config.default_cache_root()})",
    )
    p.add_argument(
        "--cache-size",
        default="2G",
        metavar="SIZE",
        help="bound on encrypted data waiting for upload under --cache-dir; writers "
        "wait when it is full (default 2G)",
    )
    p.add_argument(
        "--memory-cache",
        default="64M",
        metavar="SIZE",
        help="decrypted blocks kept in memory (default 64M)",
    )
    p.add_argument(
        "--disk-cache",
        default="0",
        metavar="SIZE",
        help="keep fetched ciphertext on disk under the cache dir, up to SIZE (default 0: off)",
    )
    p.add_argument(
        "-o",
        dest="fuse_opts",
        action="append",
        default=[],
        metavar="OPTS",
        help="extra FUSE mount options, comma separated",
    )
    p.add_argument("--read-only", action="store_true", help="mount read-only")
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users access the mount (needs user_allow_other for non-root)",
    )
    p.add_argument("--uid", type=int, help="owner of files that carry no owner (default: you)")
    p.add_argument("--gid", type=int, help="group of files that carry no group (default: yours)")
    p.add_argument(
        "--sync-close", action="store_true", help="close() returns only once the file is in S3"
    )
    p.add_argument(
        "--trust-attributes",
        action="store_true",
        help="show the setuid, setgid and sticky bits of modes stored in S3 (default: masked, "
        "since anyone who can write to the bucket can set them)",
    )
    p.add_argument(
        "--max-whole-object",
        default="256M",
        metavar="SIZE",
        help="largest gateway single-AEAD object to download whole to decrypt it (default 256M)",
    )
    p.add_argument(
        "--dir-cache-ttl",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a directory listing is trusted (default 5)",
    )
    p.add_argument(
        "--s3-timeout",
        type=float,
        default=45.0,
        metavar="SECONDS",
        help="how long one S3 operation is retried before it fails with EIO (default 45)",
    )
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="log file in the background (default: mount.log in the cache dir)",
    )
    _add_kms(p)
    p.add_argument(
        "--dek-cache-ttl",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long an unwrapped data key stays in memory (default 300; 0 disables)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="on a stop (SIGTERM, umount(8)), how long uploads may make no progress before the "
        "mount gives up waiting: what is left stays for the next mount, named in the log "
        "(default 120)",
    )
    p.add_argument(
        "--descriptor-refresh",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="re-read the volume descriptor before wrapping at most this often, so a key "
        "rotation done elsewhere reaches new files (default 60); before unwrapping at most "
        "every max(2, min(this, --dek-cache-ttl)) seconds, so a retire stops unwrapping",
    )
    MOUNT_DEFAULTS.update({a.dest: a.default for a in p._actions})

    p = sub.add_parser(
        "status",
        help="what a running mount is doing",
        description="Show a running mount's pending uploads, caches, S3 requests and errors, "
        "and key manager health.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    _add_log_level(p, "warning")

    p = sub.add_parser(
        "config",
        help="check a configuration file",
        description="Validate a mount configuration file and print the effective settings "
        "(flags > S3CRYPTFS_* environment > file > defaults), secrets masked.",
    )
    p.add_argument("action", choices=["check"])
    p.add_argument("file", metavar="FILE")
    _add_log_level(p, "warning")

    p = sub.add_parser(
        "umount",
        help="upload every pending file, then unmount",
        description="Wait until every file written through the mount is in S3, then unmount.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--lazy",
        action="store_true",
        help="if the mount process is gone, detach the dead mount (fusermount -uz)",
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
        "(exit 6)",
    )
    _add_log_level(p, "warning")
    _add_admin_commands(sub)
    _add_offline_commands(sub)
    return parser


def _add_kms(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kms-config",
        metavar="FILE",
        help="TOML file with a [key_manager] table: this machine's KMS connection settings",
    )
    p.add_argument(
        "--audit-log",
        metavar="PATH",
        help="append JSON lines of key operations (wrap, unwrap, rotate...) to PATH",
    )
    p.add_argument(
        "--gateway-master-key-file",
        metavar="FILE",
        help="the S3 Encryption Gateway's memory-provider master key (hex, base64 or raw), for "
        "its objects wrapped with provider memory (must not be readable by group or others)",
    )


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


def _add_admin_commands(sub: argparse._SubParsersAction) -> None:
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
        _add_common(p)
        _add_kms(p)
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
    p = volume_parser("migrate", "move the volume to another key manager (e.g. password -> KMS)")
    resumable(p)
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


def _add_offline_commands(sub: argparse._SubParsersAction) -> None:
    def object_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p)
        _add_kms(p)
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
    _add_common(p)
    _add_kms(p)
    p.add_argument("--full", action="store_true", help="download and authenticate every chunk")
    p.add_argument("--jobs", type=int, default=8, metavar="N", help="parallel checks (default 8)")


def cmd_offline(args: argparse.Namespace) -> int:
    from s3cryptfs import offline

    run = {
        "cat": offline.cmd_cat,
        "get": offline.cmd_get,
        "put": offline.cmd_put,
        "fsck": offline.cmd_fsck,
    }
    if args.command != "fsck":
        args.jobs = 1
    check_seed_key_manager_setting(args)
    return run[args.command](args)


def _setup_logging(level: str, stream: object = None, path: str | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if path:
        fd = hardening.open_append_private(path, "log file")
        handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    else:
        handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # urllib3 warns about header parsing on some S3 servers' 100-continue replies; harmless.
    logging.getLogger("urllib3.connection").setLevel(logging.ERROR)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, WrongPasswordError):
        return EXIT_WRONG_PASSWORD
    if isinstance(exc, PreconditionFailed):
        return EXIT_CONFLICT  # a conditional write lost a race: not a fault of S3
    if isinstance(exc, StoreError | AccessDenied | TransientStoreError):
        return EXIT_S3
    if isinstance(exc, VolumeError):
        return EXIT_VOLUME
    if isinstance(exc, ConfigError | UnknownProvider):
        return EXIT_USAGE
    if isinstance(exc, KeyManagerError):
        return EXIT_KEYS
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, UploadConflict):
        return EXIT_CONFLICT
    return EXIT_ERROR


# --- init ------------------------------------------------------------------------------------


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


# --- mount -----------------------------------------------------------------------------------


def _mount_spec(args: argparse.Namespace, password: bytes | None) -> object:
    from s3cryptfs.keys.config import load_kms_config
    from s3cryptfs.keys.ring import LocalKeys
    from s3cryptfs.mount import MountSpec

    local = LocalKeys()
    provider, options, secrets = load_kms_config(args.kms_config, os.environ)
    if provider is not None:
        local.add(provider, options, secrets)
    from s3cryptfs.vfs.core import FsOptions

    fuse_options: list[str] = []
    for group in args.fuse_opts:
        fuse_options += [o for o in group.split(",") if o]
    return MountSpec(
        url=config.parse_url(args.url),
        mountpoint=os.path.abspath(args.mountpoint),
        endpoint_url=args.endpoint_url,
        region=args.region,
        password=password,
        cache_root=os.path.abspath(args.cache_dir or config.default_cache_root()),
        fs_options=FsOptions(
            uid=os.getuid() if args.uid is None else args.uid,
            gid=os.getgid() if args.gid is None else args.gid,
            dir_ttl=args.dir_cache_ttl,
            read_only=args.read_only,
            sync_close=args.sync_close,
            memory_cache=config.parse_size(args.memory_cache),
            journal_limit=config.parse_size(args.cache_size),
            disk_cache=config.parse_size(args.disk_cache),
            trust_attributes=args.trust_attributes,
            max_whole_object=config.parse_size(args.max_whole_object),
        ),
        fuse_options=fuse_options,
        allow_other=args.allow_other,
        retry_deadline=args.s3_timeout,
        local_keys=local,
        gateway_master_key=(
            config.read_password_file(args.gateway_master_key_file)
            if args.gateway_master_key_file
            else None
        ),
        audit_log=os.path.abspath(args.audit_log) if args.audit_log else None,
        dek_cache_entries=4096 if args.dek_cache_ttl > 0 else 0,
        dek_cache_ttl=args.dek_cache_ttl,
        descriptor_refresh=args.descriptor_refresh,
        stop_timeout=args.stop_timeout,
    )


def resolve_mount_settings(args: argparse.Namespace) -> settings.FileConfig | None:
    """Merge --config FILE and S3CRYPTFS_* variables into *args* (flags win)."""
    cfg = settings.load_file(args.config) if args.config else None
    if args.mountpoint is None and args.url is not None and not args.url.startswith("s3://"):
        args.url, args.mountpoint = None, args.url  # `mount --config FILE MOUNTPOINT`
    origin = settings.apply(args, MOUNT_DEFAULTS, cfg, dict(os.environ))
    args.config_origin = origin
    if args.url is None or args.mountpoint is None:
        raise ConfigError(
            "usage: s3cryptfs mount s3://BUCKET[/PREFIX] MOUNTPOINT (or url in --config)"
        )
    # before a password is asked for; `config check` reports it too
    mountcheck.check_fuse_options([o for group in args.fuse_opts for o in group.split(",")])
    if cfg is not None and cfg.key_manager_enabled and not args.kms_config:
        raise ConfigError(
            f"{cfg.path}: encryption.key_manager.enabled is true but no [key_manager] table or "
            "kms_config says which key manager to use"
        )
    return cfg


def cmd_mount(args: argparse.Namespace) -> int:
    from s3cryptfs.mount import Mount

    cfg = resolve_mount_settings(args)
    check_seed_key_manager_setting(args)  # after --config, which may name the kms_config
    # In KMS mode a password is only needed (and asked for) when the volume still holds
    # password-wrapped objects; it is taken when one is offered.
    from_elsewhere = config.password_offered(args.password_file)
    offered = from_elsewhere or (cfg is not None and cfg.password is not None)
    if cfg is not None and cfg.password is not None and not from_elsewhere:
        # the file's [encryption] password comes last (docs/CONFIGURATION.md)
        password: bytes | None = cfg.password
    elif offered or not args.kms_config:
        password = config.get_password(args.password_file)
    else:
        password = None
    spec = _mount_spec(args, password)
    # Read: out of the environment of what may run for months (the daemon inherits this).
    hardening.scrub_secret_environment()
    mount = Mount(spec)  # type: ignore[arg-type]
    if args.foreground:
        _setup_logging(args.log_level, path=args.log_file)
        mount.prepare()
        return mount.run()
    return _daemonize(mount, args)


def _daemonize(mount: object, args: argparse.Namespace) -> int:
    """Fork; the child mounts and reports READY or the error through a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message.startswith("READY"):
            for line in message.splitlines()[1:]:
                print(f"s3cryptfs: warning: {line}", file=sys.stderr)
            return EXIT_OK
        if not message:
            _, status = os.waitpid(pid, 0)
            print("s3cryptfs: the mount process died before the mount was ready", file=sys.stderr)
            return EXIT_ERROR
        code, _, text = message.partition(" ")
        print(f"s3cryptfs: {text}", file=sys.stderr)
        os.waitpid(pid, 0)
        return int(code) if code.isdigit() else EXIT_ERROR

    # child
    os.close(read_fd)
    os.setsid()
    code = EXIT_OK
    try:
        from s3cryptfs.mount import Mount

        assert isinstance(mount, Mount)
        _setup_logging(args.log_level, stream=sys.stderr)
        mount.prepare()
        assert mount.fs is not None
        log_path = args.log_file or os.path.join(mount.fs.cache_dir, "mount.log")
        _setup_logging(args.log_level, path=log_path)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

        def ready() -> None:
            os.write(write_fd, "\n".join(["READY", *mount.warnings]).encode())
            os.close(write_fd)

        code = mount.run(ready)
    except S3CryptFSError as exc:
        code = _exit_code(exc)
        _report(write_fd, code, str(exc))
    except OSError as exc:
        if exc.filename is None:
            code = EXIT_ERROR
            log.exception("mount failed")
            _report(write_fd, code, f"mount failed: {exc}")
        else:  # a path the user gave (--log-file...): a usage error, as in main()
            code = EXIT_USAGE
            _report(write_fd, code, f"cannot use {exc.filename}: {exc.strerror}")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, then logged
        code = EXIT_ERROR
        log.exception("mount failed")
        _report(write_fd, code, f"mount failed: {exc}")
    os._exit(code)


def _report(fd: int, code: int, text: str) -> None:
    try:
        os.write(fd, f"{code} {text}".encode())
        os.close(fd)
    except OSError:
        pass


# --- umount ----------------------------------------------------------------------------------


def cmd_admin(args: argparse.Namespace) -> int:
    from s3cryptfs.ops import commands, upgrade

    run = {"keys": commands.cmd_keys, "rewrap": commands.cmd_rewrap}
    run["migrate"] = commands.cmd_migrate
    run["upgrade"] = upgrade.cmd_upgrade
    check_seed_key_manager_setting(args)
    if args.command == "keys":
        want = 2 if args.action in ("retire", "import", "schedule") else 1
        if len(args.target) != want:
            usage = {
                "retire": "retire VERSION s3://BUCKET[/PREFIX]",
                "import": "import FILE s3://BUCKET[/PREFIX]",
                "schedule": "schedule DAYS s3://BUCKET[/PREFIX]  (0: no schedule)",
            }.get(args.action, f"{args.action} s3://BUCKET[/PREFIX]")
            raise ConfigError(f"usage: s3cryptfs keys {usage}")
        args.url = args.target[-1]
        if args.action in ("export", "import"):
            from s3cryptfs.ops import backup

            args.file = args.target[0] if args.action == "import" else args.output
            return backup.cmd_export(args) if args.action == "export" else backup.cmd_import(args)
        args.version = args.target[0] if want == 2 else None
        if args.version is not None and not args.version.isdigit():
            raise ConfigError(f"key version {args.version!r} is not a number")
    return run[args.command](args)


def cmd_config(args: argparse.Namespace) -> int:
    parser = build_parser()
    mount_args = parser.parse_args(["mount", "--config", args.file])
    cfg = resolve_mount_settings(mount_args) if mount_args.url else None
    if cfg is None:  # no url in the file: still validate and show it
        cfg = settings.load_file(args.file)
        mount_args.config_origin = settings.apply(mount_args, MOUNT_DEFAULTS, cfg, dict(os.environ))
    print(f"# {args.file}: valid")
    print(settings.effective(mount_args, mount_args.config_origin, cfg))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import json

    try:
        raw = os.getxattr(args.mountpoint, "user.s3cryptfs.status")
    except PermissionError:
        raise ConfigError(
            f"{args.mountpoint}: only root and the user who mounted it may read its status"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{args.mountpoint} is not an s3cryptfs mount ({exc.strerror})") from None
    status = json.loads(raw)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    up = status.get("uploads", {})
    cache = status.get("block_cache", {})
    looked = cache.get("hits", 0) + cache.get("misses", 0)
    ratio = f"{cache.get('hits', 0) / looked:.0%}" if looked else "n/a"
    print(f"mount:        {os.path.abspath(args.mountpoint)}")
    print(
        f"dirty files:  {status.get('dirty_files', 0)} "
        f"({up.get('queued', 0)} queued, {up.get('in_flight', 0)} uploading, "
        f"{up.get('queued_bytes', 0) / 2**20:.1f} MiB waiting)"
    )
    print(
        f"block cache:  {cache.get('bytes', 0) / 2**20:.1f} of "
        f"{cache.get('budget', 0) / 2**20:.0f} MiB, hit ratio {ratio}"
    )
    if "disk_cache" in status:
        d = status["disk_cache"]
        print(f"disk cache:   {d['bytes'] / 2**20:.1f} MiB, {d['hits']} hits, {d['misses']} misses")
    requests = ", ".join(f"{k} {v}" for k, v in sorted(status.get("requests", {}).items()))
    errors = ", ".join(f"{k} {v}" for k, v in sorted(status.get("errors", {}).items()))
    print(f"S3 requests:  {requests or 'none'}")
    print(f"S3 errors:    {errors or 'none'}")
    for provider, health in sorted(status.get("key_managers", {}).items()):
        print(f"key manager:  {provider}: {health}")
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from s3cryptfs import umount

    return umount.cmd_umount(args)


COMMANDS = {
    "status": cmd_status,
    "config": cmd_config,
    "init": cmd_init,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "keys": cmd_admin,
    "rewrap": cmd_admin,
    "migrate": cmd_admin,
    "upgrade": cmd_admin,
    "cat": cmd_offline,
    "get": cmd_offline,
    "put": cmd_offline,
    "fsck": cmd_offline,
}


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Buffered output meets a closed pipe here, inside the handler below, rather than
            # at interpreter exit (where it would print "Exception ignored ... BrokenPipeError").
            sys.stdout.flush()
    except BrokenPipeError as exc:
        return _last_resort(exc)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling positionals at the first option: `keys retire 1 --force URL`.
    if args.command == "keys" and extra and not any(e.startswith("-") for e in extra):
        args.target += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = getattr(args, "log_level", "warning")
    # init's INFO lines (S3 client set-up) are noise next to its one line of output
    _setup_logging("warning" if args.command == "init" and level == "info" else level)
    try:
        return COMMANDS[args.command](args)
    except S3CryptFSError as exc:
        print(f"s3cryptfs: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt as exc:
        # rewrap and migrate turn SIGTERM into an exception too (ops/checkpoint.py)
        return EXIT_TERMINATED if getattr(exc, "signum", None) == SIGTERM else EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        return _last_resort(exc)


def _reader_gone(stream: object) -> bool:
    """True when *stream* is a pipe (or socket) whose reading end was closed."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported: a pipe without readers raises it
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _closed_pipe(exc: Exception) -> bool:
    """`s3cryptfs status MNT | head -3`: the reader has what it wanted. Leave quietly, as tools
    killed by SIGPIPE do, with nothing left to flush into the closed pipe at exit."""
    if not isinstance(exc, BrokenPipeError):
        return False
    gone = [s for s in (sys.stdout, sys.stderr) if _reader_gone(s)]
    if not gone:
        return False  # some other pipe (a helper process?): a real error
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in gone:
        os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return True


def _last_resort(exc: Exception) -> int:
    """An error no command turned into a message of its own. A local file named by the user
    (a path that is missing, a directory, not writable...) is a usage error; anything else is
    a bug, whose traceback goes to the debug log rather than at the user."""
    if _closed_pipe(exc):
        return EXIT_BROKEN_PIPE
    log.debug("traceback of the error below", exc_info=exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        print(f"s3cryptfs: cannot use {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"s3cryptfs: unexpected error ({type(exc).__name__}): {exc}; "
        "--log-level debug shows the traceback",
        file=sys.stderr,
    )
    return EXIT_ERROR
