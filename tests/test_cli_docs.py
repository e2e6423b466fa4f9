"""docs/CLI.md, docs/TROUBLESHOOTING.md and `--help` agree with the code. Pure: no servers.

* Exit codes: every ``EXIT_*`` constant of the package is a row of CLI.md's exit-code table
  whose meaning carries the constant's words, and every row is a constant. The kinds table of
  TROUBLESHOOTING.md ("Exit codes by kind of error") gives each error class the code
  ``cli.exits.exit_code`` returns for it, and every message documented with "**Means:** exit N" is
  raised (where it is raised as an s3cryptfs error) by a class that exits N.
* Environment: every variable the code reads (``os.environ[...]``, ``os.environ.get(...)``,
  ``os.getenv(...)``, and the names read by the functions the environment is handed to) is a
  row of CLI.md's environment table, and every row is read.
* ``s3cryptfs keys --help`` lists every action with a description.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from pathlib import Path

import pytest

from s3cryptfs import errors, options
from s3cryptfs.cli import build_parser, exits
from s3cryptfs.exitcodes import EXIT_ERROR
from s3cryptfs.keys import config as kms_config
from tests.test_troubleshooting import (
    DOC as TROUBLESHOOTING,
)
from tests.test_troubleshooting import (
    ERROR_CLASSES,
    TREES,
    classify,
    doc_templates,
    extract,
    normalize,
)

ROOT = Path(__file__).resolve().parent.parent
CLI_DOC = ROOT / "docs" / "CLI.md"


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after *heading*."""
    lines = text.split(heading, 1)[1].splitlines()
    rows: list[list[str]] = []
    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header


# --- exit codes -------------------------------------------------------------------------------


def exit_constants() -> dict[str, int]:
    """EXIT_* = <int> at module level, anywhere in the package."""
    found: dict[str, int] = {}
    for rel, tree in TREES.items():
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.startswith("EXIT_")
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, int)
            ):
                name = node.targets[0].id
                assert found.get(name, node.value.value) == node.value.value, (rel, name)
                found[name] = node.value.value
    return found


# The words a constant's name stands for, where the table says it otherwise.
EXIT_WORDS = {"EXIT_OK": "success", "EXIT_KEYS": "key manager"}


def cli_exit_table() -> dict[int, str]:
    return {int(code): meaning for code, meaning in _table(CLI_DOC.read_text(), "## Exit codes")}


def test_every_exit_code_constant_is_documented_with_its_meaning():
    constants = exit_constants()
    assert {"EXIT_OK", "EXIT_USAGE", "EXIT_INCOMPLETE", "EXIT_BROKEN_PIPE"} <= set(constants)
    table = cli_exit_table()
    wrong = []
    for name, code in sorted(constants.items(), key=lambda kv: kv[1]):
        words = EXIT_WORDS.get(name, name.removeprefix("EXIT_").replace("_", " ").lower())
        meaning = table.get(code)
        if meaning is None or words not in meaning.lower():
            wrong.append(f"{name} = {code}: docs/CLI.md says {meaning!r}, expected {words!r}")
    assert not wrong, "\n".join(wrong)
    undocumented = sorted(set(table) - set(constants.values()))
    assert not undocumented, f"exit codes in docs/CLI.md that no constant names: {undocumented}"


def _error_classes() -> dict[str, type[errors.S3CryptFSError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.S3CryptFSError)
    }


def _exit_of(cls: type[BaseException]) -> int:
    return exits.exit_code(cls.__new__(cls))  # only its class matters


def kinds_table() -> dict[str, int]:
    """class name -> exit code, from TROUBLESHOOTING.md's "Exit codes by kind of error"."""
    rows = _table(TROUBLESHOOTING.read_text(), "**Exit codes by kind of error**")
    out: dict[str, int] = {}
    for code, kinds in rows:
        for name in re.findall(r"`(\w+)`", kinds.split(":", 1)[0]):
            out[name] = int(code)
    return out


def test_the_exit_codes_by_kind_of_error_are_the_cli_s():
    table = kinds_table()
    classes = _error_classes()
    assert {"ConfigError", "StoreError", "KeyManagerError"} <= set(table)
    wrong = []
    for name, cls in sorted(classes.items()):
        # the row of the class itself or of its nearest listed ancestor; none: "everything else"
        listed = next((c.__name__ for c in cls.__mro__ if c.__name__ in table), None)
        documented = table[listed] if listed else EXIT_ERROR
        if _exit_of(cls) != documented:
            wrong.append(
                f"{name}: exits {_exit_of(cls)}, TROUBLESHOOTING.md says {documented} "
                f"(row of {listed or 'everything else'})"
            )
    assert not wrong, "\n".join(wrong)


# A message whose documented exit code differs from the class it is raised as, because a
# caller turns it into another kind before a command can end with it.
CONVERTED = {
    # cmd_init (cli/init.py) turns the gateway-settings checks into ConfigError (exit 2);
    # elsewhere the same FormatError makes a file fail with EIO.
    "gateway: cannot write with key wrap {}": "cmd_init re-raises as ConfigError",
    "gateway: iterations must be within 100000..2000000": "cmd_init re-raises as ConfigError",
    "gateway: chunk size must be within 16384..1048576": "cmd_init re-raises as ConfigError",
}


def documented_exits() -> list[tuple[int, str, int]]:
    """(line, template, exit code) of every entry whose paragraph starts "**Means:** exit N"."""
    text = TROUBLESHOOTING.read_text()
    entries = doc_templates(text)
    lines = text.splitlines()
    out = []
    group: list[tuple[int, str]] = []
    last = 0
    for lineno, template in entries:
        if group and lineno != last + 1:
            group = []
        group.append((lineno, template))
        last = lineno
        # the paragraph after the group: the first non-empty line that is not an entry
        following = next(
            (line for line in lines[lineno:] if line.strip() and not line.startswith("- `")), ""
        )
        if lineno < len(lines) and lines[lineno].startswith("- `"):
            continue  # the group goes on
        m = re.match(r"\*\*Means:\*\* exit (\d+)\b(?! or)", following)
        if m:
            out += [(n, t, int(m.group(1))) for n, t in group]
        group = []
    return out


def test_documented_exit_codes_match_the_error_raised():
    wanted, _, _ = classify(extract())
    classes = _error_classes()
    checked, wrong = 0, []
    for lineno, template, code in documented_exits():
        key = normalize(template)
        if key in CONVERTED:
            continue
        for message in wanted.get(key, []):
            kind = message.source.removeprefix("raise ")
            if not message.source.startswith("raise ") or kind not in classes:
                continue  # printed, or raised through a variable: no class to compare
            checked += 1
            if _exit_of(classes[kind]) != code:
                wrong.append(
                    f"docs/TROUBLESHOOTING.md:{lineno}: exit {code} for `{template}`, but "
                    f"{message.where} raises {kind}, which exits {_exit_of(classes[kind])}"
                )
    assert checked > 50  # the parser keeps finding the documented exits
    assert not wrong, "\n".join(wrong)


def test_the_error_kinds_are_the_extractor_s():
    assert set(_error_classes()) == ERROR_CLASSES


# --- environment ------------------------------------------------------------------------------


def _constants_of(tree: ast.Module) -> dict[str, str]:
    return {
        node.targets[0].id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


# Functions the whole environment is handed to, and the names they read from it.
ENV_READERS = {
    "load_kms_config": sorted(kms_config.SECRET_ENV) + [f"{kms_config.GENERIC_PREFIX}<NAME>"],
    "apply": [f"{options.ENV_PREFIX}<SETTING>"],  # settings.apply: S3CRYPTFS_ + a mount key
    "helper_environment": [],  # passes it on to the upload helper, without secrets
    "secret_variables": [],  # picks the secret variables to remove (hardening.py)
}


def env_reads() -> tuple[dict[str, list[str]], list[str]]:
    """(variable name -> where it is read, sites the test cannot resolve)."""
    package = {}
    for tree in TREES.values():
        package.update(_constants_of(tree))
    found: dict[str, list[str]] = {}
    unresolved: list[str] = []

    def name_of(arg: ast.expr, local: dict[str, str]) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name):
            return local.get(arg.id, package.get(arg.id))
        if isinstance(arg, ast.Attribute):  # config.PASSWORD_ENV
            return package.get(arg.attr)
        return None

    for rel, tree in TREES.items():
        local = _constants_of(tree)
        for node in ast.walk(tree):
            where = f"s3cryptfs/{rel}:{getattr(node, 'lineno', 0)}"
            arg: ast.expr | None = None
            if isinstance(node, ast.Subscript) and _is_environ(node.value):
                if isinstance(node.ctx, ast.Del):
                    continue  # removing a variable (hardening: secrets once read) reads nothing
                arg = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                func = node.func
                if (func.attr in ("get", "pop", "setdefault") and _is_environ(func.value)) or (
                    func.attr == "getenv"
                ):
                    arg = node.args[0] if node.args else None
            elif isinstance(node, ast.Compare) and any(map(_is_environ, node.comparators)):
                arg = node.left
            if isinstance(node, ast.Call):
                callee = ast.unparse(node.func).rsplit(".", 1)[-1]
                for a in node.args:
                    if _is_environ(a) or (
                        isinstance(a, ast.Call) and a.args and _is_environ(a.args[0])
                    ):
                        if callee == "dict":
                            continue  # a copy: its reader is the call it is passed to
                        if callee not in ENV_READERS:
                            unresolved.append(f"{where}: the environment is passed to {callee}()")
                        for name in ENV_READERS.get(callee, []):
                            found.setdefault(name, []).append(where)
            if arg is None:
                continue
            name = name_of(arg, local)
            if name is None:
                unresolved.append(f"{where}: reads {ast.unparse(arg)}")
            else:
                found.setdefault(name, []).append(where)
    return found, unresolved


def env_table() -> dict[str, str]:
    out = {}
    for cells in _table(CLI_DOC.read_text(), "## Environment"):
        for name in re.findall(r"`([A-Z][A-Z0-9_<>]*)`", cells[0]):
            out[name] = cells[1]
    return out


def test_every_environment_variable_read_is_in_the_cli_doc():
    found, unresolved = env_reads()
    assert not unresolved, "\n".join(unresolved)
    for name in ("S3CRYPTFS_PASSWORD", "ENCRYPTION_PASSWORD", "KEY_MANAGER_ENABLED"):
        assert name in found  # the scanner sees the known readers
    table = env_table()
    missing = [f"{name} (read at {', '.join(found[name])})" for name in found if name not in table]
    assert not missing, "not in docs/CLI.md's environment table:\n" + "\n".join(sorted(missing))
    unread = sorted(set(table) - set(found))
    assert not unread, f"docs/CLI.md documents variables the code does not read: {unread}"


# --- keys --help -------------------------------------------------------------------------------


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_keys_help_lists_every_action():
    keys = _subparser("keys")
    action = next(a for a in keys._actions if a.dest == "action")
    assert action.choices and "export" in action.choices
    text = keys.format_help()
    lines = text.split("\nactions:\n", 1)[1].splitlines()
    described = {}
    for line in lines:
        m = re.match(r"  (\S+)\s{2,}(\S.*)", line)
        if m:
            described[m.group(1)] = m.group(2)
    assert set(action.choices) == set(described), text
    assert all(len(line) <= 80 for line in lines), text


@pytest.mark.parametrize("name", ["keys", "rewrap", "migrate", "status", "umount", "config"])
def test_every_command_takes_log_level(name):
    """The last-resort message sends the user to --log-level debug: it must exist."""
    assert any("--log-level" in a.option_strings for a in _subparser(name)._actions)
