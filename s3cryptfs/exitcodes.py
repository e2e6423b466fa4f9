"""Exit codes: documented API (docs/CLI.md, "Exit codes"); scripts and systemd depend on them.

The one place they are defined; cli/exits.py maps error kinds to them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# `umount` of a mount that processes still use (named): as umount(8) says "target is busy"
EXIT_BUSY = 2
EXIT_WRONG_PASSWORD = 3
EXIT_S3 = 4
EXIT_VOLUME = 5
EXIT_INCOMPLETE = 6  # something was refused, skipped, failed or not uploaded: see the report
EXIT_KEYS = 7
EXIT_INTEGRITY = 8
EXIT_CONFLICT = 9
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as shells report it: 128 + 2
EXIT_BROKEN_PIPE = 141  # the reader of our output went away (`| head`): 128 + SIGPIPE
EXIT_TERMINATED = 143  # SIGTERM during rewrap or migrate, after the checkpoint is saved
