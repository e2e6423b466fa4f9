"""docs/TROUBLESHOOTING.md and the messages the code can print agree, both ways. Pure: no servers.

How the messages are found (ast, over every s3cryptfs/**/*.py):

* every construction ``X(msg, ...)`` of a class of the s3cryptfs.errors hierarchy, wherever it
  stands (``raise X(...)``, ``return X(...)`` in a translate function, ``err = X(...)``), and
  every construction through a name that holds such a class (``kind = KeyNotFound if ...``,
  ``raise kind(...)``, ``raise type(exc)(...)``, a parameter ``exc=FormatError``). The message
  is the first argument; the named FsError kinds may have none (``NoSuchEntry()``: the errno's
  name is not a message).
* every ``raise f(<string>)`` whose callee the test cannot resolve (a factory, a variable).
* the format string of ``log.error/warning/exception/critical(...)``.
* what reaches stderr: ``print(..., file=sys.stderr)``, ``raise SystemExit("...")``, and the
  sinks in MESSAGE_SINKS (the mount daemon's child reports its error text to the parent).

How a message becomes a template: string parts are kept; f-string fields, %-conversions and
any expression the test cannot follow become a placeholder ``{...}``; adjacent literals, ``+``
concatenations and both branches of ``a if c else b`` are followed; a name assigned string
values in the same function (``where = f"KMIP server {host}:{port}"``), a call of a function
that returns only string literals (``reason = codec.refusal(meta)``), or an UPPER_CASE string
constant of the package, is replaced by its value(s).

How templates are compared (``normalize``): every ``{anything}`` counts the same, so the
document may name its placeholders as it likes; whitespace is collapsed; the CLI's prefix
``s3cryptfs: `` and one leading ``{...}: `` (the object key or S3 operation that many messages
carry in front, depending on the caller) are dropped.

What is not a message of its own (``classify``):

* wrappers: templates with a placeholder and fewer than MIN_LETTERS literal letters, such as
  ``{key}: {exc}``. They are skipped silently only when a placeholder is an exception caught in
  the same function (its message is extracted where it is raised); any other wrapper, for
  example a message built elsewhere and passed in a variable, fails the test unless it is
  listed in EXPLAINED_WRAPPERS with the reason;
* the progress and success lines on stderr listed in NOT_ERRORS.

The document declares a template with a line that starts with a dash, a space and a code span:
``- `template` `` (or ``- `` template `` `` when the template holds a backtick).
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from s3cryptfs import errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "s3cryptfs"
DOC = ROOT / "docs" / "TROUBLESHOOTING.md"

ERROR_CLASSES = {
    name
    for name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.S3CryptFSError)
}
FS_KINDS = {
    name
    for name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.FsError)
}
LOG_METHODS = {"error", "warning", "exception", "critical"}
LOGGERS = {"log", "logger", "logging"}
# Functions whose argument at this index is text shown to the user.
MESSAGE_SINKS = {
    # cli/mount.py, _daemonize: the child sends "CODE TEXT" through a pipe; the parent prints
    # "s3cryptfs: TEXT" on stderr.
    "_report": 2,
}

# A template with fewer literal letters than this (and at least one placeholder) is a wrapper
# that only adds a prefix, such as the object key: "{key}: {exc}", "{exc}". (Today every
# wrapper has none at all; the shortest real message, "{op} failed: {exc}", has 6.)
MIN_LETTERS = 5

# Wrappers are excluded without a word when a placeholder is the text of a caught exception
# (a name bound by ``except ... as NAME``): that message is extracted where it is raised.
# A wrapper around anything else must be explained here, by (file, function, template).
_NODE_ERROR = (
    "node.error holds the text of an earlier error, each extracted where it is made: "
    "codec.refusal() (vfs/core.py, _apply_metadata), "
    "a failed mpu_size (companion_size, vfs/listing.py) or an "
    "upload conflict (UploadConflict in upload/uploader.py)"
)
EXPLAINED_WRAPPERS: dict[tuple[str, str, str], str] = {
    ("cli/mount.py", "_daemonize", "{}"): (
        "the parent prints the text its child sent with _report()"
    ),
    ("offline.py", "cmd_get", "{} -> {}"): "get: success line (source -> target)",
    ("store/s3.py", "classify", "{}"): "botocore's own text for an error of no known kind",
    ("upload/uploader.py", "wait", "{}"): "re-raises the UploadConflict made in _divert()",
    ("store/helper.py", "_error_from", "{}"): "an error the helper raised, passed on",
    ("store/helper.py", "_fail_pending", "{}"): "'the upload helper exited' (run())",
    ("vfs/core.py", "_read", "{}"): _NODE_ERROR,
    ("vfs/core.py", "open", "{}"): _NODE_ERROR,
    ("vfs/core.py", "_materialize", "{}"): _NODE_ERROR,
    ("vfs/core.py", "fsync", "{}"): _NODE_ERROR,
}

# Calls whose value is the text of the exception they are given first: str(exc), and
# errors.strip_subject(exc, key), the same text without the object key in front.
EXCEPTION_TEXT = {"str", "strip_subject"}

# Lines printed on stderr that are progress or success, not errors.
NOT_ERRORS: dict[str, str] = {
    "checked {} objects...": "fsck progress on a terminal",
    "{} -> {} ({} bytes, encrypted)": "put: success line",
    "s3cryptfs {}": "mount.s3cryptfs -v/-f: echo of the command it runs",
}

_PCT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_FIELD = re.compile(r"\{[^{}]*\}")
_MAX_ALTERNATIVES = 16


# --- templates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hole:
    label: str
    caught: bool = False  # the text of an exception caught in the same function


Parts = tuple[str | Hole, ...]


def _join(parts: Parts) -> Parts:
    out: list[str | Hole] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif p != "":
            out.append(p)
    return tuple(out)


def render(parts: Parts, *, labels: bool = True) -> str:
    text = "".join(
        p if isinstance(p, str) else ("{" + p.label + "}" if labels else "{}") for p in parts
    )
    return " ".join(text.split()).removeprefix("s3cryptfs: ")


def normalize(template: str) -> str:
    """Compare key: placeholders anonymous, whitespace collapsed, without the CLI's prefix
    ``s3cryptfs: `` and without a leading ``{...}: `` (the object key or operation that many
    messages carry in front, or not, depending on the caller)."""
    text = " ".join(_FIELD.sub("{}", template).split())
    return text.removeprefix("s3cryptfs: ").removeprefix("{}: ")


def letters(parts: Parts) -> int:
    text = normalize(render(parts, labels=False)).replace("{}", "")
    return sum(c.isascii() and c.isalpha() for c in text)


@dataclass(frozen=True)
class Message:
    path: str  # relative to s3cryptfs/
    line: int
    function: str
    source: str  # "raise ConfigError", "log.warning", "stderr", ...
    parts: Parts

    @property
    def template(self) -> str:
        return render(self.parts)

    @property
    def key(self) -> str:
        return normalize(render(self.parts, labels=False))

    @property
    def where(self) -> str:
        return f"s3cryptfs/{self.path}:{self.line} ({self.source})"


# --- the extractor ----------------------------------------------------------------------------


def _package_constants() -> dict[str, str]:
    """UPPER_CASE = "string" at module level, anywhere in the package (unique names only)."""
    seen: dict[str, set[str]] = {}
    for tree in TREES.values():
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.isupper()
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                seen.setdefault(node.targets[0].id, set()).add(node.value.value)
    return {name: values.pop() for name, values in seen.items() if len(values) == 1}


class _Scope:
    """What the extractor knows about one function: caught names, string locals, class names."""

    def __init__(self, fn: ast.AST | None) -> None:
        self.caught: set[str] = set()
        self.strings: dict[str, list[ast.expr | None]] = {}
        self.classes: set[str] = set()
        if fn is None:
            return
        for node in _walk_own(fn):
            if isinstance(node, ast.ExceptHandler) and node.name:
                self.caught.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        self._bind(t.id, node.value)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            args = fn.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            for arg, default in [
                *zip(positional, defaults, strict=True),
                *zip(args.kwonlyargs, args.kw_defaults, strict=True),
            ]:
                holds_class = default is not None and _mentions_error_class(default)
                typed_class = arg.annotation is not None and "type[" in ast.unparse(arg.annotation)
                if holds_class or typed_class:
                    self.classes.add(arg.arg)

    def _bind(self, name: str, value: ast.expr) -> None:
        if _mentions_error_class(value) and not isinstance(value, ast.Call):
            self.classes.add(name)  # kind = KeyNotFound if missing else UnwrapFailed
        elif isinstance(value, ast.Call) and ast.unparse(value.func) == "type":
            self.classes.add(name)  # cls = type(exc)
        elif _is_stringy(value):
            self.strings.setdefault(name, []).append(value)
        else:
            self.strings.setdefault(name, []).append(None)  # not a string: a placeholder


def _walk_own(fn: ast.AST):
    """ast.walk without descending into nested functions or classes."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))


def _mentions_error_class(node: ast.expr) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id in ERROR_CLASSES)
        or (isinstance(n, ast.Attribute) and n.attr in ERROR_CLASSES)
        for n in ast.walk(node)
    )


def _callee(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            return node.func.id
        if isinstance(node.func, ast.Attribute):
            return node.func.attr
    return None


def _returns(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.expr | None]:
    return [n.value for n in _walk_own(fn) if isinstance(n, ast.Return)]


def _string_functions(trees: list[ast.Module]) -> dict[str, list[ast.FunctionDef]]:
    """Functions that return only string literals (or None), by name: their calls are followed,
    as in ``reason = codec.refusal(meta)``. A name that another function also bears is left
    alone."""
    by_name: dict[str, list[ast.FunctionDef]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                by_name.setdefault(node.name, []).append(node)  # type: ignore[arg-type]

    def literal(fn: ast.FunctionDef) -> bool:
        rets = _returns(fn)
        return all(
            isinstance(r, ast.Constant) and (r.value is None or isinstance(r.value, str))
            for r in rets
        ) and any(isinstance(r, ast.Constant) and isinstance(r.value, str) for r in rets)

    return {name: fns for name, fns in by_name.items() if all(literal(fn) for fn in fns)}


def _is_stringy(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.Call) and _callee(node) in STRING_FUNCTIONS:
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return _is_stringy(node.left)
    if isinstance(node, ast.IfExp):
        return _is_stringy(node.body) or _is_stringy(node.orelse)
    return False


TREES = {
    str(path.relative_to(PACKAGE)): ast.parse(path.read_text())
    for path in sorted(PACKAGE.rglob("*.py"))
}
STRING_FUNCTIONS = _string_functions(list(TREES.values()))


class Extractor:
    def __init__(self) -> None:
        self.constants = _package_constants()
        self.messages: list[Message] = []
        self.empty: list[str] = []  # error constructions without any message

    # expression -> alternative templates
    def alts(self, node: ast.expr | None, scope: _Scope, depth: int = 0) -> list[Parts]:
        if node is None:
            return [(Hole("?"),)]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [(node.value,)]
        if isinstance(node, ast.JoinedStr):
            pieces: list[list[Parts]] = []
            for v in node.values:
                if isinstance(v, ast.Constant):
                    pieces.append([(str(v.value),)])
                elif isinstance(v, ast.FormattedValue):
                    if v.conversion == -1 and v.format_spec is None:
                        pieces.append(self.alts(v.value, scope, depth + 1))
                    else:
                        conv = "!" + chr(v.conversion) if v.conversion != -1 else ""
                        pieces.append([(Hole(ast.unparse(v.value) + conv),)])
            return self._product(pieces)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._product(
                [self.alts(node.left, scope, depth + 1), self.alts(node.right, scope, depth + 1)]
            )
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mod)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
        ):
            args = node.right.elts if isinstance(node.right, ast.Tuple) else [node.right]
            return self.percent(node.left.value, args, scope, depth)
        if isinstance(node, ast.IfExp):
            return self._limit(
                self.alts(node.body, scope, depth + 1) + self.alts(node.orelse, scope, depth + 1)
            )
        if (
            isinstance(node, ast.BoolOp)
            and isinstance(node.op, ast.Or)
            and any(_is_stringy(v) for v in node.values)
        ):
            out: list[Parts] = []
            for v in node.values:
                out += self.alts(v, scope, depth + 1)
            return self._limit(out)
        if isinstance(node, ast.Name):
            if node.id in scope.caught:
                return [(Hole(node.id, caught=True),)]
            values = scope.strings.get(node.id)
            if values and depth < 4:
                out = []
                for v in values:
                    out += self.alts(v, scope, depth + 1) if v is not None else [(Hole(node.id),)]
                return self._limit(out, fallback=Hole(node.id))
            if node.id in self.constants:
                return [(self.constants[node.id],)]
            return [(Hole(node.id),)]
        name = _callee(node)
        if name in STRING_FUNCTIONS and depth < 4:
            out = []
            for fn in STRING_FUNCTIONS[name]:
                fn_scope = _Scope(fn)
                for r in _returns(fn):
                    if r is not None and not (isinstance(r, ast.Constant) and r.value is None):
                        out += self.alts(r, fn_scope, depth + 1)
            return self._limit(out, fallback=Hole(ast.unparse(node)))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in EXCEPTION_TEXT
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in scope.caught
        ):
            return [(Hole(node.args[0].id, caught=True),)]
        return [(Hole(ast.unparse(node)),)]

    def percent(self, fmt: str, args: list[ast.expr], scope: _Scope, depth: int = 0) -> list[Parts]:
        pieces: list[list[Parts]] = []
        pos = 0
        remaining = list(args)
        for m in _PCT.finditer(fmt):
            pieces.append([(fmt[pos : m.start()],)])
            pos = m.end()
            if m.group(1) == "%":
                pieces.append([("%",)])
                continue
            arg = remaining.pop(0) if remaining else None
            if arg is not None and m.group(0) in ("%s", "%d"):
                pieces.append(self.alts(arg, scope, depth + 1))
            else:
                label = ast.unparse(arg) if arg is not None else "?"
                pieces.append([(Hole(label),)])
        pieces.append([(fmt[pos:],)])
        return self._product(pieces)

    def _product(self, pieces: list[list[Parts]]) -> list[Parts]:
        combos = list(itertools.islice(itertools.product(*pieces), _MAX_ALTERNATIVES + 1))
        if len(combos) > _MAX_ALTERNATIVES:
            # Too many combinations: keep the literal text, turn the variable parts into holes.
            simple = [p[0] if len(p) == 1 else (Hole("..."),) for p in pieces]
            combos = [tuple(simple)]
        return [_join(tuple(itertools.chain.from_iterable(c))) for c in combos]

    def _limit(self, out: list[Parts], fallback: Hole | None = None) -> list[Parts]:
        out = list(dict.fromkeys(out))
        if len(out) > _MAX_ALTERNATIVES:
            return [(fallback or Hole("..."),)]
        return out

    # sites
    def add(self, path: str, node: ast.AST, fn: str, source: str, parts_list: list[Parts]):
        for parts in parts_list:
            self.messages.append(Message(path, node.lineno, fn, source, parts))

    def visit_module(self, rel: str, tree: ast.Module) -> None:
        self._visit(rel, tree, _Scope(None), "<module>", set())

    def _visit(self, rel: str, node: ast.AST, scope: _Scope, fn: str, seen: set[int]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = _Scope(child)
                # names of the enclosing function stay visible (closures)
                inner.caught |= scope.caught
                for k, v in scope.strings.items():
                    inner.strings.setdefault(k, v)
                inner.classes |= scope.classes
                self._visit(rel, child, inner, child.name, seen)
                continue
            if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                self._raise(rel, child.exc, scope, fn)
                seen.add(id(child.exc))
            if isinstance(child, ast.Call) and id(child) not in seen:
                self._call(rel, child, scope, fn)
            self._visit(rel, child, scope, fn, seen)

    def _error_class(self, func: ast.expr, scope: _Scope) -> str | None:
        if isinstance(func, ast.Name) and func.id in ERROR_CLASSES:
            return func.id
        if isinstance(func, ast.Attribute) and func.attr in ERROR_CLASSES:
            return func.attr
        if isinstance(func, ast.Name) and func.id in scope.classes:
            return func.id
        if isinstance(func, ast.Call) and ast.unparse(func.func) == "type":
            return ast.unparse(func)
        return None

    def _construction(self, rel: str, call: ast.Call, scope: _Scope, fn: str, cls: str) -> None:
        if cls in FS_KINDS:
            msg = call.args[0] if call.args else None
            msg = next((k.value for k in call.keywords if k.arg == "message"), msg)
            if msg is None:
                return  # the errno's name, e.g. "ENOTEMPTY": not a message
        else:
            msg = call.args[0] if call.args else None
            if msg is None:
                self.empty.append(f"s3cryptfs/{rel}:{call.lineno} {cls}() has no message")
                return
        self.add(rel, call, fn, f"raise {cls}", self.alts(msg, scope))

    def _raise(self, rel: str, call: ast.Call, scope: _Scope, fn: str) -> None:
        cls = self._error_class(call.func, scope)
        if cls is not None:
            self._construction(rel, call, scope, fn, cls)
            return
        name = ast.unparse(call.func)
        if name == "SystemExit":
            if call.args and _is_stringy(call.args[0]):
                self.add(rel, call, fn, "stderr (SystemExit)", self.alts(call.args[0], scope))
            return
        if hasattr(builtins, name) or (
            isinstance(call.func, ast.Attribute) and call.func.attr[:1].isupper()
        ):
            return  # ValueError, pyfuse3.FUSEError...: not ours
        if call.args and _is_stringy(call.args[0]):
            self.add(rel, call, fn, f"raise {name}", self.alts(call.args[0], scope))

    def _call(self, rel: str, call: ast.Call, scope: _Scope, fn: str) -> None:
        cls = self._error_class(call.func, scope)
        if cls is not None and not (
            isinstance(call.func, ast.Call) and not call.args  # type(exc) alone
        ):
            self._construction(rel, call, scope, fn, cls)
            return
        func = call.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in LOG_METHODS
            and isinstance(func.value, ast.Name)
            and func.value.id in LOGGERS
            and call.args
        ):
            fmt = call.args[0]
            if isinstance(fmt, ast.Constant) and isinstance(fmt.value, str):
                alts = self.percent(fmt.value, call.args[1:], scope)
            else:
                alts = self.alts(fmt, scope)
            self.add(rel, call, fn, f"log.{func.attr}", alts)
            return
        if isinstance(func, ast.Name) and func.id == "print" and call.args:
            stream = next((ast.unparse(k.value) for k in call.keywords if k.arg == "file"), "")
            if stream == "sys.stderr":
                self.add(rel, call, fn, "stderr", self.alts(call.args[0], scope))
            return
        if isinstance(func, ast.Name) and func.id in MESSAGE_SINKS:
            i = MESSAGE_SINKS[func.id]
            if len(call.args) > i:
                self.add(rel, call, fn, f"{func.id}()", self.alts(call.args[i], scope))


@functools.cache
def extract() -> Extractor:
    ex = Extractor()
    for rel, tree in TREES.items():
        ex.visit_module(rel, tree)
    return ex


def classify(ex: Extractor) -> tuple[dict[str, list[Message]], list[Message], list[str]]:
    """(documented templates by key, silently excluded wrappers, unexplained wrapper sites)."""
    wanted: dict[str, list[Message]] = {}
    excluded: list[Message] = []
    unexplained: list[str] = []
    for m in ex.messages:
        key = m.key
        if not key or key in NOT_ERRORS:
            continue
        holes = [p for p in m.parts if isinstance(p, Hole)]
        if holes and letters(m.parts) < MIN_LETTERS:
            if any(h.caught for h in holes):
                excluded.append(m)
            elif (m.path, m.function, key) not in EXPLAINED_WRAPPERS:
                unexplained.append(
                    f"{m.where}: `{m.template}` in {m.function}() -- its text comes from "
                    "something the test cannot follow; resolve it in the extractor or add "
                    "it to EXPLAINED_WRAPPERS"
                )
            continue
        wanted.setdefault(key, []).append(m)
    return wanted, excluded, unexplained


# --- the document ------------------------------------------------------------------------------

_DOC_ENTRY = re.compile(r"^- (`+)(.+?)\1(?!`)")


def doc_templates(text: str) -> list[tuple[int, str]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _DOC_ENTRY.match(line)
        if m:
            body = m.group(2)
            if len(m.group(1)) > 1 and body.startswith(" ") and body.endswith(" "):
                body = body[1:-1]
            out.append((lineno, body))
    return out


# --- the tests -------------------------------------------------------------------------------


def test_the_extractor_finds_known_messages():
    """Guards the extractor itself: one message of each kind it must see."""
    keys = {m.key for m in extract().messages}
    for expected in (
        "{mountpoint} is not mounted",  # raise ConfigError(f"...")
        "{op}: the bucket does not exist",  # return BucketNotFound(...) in a translate function
        "KMIP server {host}:{port} did not answer in time",  # a local `where` substituted
        "gateway: {what} is not valid base64",  # raise exc(...), exc a parameter
        "vault refused {what}: {detail}",  # raise bad_request(...), a parameter with a default
        "{key}: not encrypted (this volume does not allow plaintext objects)",  # via refusal()
        "upload of {key} failed (attempt {n}, retrying in {s}s; the data is kept): {error}",
        "the mount process died before the mount was ready",  # print(..., file=sys.stderr)
        "mount.s3cryptfs: option {name} needs a value ({name}=...)",  # raise SystemExit(...)
        "mount failed: {error}",  # MESSAGE_SINKS
        "no password: use --password-file FILE, set S3CRYPTFS_PASSWORD, or run on a terminal",
    ):
        assert normalize(expected) in keys, expected


def test_the_extractor_follows_variables_and_wrappers():
    """The patterns by which a message could escape, on a small sample of code."""
    source = """
def f(exc_kind=ConfigError, name=""):
    where = f"server {name}"
    kind = KeyNotFound if name else UnwrapFailed
    try:
        pass
    except KeyError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    msg = "first reason" if name else f"second reason for {name}"
    raise ConfigError(msg)
    raise kind(f"{where} did not answer")
    raise exc_kind("bad %s value" % name)
    log.warning("could not %s the %s", "open", name)
    return AccessDenied("a " + name + " was refused")
"""
    ex = Extractor()
    ex.visit_module("sample.py", ast.parse(source))
    got = {m.key for m in ex.messages}
    assert got == {
        "{}",  # the re-raise with the object's name in front: a caught-exception wrapper
        "first reason",
        "second reason for {}",
        "server {} did not answer",
        "bad {} value",
        "could not open the {}",
        "a {} was refused",
    }
    wanted, excluded, unexplained = classify(ex)
    assert [m.template for m in excluded] == ["{name}: {exc}"]
    assert not unexplained


def test_no_error_is_raised_without_a_message():
    assert extract().empty == []


def test_every_variable_message_is_followed_or_explained():
    _, _, unexplained = classify(extract())
    assert not unexplained, "\n".join(unexplained)


def test_every_message_of_the_code_is_in_the_document():
    wanted, _, _ = classify(extract())
    documented = {normalize(t) for _, t in doc_templates(DOC.read_text())}
    missing = sorted(set(wanted) - documented)
    lines = []
    for key in missing:
        sites = wanted[key]
        lines.append(f"- `{sites[0].template}`")
        lines += [f"      {m.where}" for m in sites]
    assert not missing, (
        f"{len(missing)} message(s) the code can print are not in docs/TROUBLESHOOTING.md "
        "(add them as '- `template`' lines):\n" + "\n".join(lines)
    )


def test_every_message_of_the_document_is_in_the_code():
    wanted, _, _ = classify(extract())
    extra = [
        f"docs/TROUBLESHOOTING.md:{lineno}: `{t}`"
        for lineno, t in doc_templates(DOC.read_text())
        if normalize(t) not in wanted
    ]
    assert not extra, (
        f"{len(extra)} template(s) in the document match no message the code prints "
        "(reworded or removed?):\n" + "\n".join(extra)
    )


def test_the_document_lists_each_message_once():
    entries = doc_templates(DOC.read_text())
    seen: dict[str, int] = {}
    dup = []
    for lineno, t in entries:
        key = normalize(t)
        if key in seen:
            dup.append(f"line {lineno} repeats line {seen[key]}: `{t}`")
        seen.setdefault(key, lineno)
    assert not dup, "\n".join(dup)
