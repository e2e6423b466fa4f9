"""Logging of the command line and of the mount process."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from s3cryptfs import hardening


def setup_logging(level: str, stream: TextIO | None = None, path: str | None = None) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if path:
        fd = hardening.open_append_private(path, "log file")
        handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # urllib3 warns about header parsing on some S3 servers' 100-continue replies; harmless.
    logging.getLogger("urllib3.connection").setLevel(logging.ERROR)

