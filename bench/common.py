"""What the benchmarks share: a SeaweedFS on a free port, the CLI, a password file, a timer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import SeaweedFS, free_port  # noqa: E402

__all__ = ["SeaweedFS", "cli", "free_port", "start", "timed"]


def start(work: Path, bucket: str, password: bytes) -> tuple[SeaweedFS, dict[str, str], Path]:
    """A server with *bucket*, the environment for the CLI, and a 0600 password file."""
    server = SeaweedFS(work / "weed")
    server.make_bucket(bucket)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    pwfile = work / "pw"
    pwfile.write_bytes(password)
    pwfile.chmod(0o600)
    return server, env, pwfile


def cli(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "s3cryptfs", *args], env=env, check=True, stdin=subprocess.DEVNULL
    )


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
