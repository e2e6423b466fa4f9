"""The command line's own behaviour, without servers: how a command ends when something goes
wrong that no command has a message for, and the gateway's KEY_MANAGER_ENABLED."""

from __future__ import annotations

import logging
import os

import pytest

from s3cryptfs import cli


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
    assert code == cli.EXIT_ERROR
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
    assert cli.main(["status", "/nowhere"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "s3cryptfs: cannot use /srv/no/such/file: No such file or directory\n"
