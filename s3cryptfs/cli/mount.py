"""`s3cryptfs mount`: settings from flags, environment and file, then the mount, in the
foreground or in a daemon that reports back once the mount is ready."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from s3cryptfs import config, hardening, mountcheck, settings
from s3cryptfs.cli.exits import exit_code
from s3cryptfs.cli.kms_mode import check_seed_key_manager_setting
from s3cryptfs.cli.logs import setup_logging
from s3cryptfs.errors import ConfigError, S3CryptFSError
from s3cryptfs.exitcodes import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from s3cryptfs.options import Layer, layer_values

if TYPE_CHECKING:
    from s3cryptfs.mount import Mount, MountSpec
    from s3cryptfs.vfs.core import FsOptions

log = logging.getLogger("s3cryptfs")


def mount_spec(args: argparse.Namespace, password: bytes | None) -> MountSpec:
    """What the mount needs, from the settings resolve_mount_settings() merged into *args*:
    FsOptions straight from the table's FS layer, the rest one by one."""
    from s3cryptfs.keys.config import load_kms_config
    from s3cryptfs.keys.ring import LocalKeys
    from s3cryptfs.metrics import parse_address
    from s3cryptfs.mount import MountSpec

    local = LocalKeys()
    provider, kms_options, secrets = load_kms_config(args.kms_config, os.environ)
    if provider is not None:
        local.add(provider, kms_options, secrets)
    return MountSpec(
        url=config.parse_url(args.url),
        mountpoint=os.path.abspath(args.mountpoint),
        endpoint_url=args.endpoint_url,
        region=args.region,
        password=password,
        cache_root=os.path.abspath(args.cache_dir or config.default_cache_root()),
        fs_options=fs_options(args),
        fuse_options=fuse_options(args),
        allow_other=args.allow_other,
        retry_deadline=args.s3_timeout,
        s3_client=args.s3_client,
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
        metrics=parse_address(args.metrics) if args.metrics else None,
    )


def fs_options(args: argparse.Namespace) -> FsOptions:
    from s3cryptfs.vfs.core import FsOptions

    return FsOptions(**_fs_values(args))


def _fs_values(args: argparse.Namespace) -> dict[str, Any]:
    # sizes and modes are parsed here: an error names the flag, the variable or the file and key
    return layer_values(Layer.FS, vars(args), getattr(args, "config_origin", {}))


def fuse_options(args: argparse.Namespace) -> list[str]:
    return [o for group in args.fuse_opts for o in group.split(",") if o]


def check_values(args: argparse.Namespace) -> None:
    """What can be checked before a password is asked for; `config check` reports it too."""
    mountcheck.check_fuse_options(fuse_options(args))
    _fs_values(args)


def resolve_mount_settings(args: argparse.Namespace) -> settings.FileConfig | None:
    """Merge --config FILE and S3CRYPTFS_* variables into *args* (flags win)."""
    cfg = settings.load_file(args.config) if args.config else None
    if args.mountpoint is None and args.url is not None and not args.url.startswith("s3://"):
        args.url, args.mountpoint = None, args.url  # `mount --config FILE MOUNTPOINT`
    args.config_origin = settings.apply(args, cfg, dict(os.environ))
    if args.url is None or args.mountpoint is None:
        raise ConfigError(
            "usage: s3cryptfs mount s3://BUCKET[/PREFIX] MOUNTPOINT (or url in --config)"
        )
    check_values(args)
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
    spec = mount_spec(args, password)
    # Read: out of the environment of what may run for months (the daemon inherits this).
    hardening.scrub_secret_environment()
    mount = Mount(spec)
    if args.foreground:
        setup_logging(args.log_level, path=args.log_file)
        mount.prepare()
        return mount.run()
    return _daemonize(mount, args)


def _daemonize(mount: Mount, args: argparse.Namespace) -> int:
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
            os.waitpid(pid, 0)
            print("s3cryptfs: the mount process died before the mount was ready", file=sys.stderr)
            return EXIT_ERROR
        sent, _, text = message.partition(" ")
        print(f"s3cryptfs: {text}", file=sys.stderr)
        os.waitpid(pid, 0)
        return int(sent) if sent.isdigit() else EXIT_ERROR

    # child
    os.close(read_fd)
    os.setsid()
    code = EXIT_OK
    try:
        setup_logging(args.log_level, stream=sys.stderr)
        mount.prepare()
        assert mount.fs is not None
        log_path = args.log_file or os.path.join(mount.fs.cache_dir, "mount.log")
        setup_logging(args.log_level, path=log_path)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

        def ready() -> None:
            os.write(write_fd, "\n".join(["READY", *mount.warnings]).encode())
            os.close(write_fd)

        code = mount.run(ready)
    except S3CryptFSError as exc:
        code = exit_code(exc)
        _report(write_fd, code, str(exc))
    except OSError as exc:
        if exc.filename is None:
            code = EXIT_ERROR
            log.exception("mount failed")
            _report(write_fd, code, f"mount failed: {exc}")
        else:  # a path the user gave (--log-file...): a usage error, as in main()
            code = EXIT_USAGE
            _report(write_fd, code, f"cannot use {exc.filename}: {exc.strerror}")
    except Exception as exc:  # reported to the parent, then logged
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

