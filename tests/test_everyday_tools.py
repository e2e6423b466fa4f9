"""Everyday tools (issue 18): each action runs in a local directory (tmp_path, a local disk) and
in the mount, the observable results are compared, then the volume is remounted and compared
again. Differences that remain by design are asserted as such and listed in docs/SEMANTICS.md.

All tests share one mounted volume (init and mount cost seconds each); every test works in its
own directory of the mount, and the mount log is checked per test.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, Volume, s3_environment, unique_bucket_name

TIMEOUT = 120
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    # Fixed dates make the commits of both sides byte-identical, so their hashes compare.
    "GIT_AUTHOR_DATE": "2020-01-02T03:04:05Z",
    "GIT_COMMITTER_DATE": "2020-01-02T03:04:05Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def shared_volume(_state_dir, seaweed, tmp_path_factory):
    work = tmp_path_factory.mktemp("everyday")
    password = work / "password"
    fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(PASSWORD)
    vol = Volume(
        bucket=seaweed.make_bucket(unique_bucket_name()),
        prefix="vol/",
        endpoint_url=seaweed.endpoint_url,
        password_file=password,
        env=s3_environment(seaweed),
        workdir=work,
    )
    vol.init()
    vol.mount()
    yield vol
    vol.cleanup()
    seaweed.drop_bucket(vol.bucket)


@pytest.fixture
def vol(shared_volume, request):
    """The shared volume, mounted; fails the test if its mount logged an ERROR line during the
    test that the test did not declare (as conftest's make_volume does per volume)."""
    if not shared_volume.is_mounted():
        shared_volume.mount()
    before = set(shared_volume.unexpected_log_errors([]))
    yield shared_volume
    declared = [
        re.compile(pattern)
        for marker in request.node.iter_markers("expect_log_errors")
        for pattern in marker.args
    ]
    new = [line for line in shared_volume.unexpected_log_errors(declared) if line not in before]
    if new:
        pytest.fail("the mount logged undeclared errors:\n" + "\n".join(new[:20]), pytrace=False)


@pytest.fixture
def sides(vol, tmp_path, request) -> tuple[Path, Path]:
    """(local directory on the local disk, directory in the mount) for this test."""
    local = tmp_path / "local"
    local.mkdir()
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "_")
    mnt = vol.mountpoint / name
    mnt.mkdir()
    return local, mnt


# --------------------------------------------------------------------------------------------
# Helpers


def run(*args, cwd=None, env=None, input=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(map(str, args)),
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        input=input,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def ok(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = run(*args, **kwargs)
    assert proc.returncode == 0, f"{proc.args} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path, *, mtimes: bool = True, skip: tuple[str, ...] = ()) -> dict:
    """Every entry below `root`: type, permission bits, content hash or link target, and (with
    mtimes) the mtime in nanoseconds, for directories and symlinks too."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in dirnames + sorted(filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entry: tuple = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entry = ("dir", oct(stat.S_IMODE(st.st_mode)))
            else:
                entry = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_size, sha(path))
            if mtimes:
                entry += (st.st_mtime_ns,)
            found[str(path.relative_to(root))] = entry
    return found


def diff(a: dict, b: dict) -> list[str]:
    """Readable differences between two snapshots (empty when equal)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)} != {b.get(key)}")
    return out


BASE_NS = 1_600_000_000_123_456_789


def make_tree(root: Path, *, hardlinks: bool = False) -> Path:
    """About 50 files in nested directories: several modes and sizes, an empty file and an empty
    directory, names with spaces and non-ASCII letters, relative, absolute-free and dangling
    symlinks, and fixed mtimes with a nanosecond part (directories last, bottom-up)."""
    root.mkdir()
    (root / "empty dir").mkdir()
    for d in range(5):
        sub = root / f"sub{d}" / "deeper"
        sub.mkdir(parents=True)
        for i in range(4):
            (sub.parent / f"file{i}.txt").write_text(f"dir {d} file {i}\n" * (i * 37 + 1))
            (sub / f"n{i}.c").write_text(f"int f{d}_{i}(void) {{ return {i}; }}\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "big.bin").write_bytes(hashlib.sha256(b"x").digest() * 4000)
    (root / "name with spaces.txt").write_text("spaces\n")
    (root / "café ünïcode.txt").write_text("unicode\n")
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)
    (root / "secret").write_text("secret\n")
    (root / "secret").chmod(0o600)
    (root / "readonly").write_text("ro\n")
    (root / "readonly").chmod(0o444)
    (root / "sub0" / "deeper").chmod(0o750)
    os.symlink("sub1/file2.txt", root / "link-to-file")
    os.symlink("sub2", root / "link-to-dir")
    os.symlink("does/not/exist", root / "dangling")
    if hardlinks:
        (root / "linked-a").write_text("one inode, two names\n")
        os.link(root / "linked-a", root / "linked-b")
    entries = sorted((p for p in root.rglob("*")), key=lambda p: len(p.parts), reverse=True) + [
        root
    ]
    for n, path in enumerate(entries):
        ns = BASE_NS + n * 1_000_000_007
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    return root


def whole_seconds(snap: dict) -> dict:
    """The snapshot with mtimes cut to whole seconds (what a GNU tar archive keeps)."""
    return {k: (*v[:-1], v[-1] // 10**9 * 10**9) for k, v in snap.items()}


def without_link_mtimes(snap: dict) -> dict:
    return {k: v[:-1] if v[0] == "link" else v for k, v in snap.items()}


def remount_and_compare(vol: Volume, root: Path, before: dict, **kwargs) -> None:
    vol.remount()
    after = snapshot(root, **kwargs)
    assert not diff(before, after), "changed across the remount:\n" + "\n".join(diff(before, after))


def assert_same(local: dict, mounted: dict) -> None:
    assert not diff(local, mounted), "local != mount:\n" + "\n".join(diff(local, mounted))


# --------------------------------------------------------------------------------------------
# Editors and in-place rewriters


# 'backupskip' names /tmp/* by default, and without a backup vim always writes in place.
VIM = ["vim", "-Nu", "NONE", "-n", "-es", "-c", "set backupskip="]
VIM_SAVES = {
    "default": [],
    "rename": ["-c", "set backupcopy=no"],
    "copy": ["-c", "set backupcopy=yes"],
}


def test_vim(vol, sides):
    for base in sides:
        for name, opts in VIM_SAVES.items():
            path = base / f"{name}.txt"
            path.write_text("banana\nalpha\ngamma\n")
            path.chmod(0o640)
            ok(*VIM, *opts, "-c", "%s/a/b/g", "-c", "wq", path)
            assert path.read_text() == "bbnbnb\nblphb\ngbmmb\n"
    local, mnt = (snapshot(base, mtimes=False) for base in sides)
    assert_same(local, mnt)
    remount_and_compare(vol, sides[1], mnt, mtimes=False)


def test_sed_and_perl_in_place(vol, sides):
    for base in sides:
        for name in ("sed", "sed-backup", "perl", "perl-backup"):
            (base / name).write_text("one apple\ntwo apples\n")
            (base / name).chmod(0o600)
        ok("sed", "-i", "s/apple/pear/", "sed", cwd=base)
        ok("sed", "-i.orig", "s/apple/pear/g", "sed-backup", cwd=base)
        ok("perl", "-pi", "-e", "s/one/1/", "perl", cwd=base)
        ok("perl", "-pi.bak", "-e", "s/two/2/", "perl-backup", cwd=base)
        assert (base / "sed").read_text() == "one pear\ntwo pears\n"
        assert (base / "perl-backup.bak").read_text() == "one apple\ntwo apples\n"
    local, mnt = (snapshot(base, mtimes=False) for base in sides)
    assert_same(local, mnt)
    remount_and_compare(vol, sides[1], mnt, mtimes=False)


REPLACERS = {
    "sed -i": ["sed", "-i", "s/^old/new/"],
    "perl -pi": ["perl", "-pi", "-e", "s/^old/new/"],
    "vim rename save": [*VIM, "-c", "set backupcopy=no"] + ["-c", "%s/^old/new/", "-c", "wq"],
}


@pytest.mark.parametrize("tool", [*REPLACERS, "rsync -I"])
def test_replace_while_a_reader_holds_the_file(vol, sides, tmp_path, tool):
    """A process that opened the file before the tool replaced it (rename over it) goes on
    reading the old content to its end, as on a local disk; a new open sees the new content."""
    old = b"".join(b"old line %07d\n" % i for i in range(80_000))  # 1.3 MB: more than readahead
    new = old.replace(b"old", b"new")
    replacement = tmp_path / "replacement"
    replacement.write_bytes(new)
    for base in sides:
        path = base / "file"
        path.write_bytes(old)
        with open(path, "rb") as reader:
            head = reader.read(4096)
            if tool == "rsync -I":
                ok("rsync", "-I", replacement, path)
            else:
                ok(*REPLACERS[tool], path)
            if base == sides[1]:
                # Time for the mount to upload the old version and drop its write-back copy, so
                # that the rest is read from S3 (sed, perl and vim read the whole file first,
                # which leaves it in the read cache; rsync -I does not read it).
                time.sleep(1.5)
            rest = reader.read()
        assert head + rest == old, f"{base}: the reader did not see the old content"
        assert path.read_bytes() == new
    assert sorted(os.listdir(sides[0])) == sorted(os.listdir(sides[1])) == ["file"]


# --------------------------------------------------------------------------------------------
# Copies and archives


def test_cp_a(vol, sides, tmp_path):
    src = make_tree(tmp_path / "src")
    want = snapshot(src)
    for base in sides:
        ok("cp", "-a", src, base / "tree")
    local, mnt = (snapshot(base / "tree") for base in sides)
    assert_same(want, local)
    assert_same(local, mnt)
    remount_and_compare(vol, sides[1] / "tree", mnt)
    ok("cp", "-a", sides[1] / "tree", tmp_path / "back")
    assert_same(want, snapshot(tmp_path / "back"))


def test_rsync_a_then_inplace(vol, sides, tmp_path):
    src = make_tree(tmp_path / "src")
    for base in sides:
        ok("rsync", "-a", f"{src}/", f"{base / 'tree'}/")
    assert_same(snapshot(src), snapshot(sides[1] / "tree"))
    # A change of the same size whose mtime moves: rsync must notice it and rewrite in place.
    (src / "sub3" / "file1.txt").write_text((src / "sub3" / "file1.txt").read_text().upper())
    os.utime(src / "sub3" / "file1.txt", ns=(BASE_NS + 5, BASE_NS + 5))
    for base in sides:
        ok("rsync", "-a", "--inplace", f"{src}/", f"{base / 'tree'}/")
    local, mnt = (snapshot(base / "tree") for base in sides)
    assert_same(snapshot(src), local)
    assert_same(local, mnt)
    remount_and_compare(vol, sides[1] / "tree", mnt)
    # Nothing is out of date after the remount: rsync itemizes no change (dir mtimes included).
    itemized = ok("rsync", "-ai", f"{src}/", f"{sides[1] / 'tree'}/").stdout
    assert itemized == ""


def test_rsync_aX_keeps_user_xattrs(vol, sides, tmp_path):
    src = make_tree(tmp_path / "src")
    os.setxattr(src / "secret", "user.comment", b"kept by rsync -X")
    os.setxattr(src / "sub1", "user.origin", b"a directory")
    for base in sides:
        ok("rsync", "-aX", f"{src}/", f"{base / 'tree'}/")

    def xattrs(root: Path) -> dict:
        return {
            rel: {name: os.getxattr(root / rel, name) for name in sorted(os.listxattr(root / rel))}
            for rel in ("secret", "sub1", "big.bin")
        }

    local, mnt = (xattrs(base / "tree") for base in sides)
    assert local == mnt
    vol.remount()
    assert xattrs(sides[1] / "tree") == local


def test_hardlinks_are_refused(vol, sides, tmp_path):
    """Hard links: EPERM (docs/SEMANTICS.md). cp -a, rsync -aH and tar x of a tree with a hard
    link exit non-zero, naming the refused link; every other file arrives intact."""
    src = make_tree(tmp_path / "src", hardlinks=True)
    ok("tar", "cf", tmp_path / "src.tar", "-C", src, ".")
    commands = {
        "cp": lambda dst: run("cp", "-a", src, dst),
        "rsync": lambda dst: run("rsync", "-aH", f"{src}/", f"{dst}/"),
        "tar": lambda dst: (dst.mkdir(), run("tar", "xf", tmp_path / "src.tar", "-C", dst))[1],
    }
    want = snapshot(src)
    linked = {"linked-a", "linked-b"}
    for tool, command in commands.items():
        proc = command(sides[0] / tool)
        assert proc.returncode == 0, proc.stderr
        assert os.stat(sides[0] / tool / "linked-a").st_nlink == 2
        proc = command(sides[1] / tool)
        assert proc.returncode == {"cp": 1, "rsync": 23, "tar": 2}[tool], proc
        assert "Operation not permitted" in proc.stderr, proc.stderr
    vol.remount()
    for tool in commands:
        got = snapshot(sides[1] / tool)
        if tool == "tar":
            want, got = whole_seconds(want), whole_seconds(got)
        others = {k: v for k, v in want.items() if k not in linked}
        # tar restores the directory mtimes after its last entry; the refused link is the last.
        assert_same(others, {k: v for k, v in got.items() if k not in linked})
        present = linked & set(got)
        assert len(present) == 1, f"{tool}: {present}"
        assert (sides[1] / tool / present.pop()).read_text() == "one inode, two names\n"


def test_tar(vol, sides, tmp_path):
    src = make_tree(tmp_path / "src")
    for base in sides:
        ok("tar", "cf", "tree.tar", "-C", src, ".", cwd=base)
        (base / "x").mkdir()
        ok("tar", "xf", "tree.tar", "-C", "x", cwd=base)
    assert sha(sides[0] / "tree.tar") == sha(sides[1] / "tree.tar")
    # The archive (GNU format) keeps whole seconds: both extractions have the same ones.
    local, mnt = (snapshot(base / "x") for base in sides)
    assert_same(local, mnt)
    # An archive made from the mount lists the same entries, modes, owners, sizes and mtimes.
    listings = [
        sorted(ok("sh", "-c", "tar cf - -C x . | tar tvf -", cwd=base).stdout.splitlines())
        for base in sides
    ]
    assert listings[0] == listings[1]
    remount_and_compare(vol, sides[1] / "x", mnt)
    assert ok("tar", "df", "tree.tar", "-C", "x", cwd=sides[1]).stdout == ""


def test_zip(vol, sides, tmp_path):
    src = make_tree(tmp_path / "src")
    for base in sides:
        ok("cp", "-a", src, base / "tree")
        ok("zip", "-qryX", "tree.zip", "tree", cwd=base)
        (base / "tree" / "sub4" / "file3.txt").write_text("updated\n")
        newer = BASE_NS + 3600 * 10**9
        os.utime(base / "tree" / "sub4" / "file3.txt", ns=(newer, newer))
        # -u rewrites the archive through a temporary file renamed over it.
        ok("zip", "-qruyX", "tree.zip", "tree", cwd=base)
        ok("unzip", "-q", "tree.zip", "-d", "x", cwd=base)
        ok("unzip", "-tq", "tree.zip", cwd=base)

    def listing(base: Path) -> list[str]:
        return sorted(ok("unzip", "-Z", "-l", "tree.zip", cwd=base).stdout.splitlines()[2:-1])

    assert listing(sides[0]) == listing(sides[1])
    # unzip leaves the time of creation on the symlinks it makes.
    local, mnt = (without_link_mtimes(snapshot(base / "x")) for base in sides)
    assert_same(local, mnt)
    vol.remount()
    assert_same(mnt, without_link_mtimes(snapshot(sides[1] / "x")))
    assert listing(sides[1]) == listing(sides[0])


# --------------------------------------------------------------------------------------------
# Development tools


def test_git_clone_commit_gc_fsck(vol, sides, tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    ok("git", "init", "-q", "-b", "main", cwd=origin, env=GIT_ENV)
    for i in range(5):
        (origin / f"file{i}.txt").write_text(f"version {i}\n" * 50)
        (origin / "sub").mkdir(exist_ok=True)
        (origin / "sub" / "x.sh").write_text(f"echo {i}\n")
        (origin / "sub" / "x.sh").chmod(0o755)
        ok("git", "add", "-A", cwd=origin, env=GIT_ENV)
        ok("git", "commit", "-q", "-m", f"commit {i}", cwd=origin, env=GIT_ENV)
    heads = []
    for base in sides:
        ok("git", "clone", "-q", origin, "clone", cwd=base, env=GIT_ENV)
        repo = base / "clone"
        (repo / "file0.txt").write_text("changed in the clone\n")
        (repo / "new.txt").write_text("new\n")
        ok("git", "add", "-A", cwd=repo, env=GIT_ENV)
        ok("git", "commit", "-q", "-m", "in the clone", cwd=repo, env=GIT_ENV)
        ok("git", "gc", "-q", "--prune=now", cwd=repo, env=GIT_ENV)
        ok("git", "fsck", "--full", "--strict", "--no-progress", cwd=repo, env=GIT_ENV)
        assert ok("git", "status", "--porcelain", cwd=repo, env=GIT_ENV).stdout == ""
        heads.append(ok("git", "rev-parse", "HEAD", cwd=repo, env=GIT_ENV).stdout)
    assert heads[0] == heads[1]
    local, mnt = (snapshot(base / "clone", mtimes=False, skip=(".git",)) for base in sides)
    assert_same(local, mnt)
    repo = sides[1] / "clone"
    vol.remount()
    ok("git", "fsck", "--full", "--strict", "--no-progress", cwd=repo, env=GIT_ENV)
    assert ok("git", "status", "--porcelain", cwd=repo, env=GIT_ENV).stdout == ""
    assert ok("git", "rev-parse", "HEAD", cwd=repo, env=GIT_ENV).stdout == heads[0]
    assert ok("git", "log", "--oneline", cwd=repo, env=GIT_ENV).stdout.count("\n") == 6


MAKEFILE = """\
out/all.txt: out/a.up out/b.up
\tcat out/a.up out/b.up > $@
out/%.up: %.c | out
\ttr a-z A-Z < $< > $@
out:
\tmkdir -p out
"""


def test_make_rebuilds_only_what_is_out_of_date(vol, sides):
    outputs = []
    for base in sides:
        (base / "Makefile").write_text(MAKEFILE)
        (base / "a.c").write_text("int a;\n")
        (base / "b.c").write_text("int b;\n")
        past = time.time_ns() - 3600 * 10**9
        for name in ("Makefile", "a.c", "b.c"):
            os.utime(base / name, ns=(past, past))
        first = ok("make", cwd=base).stdout
        second = ok("make", cwd=base).stdout
        # A source newer than everything built: only its output and the final file are redone.
        future = time.time_ns() + 60 * 10**9
        os.utime(base / "a.c", ns=(future, future))
        third = ok("make", cwd=base).stdout
        os.utime(base / "a.c", ns=(past, past))
        outputs.append((first, second, third))
        assert "is up to date" in second
        assert third.splitlines() == [
            "tr a-z A-Z < a.c > out/a.up",
            "cat out/a.up out/b.up > out/all.txt",
        ]
        assert (base / "out" / "all.txt").read_text() == "INT A;\nINT B;\n"
    assert outputs[0] == outputs[1]
    vol.remount()
    # The mtimes survived: nothing is out of date.
    assert run("make", "-q", cwd=sides[1]).returncode == 0
    assert "is up to date" in ok("make", cwd=sides[1]).stdout


SQL_FILL = "".join(
    "BEGIN;\n"
    + "".join(
        f"INSERT INTO t (k, v) VALUES ({t * 20 + i}, 'row {t * 20 + i} ' || hex(randomblob(40)));\n"
        for i in range(20)
    )
    + "COMMIT;\n"
    for t in range(15)
)


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite3(vol, sides, mode):
    check = "PRAGMA integrity_check; SELECT count(*), sum(k) FROM t; PRAGMA journal_mode;"
    for base in sides:
        script = (
            f"PRAGMA journal_mode={mode};\n"
            "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT);\n"
            f"{SQL_FILL}"
            "UPDATE t SET v = 'even' WHERE k % 2 = 0;\n"
            "DELETE FROM t WHERE k % 3 = 0;\n"
        )
        ok("sqlite3", "db", cwd=base, input=script)
        out = ok("sqlite3", "db", check, cwd=base).stdout.split()
        assert out == ["ok", "200|30000", mode], out
    assert sorted(os.listdir(sides[0])) == sorted(os.listdir(sides[1])) == ["db"]
    vol.remount()
    assert ok("sqlite3", "db", check, cwd=sides[1]).stdout.split() == ["ok", "200|30000", mode]
    ok("sqlite3", "db", "INSERT INTO t (k, v) VALUES (1000, 'after');", cwd=sides[1])
    assert ok("sqlite3", "db", "SELECT v FROM t WHERE k = 1000;", cwd=sides[1]).stdout == "after\n"


def test_python_venv(vol, sides):
    """`python -m venv` in the mount makes a working venv. Without pip: with it, ensurepip
    writes some 1000 files, which took 86 s in the mount against 9 s on the local disk, too
    slow for this module (each file's close seals it into the journal)."""
    seconds = []
    for base in sides:
        start = time.monotonic()
        ok(sys.executable, "-m", "venv", "--without-pip", base / "venv")
        seconds.append(time.monotonic() - start)
        py = base / "venv" / "bin" / "python"
        out = ok(py, "-c", "import sys; print(sys.prefix)").stdout
        assert out == f"{base / 'venv'}\n"
    print(f"python -m venv --without-pip: local {seconds[0]:.2f} s, mount {seconds[1]:.2f} s")
    # The activation scripts and pyvenv.cfg name the venv's own path: compare names and modes.
    local, mnt = (snapshot(base / "venv", mtimes=False) for base in sides)
    assert_same({k: v[:2] for k, v in local.items()}, {k: v[:2] for k, v in mnt.items()})
    remount_and_compare(vol, sides[1] / "venv", mnt, mtimes=False)
    ok(sides[1] / "venv" / "bin" / "python", "-c", "import sys, json, sqlite3")


# --------------------------------------------------------------------------------------------
# Watching, locking, mapping


def read_lines(proc: subprocess.Popen, count: int, timeout: float = 15.0) -> list[str]:
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while len(lines) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines += [line.decode() for line in done]
    return lines


def test_tail_f_sees_appends_by_another_process(vol, sides):
    for base in sides:
        log = base / "app.log"
        log.write_text("first\n")
        tail = subprocess.Popen(["tail", "-f", "-n", "+1", str(log)], stdout=subprocess.PIPE)
        try:
            assert read_lines(tail, 1) == ["first"]
            for word in ("second", "third"):
                ok("sh", "-c", f"echo {word} >> app.log", cwd=base)
            assert read_lines(tail, 2) == ["second", "third"], base
        finally:
            tail.kill()
            tail.wait()
    assert (sides[1] / "app.log").read_text() == (sides[0] / "app.log").read_text()


HOLD_FCNTL = """
import fcntl, sys, time
f = open(sys.argv[1], "r+")
fcntl.lockf(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""

TRY_FCNTL = """
import fcntl, sys
f = open(sys.argv[1], "r+")
try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError as e:
    sys.exit(e.errno)
"""


def test_flock_and_fcntl_locks_between_processes(vol, sides):
    holders = {
        # -o: the lock belongs to flock itself, so killing it releases the lock.
        "flock": lambda path: ["flock", "-o", path, "sh", "-c", "echo locked; exec sleep 60"],
        "fcntl": lambda path: [sys.executable, "-c", HOLD_FCNTL, path],
    }
    tries = {
        "flock": lambda path: run("flock", "-n", path, "true").returncode,
        "fcntl": lambda path: run(sys.executable, "-c", TRY_FCNTL, path).returncode,
    }
    results = []
    for base in sides:
        for kind, holder in holders.items():
            path = str(base / f"{kind}.lock")
            Path(path).write_text("")
            proc = subprocess.Popen(holder(path), stdout=subprocess.PIPE, process_group=0)
            try:
                assert read_lines(proc, 1) == ["locked"]
                while_held = tries[kind](path)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            after = tries[kind](path)
            results.append((kind, while_held, after))
    # flock -n exits 1; lockf fails with EAGAIN (or EACCES) while held; both succeed after.
    assert results[:2] == results[2:]
    assert [r[0] for r in results[:2]] == ["flock", "fcntl"]
    assert results[0][1:] == (1, 0)
    assert results[1][1] in (11, 13) and results[1][2] == 0


def test_mmap_write_flush_read_back(vol, sides):
    import mmap

    size = 256 * 1024
    for base in sides:
        path = base / "mapped"
        path.write_bytes(b"\0" * size)
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
            for offset in range(0, size, 5000):
                m[offset : offset + 11] = b"hello mmap\n"
            m.flush()
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[5000:5011] == b"hello mmap\n"
    assert sha(sides[0] / "mapped") == sha(sides[1] / "mapped")
    vol.remount()
    assert sha(sides[0] / "mapped") == sha(sides[1] / "mapped")


# --------------------------------------------------------------------------------------------
# Metadata tools


def test_touch_chmod_find_du(vol, sides, tmp_path):
    src = make_tree(tmp_path / "src")
    for base in sides:
        ok("cp", "-a", src, base / "tree")
        ok("touch", "new-empty", cwd=base)
        ok("touch", "-d", "2001-02-03 04:05:06.123456789", "tree/secret", cwd=base)
        ok("touch", "-m", "-d", "@1000000000.5", "tree/empty.txt", cwd=base)
        ok("touch", "-r", "tree/secret", "tree/readonly", cwd=base)
        ok("touch", "-h", "-d", "@1234567890", "tree/dangling", cwd=base)
        ok("chmod", "-R", "go-rwx,u+w", "tree/sub1", cwd=base)
        ok("chmod", "-R", "a+rX", "tree/sub2", cwd=base)
    local, mnt = (snapshot(base / "tree") for base in sides)
    assert_same(local, mnt)

    def finds(base: Path) -> list[list[str]]:
        queries = [
            ["-printf", "%y %m %T@ %P -> %l\n"],
            ["-type", "f", "-printf", "%s %P\n"],
            ["-type", "f", "-perm", "-u+x"],
            ["-newer", "tree/secret"],
            ["-mtime", "+3650", "-type", "f"],
            ["-name", "*.c", "-path", "*deeper*"],
            ["-empty"],
        ]
        return [
            sorted(ok("find", "tree", *q, cwd=base).stdout.splitlines())
            for q in queries[:1] + [["-mindepth", "1", *q] for q in queries[1:]]
        ]

    def sizes(base: Path) -> list[str]:
        # Apparent sizes of files only: directories have their own sizes on each filesystem.
        return sorted(ok("du", "-ab", "--apparent-size", "tree", cwd=base).stdout.splitlines())

    want_finds, want_sizes = finds(sides[0]), sizes(sides[0])
    files_only = [line for line in want_sizes if not (sides[0] / line.split("\t")[1]).is_dir()]
    assert finds(sides[1]) == want_finds
    got = sizes(sides[1])
    assert [line for line in got if not (sides[1] / line.split("\t")[1]).is_dir()] == files_only
    # Blocks in use: du counts at least the file's size.
    big_kib = int(ok("du", "-k", "tree/big.bin", cwd=sides[1]).stdout.split()[0])
    assert big_kib >= 128_000 // 1024
    remount_and_compare(vol, sides[1] / "tree", mnt)
    assert finds(sides[1]) == want_finds


def test_df(vol, sides):
    (sides[1] / "payload").write_bytes(os.urandom(4 * 1024 * 1024))
    out = ok("df", "-P", "-B1", sides[1]).stdout.splitlines()
    size, used, avail = (int(x) for x in out[1].split()[1:4])
    assert size > 0 and avail <= size
    # What the volume holds shows as used, as on a local disk.
    assert used >= 4 * 1024 * 1024, out
    ok("df", "-i", sides[1])
