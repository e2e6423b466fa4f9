"""The commands that hand over to their own modules (keys, rewrap, migrate, upgrade, cat, get,
put, fsck, umount), and the two small ones: status and config check."""

from __future__ import annotations

import argparse
import os

from s3cryptfs import settings
from s3cryptfs.cli.kms_mode import check_seed_key_manager_setting
from s3cryptfs.cli.mount import check_values, resolve_mount_settings
from s3cryptfs.cli.parser import build_parser
from s3cryptfs.errors import ConfigError
from s3cryptfs.exitcodes import EXIT_OK


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
        mount_args.config_origin = settings.apply(mount_args, cfg, dict(os.environ))
        check_values(mount_args)
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
    if status.get("closed_not_sealed"):
        print(
            f"not sealed:   {status['closed_not_sealed']} closed, not sealed yet (kept on this "
            "disk and retried; the mount's log says why)"
        )
    conflicts = status.get("conflicts", {})
    if conflicts.get("count"):
        latest = ", ".join(conflicts.get("latest", [])[-3:])
        print(f"conflicts:    {conflicts['count']} version(s) saved as copies (latest: {latest})")
    print(
        f"block cache:  {cache.get('bytes', 0) / 2**20:.1f} of "
        f"{cache.get('budget', 0) / 2**20:.0f} MiB, hit ratio {ratio}"
    )
    if "disk_cache" in status:
        d = status["disk_cache"]
        print(f"disk cache:   {d['bytes'] / 2**20:.1f} MiB, {d['hits']} hits, {d['misses']} misses")
    if "inodes" in status:
        n = status["inodes"]
        limit = f"limit {n['limit']}" if n.get("limit") else "no limit"
        print(f"inodes:       {n['known']} known ({limit}), {n['dropped']} dropped")
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

