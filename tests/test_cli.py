"""The command line's own behaviour, without servers: how a command ends when something goes
wrong that no command has a message for, and the gateway's KEY_MANAGER_ENABLED."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s3cryptfs import cli, exitcodes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_logging():
    """main() configures the root logger for a command line; give pytest its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _failing(exc: Exception):
    def command(args):
        raise exc

    return command


@pytest.mark.parametrize("level", ["warning", "debug"])
def test_an_unexpected_error_is_one_line(monkeypatch, capsys, restore_logging, level):
    monkeypatch.setitem(cli.COMMANDS, "status", _failing(RuntimeError("it broke")))
    code = cli.main(["status", "/nowhere", "--log-level", level])
    err = capsys.readouterr().err
    assert code == exitcodes.EXIT_ERROR
    message = (
        "s3cryptfs: unexpected error (RuntimeError): it broke; --log-level debug shows the "
        "traceback\n"
    )
    if level == "debug":
        assert err.endswith(message) and "Traceback" in err and "RuntimeError: it broke" in err
    else:
        assert err == message


def test_an_os_error_on_a_path_is_a_usage_error(monkeypatch, capsys, restore_logging):
    missing = FileNotFoundError(2, os.strerror(2), "/srv/no/such/file")
    monkeypatch.setitem(cli.COMMANDS, "status", _failing(missing))
    assert cli.main(["status", "/nowhere"]) == exitcodes.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "s3cryptfs: cannot use /srv/no/such/file: No such file or directory\n"


def _into_closed_pipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a pipe whose reader is already gone, as `... | head -1` ends."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "s3cryptfs", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            timeout=60,
        )
    finally:
        os.close(write_end)


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    cfg = tmp_path / "mount.toml"
    cfg.write_text('cache_size = "1G"\nmemory_cache = "32M"\n')
    proc = _into_closed_pipe("config", "check", str(cfg))
    assert proc.stderr == ""  # it was a BrokenPipeError, "Exception ignored" at exit
    assert proc.returncode == exitcodes.EXIT_BROKEN_PIPE == 141


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3cryptfs", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=120,
    )


# Nothing listens there: a command that got past the check would fail on S3, not on the switch.
NO_S3 = ["--endpoint-url", "http://127.0.0.1:9"]


@pytest.mark.parametrize(
    "value, args, expected",
    [
        (
            "yes",
            ["rewrap", "s3://bkt/p", *NO_S3],
            "KEY_MANAGER_ENABLED=yes: expected true or false",
        ),
        ("1", ["keys", "status", "s3://bkt/p", *NO_S3], "KEY_MANAGER_ENABLED=1: expected true or"),
        (
            "TRUE",
            ["cat", "s3://bkt/p/k", *NO_S3],
            "KEY_MANAGER_ENABLED=TRUE (the gateway's setting) asks for KMS mode, but no key "
            "manager was chosen: give --kms-config FILE",
        ),
        ("true", ["mount", "s3://bkt/p", "/nowhere", *NO_S3], "=true (the gateway's setting) asks"),
        (
            "False",
            ["migrate", "s3://bkt/p", "--to", "vault", "--kms-config", "k.toml", *NO_S3],
            "KEY_MANAGER_ENABLED=False (the gateway's setting) contradicts --to vault",
        ),
        ("false", ["fsck", "s3://bkt/p", "--kms-config", "k.toml", *NO_S3], "contradicts --kms"),
        (
            "TRUE",
            ["init", "s3://bkt/p", *NO_S3],
            "KEY_MANAGER_ENABLED=TRUE (the gateway's setting) asks for KMS mode, but no key "
            "manager was chosen: give --key-manager PROVIDER and --kms-config FILE",
        ),
    ],
    ids=["rewrap-yes", "keys-1", "cat-TRUE", "mount-true", "migrate-False", "fsck-false", "init"],
)
def test_key_manager_enabled_is_true_or_false_for_every_command(value, args, expected):
    """The gateway's KEY_MANAGER_ENABLED: only true/false (any case), echoed as given, and
    honoured by every command that takes --kms-config (it was read by init alone)."""
    proc = _cli(*args, env={"KEY_MANAGER_ENABLED": value})
    assert proc.returncode == exitcodes.EXIT_USAGE, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert expected in line, line


def test_key_manager_enabled_true_lets_a_kms_init_through(tmp_path):
    missing = tmp_path / "kms.toml"
    proc = _cli(
        "init", "s3://bkt/p", *NO_S3, "--key-manager", "vault", "--kms-config", str(missing),
        env={"KEY_MANAGER_ENABLED": "True"},
    )  # fmt: skip
    assert proc.returncode == exitcodes.EXIT_USAGE
    assert f"cannot read key manager config {missing}" in proc.stderr, proc.stderr
