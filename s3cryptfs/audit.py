"""Opt-in audit log: one JSON object per line for every key operation. Never key material.

Fields: ``time`` (UTC, ISO 8601), ``event`` (wrap, unwrap, rotate, retire, rewrap, migrate, ...),
``provider``, ``key_id``, ``key_version``, ``object`` (the S3 key, when there is one),
``outcome`` ("ok" or the error kind) and ``detail`` (a short message, never a secret).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from typing import Any

from s3cryptfs.hardening import open_append_private


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path:
            self._fd = open_append_private(path, "audit log")

    def event(self, event: str, outcome: str = "ok", **fields: Any) -> None:
        if self._fd is None:
            return
        record: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        record.update({k: v for k, v in fields.items() if v is not None})
        record["outcome"] = outcome
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)  # one write per line: O_APPEND keeps lines whole

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


NO_AUDIT = AuditLog(None)
