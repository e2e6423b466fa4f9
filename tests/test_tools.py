"""Everyday tools run against a real s3cryptfs mount."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TIMEOUT = 60


def run(*args, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(map(str, args)),
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kwargs,
    )


def make_tree(root: Path) -> Path:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    (root / "a" / "mid.bin").write_bytes(bytes(range(256)) * 40)
    (root / "a" / "b" / "deep.txt").write_text("deep\n" * 100)
    os.chmod(root / "a" / "mid.bin", 0o600)
    os.symlink("a/b/deep.txt", root / "link")
    return root


def test_cp_a_in_and_out(mounted, tmp_path):
    src = make_tree(tmp_path / "src")
    run("cp", "-a", src, mounted.mountpoint / "tree")
    run("diff", "-r", src, mounted.mountpoint / "tree")
    run("cp", "-a", mounted.mountpoint / "tree", tmp_path / "back")
    run("diff", "-r", src, tmp_path / "back")
    assert os.readlink(tmp_path / "back" / "link") == "a/b/deep.txt"
    assert (os.stat(tmp_path / "back" / "a" / "mid.bin").st_mode & 0o777) == 0o600


def test_tar_onto_mount_and_extract(mounted, tmp_path):
    src = make_tree(tmp_path / "src")
    archive = mounted.mountpoint / "tree.tar"
    run("tar", "cf", archive, "-C", src, ".")
    mounted.remount()
    out = tmp_path / "out"
    out.mkdir()
    run("tar", "xf", archive, "-C", out)
    run("diff", "-r", src, out)


def test_git_in_mount(mounted):
    repo = mounted.mountpoint / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com"]
    run(*git, "init", "-q", cwd=repo)
    (repo / "README").write_text("hello\n")
    run(*git, "add", "README", cwd=repo)
    run(*git, "commit", "-q", "-m", "first commit", cwd=repo)
    (repo / "README").write_text("hello again\n")
    run(*git, "commit", "-q", "-am", "second commit", cwd=repo)
    log = run(*git, "log", "--format=%s", cwd=repo).stdout.split("\n")
    assert log[:2] == ["second commit", "first commit"]
    run(*git, "fsck", "--no-progress", cwd=repo)
    assert run(*git, "status", "--porcelain", cwd=repo).stdout == ""


def test_sqlite(mounted):
    db = mounted.mountpoint / "test.db"
    script = (
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);\n"
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000)\n"
        "INSERT INTO t (v) SELECT 'row ' || x FROM c;\n"
    )
    run("sqlite3", db, input=script)

    def check():
        out = run("sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;").stdout
        assert out.split() == ["ok", "1000"]

    check()
    mounted.remount()
    check()


def test_write_temp_then_replace(mounted):
    target = mounted.mountpoint / "config.json"
    target.write_text('{"v": 0}')
    for i in range(1, 4):
        tmp = mounted.mountpoint / f".config.json.tmp{i}"
        with open(tmp, "w") as f:
            f.write(f'{{"v": {i}}}')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        assert target.read_text() == f'{{"v": {i}}}'
    assert sorted(os.listdir(mounted.mountpoint)) == ["config.json"]
    mounted.remount()
    assert target.read_text() == '{"v": 3}'


def test_rsync_into_mount(mounted, tmp_path):
    src = make_tree(tmp_path / "src")
    dst = mounted.mountpoint / "synced"
    run("rsync", "-a", f"{src}/", f"{dst}/")
    run("diff", "-r", src, dst)
    (src / "top.txt").write_text("changed\n")
    run("rsync", "-a", f"{src}/", f"{dst}/")
    run("diff", "-r", src, dst)
    mounted.remount()
    run("diff", "-r", src, dst)
