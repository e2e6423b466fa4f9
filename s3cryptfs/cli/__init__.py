"""The command line: s3cryptfs init | mount | umount | status | keys | ... Exit codes are
documented in docs/CLI.md.

Modules: parser (every command's flags), mount (the mount command and its daemon), init,
commands (status, config check, and the hand-over to the admin, offline and umount modules),
exits (errors to exit codes), logs, kms_mode (the gateway's KEY_MANAGER_ENABLED).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from signal import SIGTERM

from s3cryptfs.cli.commands import cmd_admin, cmd_config, cmd_offline, cmd_status, cmd_umount
from s3cryptfs.cli.exits import exit_code, last_resort
from s3cryptfs.cli.init import cmd_init
from s3cryptfs.cli.logs import setup_logging
from s3cryptfs.cli.mount import cmd_mount
from s3cryptfs.cli.parser import build_parser
from s3cryptfs.errors import S3CryptFSError
from s3cryptfs.exitcodes import EXIT_INTERRUPTED, EXIT_TERMINATED

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
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
        return last_resort(exc)


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
    setup_logging("warning" if args.command == "init" and level == "info" else level)
    try:
        return COMMANDS[args.command](args)
    except S3CryptFSError as exc:
        print(f"s3cryptfs: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        # rewrap and migrate turn SIGTERM into an exception too (ops/checkpoint.py)
        return EXIT_TERMINATED if getattr(exc, "signum", None) == SIGTERM else EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        return last_resort(exc)

