"""The option tables of docs/CONFIGURATION.md and docs/CLI.md, made from s3cryptfs/options.py.

    python3 -m s3cryptfs.options_doc            # rewrite both documents' tables
    python3 -m s3cryptfs.options_doc --check    # exit 1 if one is not current

Each table stands between the two marker lines below; the rest of the documents is written by
hand. tests/test_options.py fails when a table is not what this module makes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from s3cryptfs.options import OPTIONS, Kind, Option, default_words

BEGIN = (
    "<!-- generated from s3cryptfs/options.py by `python3 -m s3cryptfs.options_doc`: "
    "edit the options there -->"
)
END = "<!-- end of the generated options -->"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def meaning(option: Option) -> str:
    """Help, default and the docs' extra sentences, as one Markdown cell."""
    words = default_words(option, option.default)
    text = option.help + (f" (default: {words})" if words else "")
    return f"{text}. {option.doc}" if option.doc else text


def _flag(option: Option) -> str:
    if not option.option_strings:
        position = [o for o in OPTIONS if not o.option_strings].index(option)
        return ("first", "second")[position] + " argument"
    return ", ".join(f"`{s}`" for s in option.option_strings)


def _type(option: Option) -> str:
    if option.secret_file:
        return "path (a 0600 file)"
    if option.choices:
        return "one of " + ", ".join(f"`{c}`" for c in option.choices)
    return option.kind.value


def configuration_table() -> str:
    """docs/CONFIGURATION.md: every key of the file, its flag and its variable."""
    rows = ["| key | type | flag | variable | meaning |", "|---|---|---|---|---|"]
    for o in OPTIONS:
        if o.in_file:
            variable = f"`{o.env_name}`" if o.env else "no"
            rows.append(f"| `{o.name}` | {_type(o)} | {_flag(o)} | {variable} | {meaning(o)} |")
    reasons: dict[str, list[Option]] = {}
    for o in OPTIONS:
        if o.not_everywhere:
            reasons.setdefault(o.not_everywhere, []).append(o)
    notes = [""]
    for reason, group in reasons.items():
        names = ", ".join(f"`{o.name}`" if o.in_file else _flag(o) for o in group)
        notes.append(f"- {names}: {reason}.")
    return "\n".join(rows + notes)


def cli_table() -> str:
    """docs/CLI.md, `mount`: every flag."""
    rows = ["| option | meaning |", "|---|---|"]
    for o in OPTIONS:
        if not o.option_strings:
            continue
        value = "" if o.kind is Kind.BOOL else f" {o.metavar or o.name.upper()}"
        flags = ", ".join(f"`{s}`" for s in o.option_strings[:-1])
        last = f"`{o.option_strings[-1]}{value}`"
        rows.append(f"| {flags + ', ' if flags else ''}{last} | {meaning(o)} |")
    return "\n".join(rows)


def current(text: str, table: str, where: str) -> str:
    """*text* with its generated region replaced by *table*."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{where}: needs one line {BEGIN!r} and one line {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def documents(root: Path = DOCS) -> dict[Path, tuple[str, str]]:
    """path -> (text now, text it should have)."""
    out = {}
    for name, table in (("CONFIGURATION.md", configuration_table()), ("CLI.md", cli_table())):
        path = root / name
        text = path.read_text()
        out[path] = (text, current(text, table, str(path)))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m s3cryptfs.options_doc")
    parser.add_argument("--check", action="store_true", help="only say which are not current")
    check = parser.parse_args(argv).check
    stale = []
    for path, (text, wanted) in documents().items():
        if text != wanted:
            stale.append(path)
            if not check:
                path.write_text(wanted)
    for path in stale:  # a developer's tool: the list is its output
        print(f"{path}: {'not current' if check else 'rewritten'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
