"""Random sequences of namespace and write operations on a few colliding names, checked against
a model of what a local disk would hold, after every remount and crash: what S3 ends up
holding must be what the mount showed (no deleted name coming back, no renamed file under
both names, no closed file lost). Kernel-free, on the real server; seeds are fixed, so a
failure replays.

pjdfstest's rename/09 found one such case (a file renamed over another, then away before its
upload, left the first one's object behind); these sequences look for the rest of the class."""

from __future__ import annotations

import errno
import random
import stat
from dataclasses import dataclass

import pytest

from tests.vfs.harness import CoreDriver

NAMES = ["a", "b", "c"]  # in every directory: files, directories and links collide


@dataclass
class Entry:
    kind: str  # file, dir, link, fifo
    data: bytes = b""


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Model:
    def __init__(self) -> None:
        self.tree: dict[str, Entry] = {}

    def children(self, path: str) -> list[str]:
        prefix = path + "/" if path else ""
        return [p for p in self.tree if p.startswith(prefix) and "/" not in p[len(prefix) :]]

    def dirs(self) -> list[str]:
        return [""] + [p for p, e in self.tree.items() if e.kind == "dir"]

    def under(self, path: str) -> list[str]:
        return [p for p in self.tree if p == path or p.startswith(path + "/")]


def data_for(rng: random.Random) -> bytes:
    # Mostly small (journal slots), sometimes past a slot (a body of its own).
    size = rng.choice([0, 5, 300, 4096, 70_000]) if rng.random() < 0.9 else 200_000
    return rng.randbytes(size)


def step(driver: CoreDriver, model: Model, rng: random.Random, log: list[str]) -> None:
    dirs = model.dirs()
    parent = rng.choice(dirs)
    path = join(parent, rng.choice(NAMES))
    cur = model.tree.get(path)
    op = rng.choice(
        ["write", "write", "append", "truncate", "rename", "rename", "rename", "unlink",
         "mkdir", "rmdir", "fifo", "symlink", "chmod"]
    )  # fmt: skip
    if op == "write" and (cur is None or cur.kind == "file"):
        data = data_for(rng)
        log.append(f"write {path} {len(data)}")
        driver.write_file(path, data)
        model.tree[path] = Entry("file", data)
    elif op == "append" and cur is not None and cur.kind == "file":
        data = rng.randbytes(rng.choice([1, 100, 5000]))
        log.append(f"append {path} {len(data)}")
        driver.append(path, data)
        cur.data += data
    elif op == "truncate" and cur is not None and cur.kind == "file":
        size = rng.choice([0, 1, len(cur.data) // 2, len(cur.data) + 10])
        log.append(f"truncate {path} {size}")
        driver.truncate(path, size)
        cur.data = cur.data[:size] + b"\0" * max(0, size - len(cur.data))
    elif op == "rename" and cur is not None:
        dst = join(rng.choice(dirs), rng.choice(NAMES))
        target = model.tree.get(dst)
        if dst == path or dst.startswith(path + "/"):
            return
        if cur.kind == "dir":
            if target is not None and (target.kind != "dir" or model.children(dst)):
                return
        elif target is not None and target.kind == "dir":
            return
        log.append(f"rename {path} {dst}")
        driver.rename(path, dst)
        for old in sorted(model.under(dst), reverse=True):
            del model.tree[old]
        for old in sorted(model.under(path)):
            model.tree[dst + old[len(path) :]] = model.tree.pop(old)
    elif op == "unlink" and cur is not None and cur.kind != "dir":
        log.append(f"unlink {path}")
        driver.unlink(path)
        del model.tree[path]
    elif op == "mkdir" and cur is None and path.count("/") < 3:
        log.append(f"mkdir {path}")
        driver.mkdir(path)
        model.tree[path] = Entry("dir")
    elif op == "rmdir" and cur is not None and cur.kind == "dir" and not model.children(path):
        log.append(f"rmdir {path}")
        driver.rmdir(path)
        del model.tree[path]
    elif op == "fifo" and cur is None:
        log.append(f"mkfifo {path}")
        parent_node, name = driver._parent(path)
        driver._run(driver.fs.mknod, parent_node.ino, name, stat.S_IFIFO | 0o644, 0, 0, 0)
        model.tree[path] = Entry("fifo")
    elif op == "symlink" and cur is None:
        target_text = f"to-{rng.randrange(1000)}"
        log.append(f"symlink {path} -> {target_text}")
        driver.symlink(target_text, path)
        model.tree[path] = Entry("link", target_text.encode())
    elif op == "chmod" and cur is not None and cur.kind in ("file", "dir"):
        mode = rng.choice([0o600, 0o644, 0o755])
        log.append(f"chmod {path} {mode:o}")
        driver.chmod(path, mode)


def walk(driver: CoreDriver, path: str = "") -> dict[str, Entry]:
    """What the mount shows under *path*."""
    out: dict[str, Entry] = {}
    for name in driver.listdir(path):
        child = join(path, name)
        mode = driver.stat(child).mode
        if stat.S_ISDIR(mode):
            out[child] = Entry("dir")
            out.update(walk(driver, child))
        elif stat.S_ISLNK(mode):
            out[child] = Entry("link", driver.readlink(child).encode())
        elif stat.S_ISFIFO(mode):
            out[child] = Entry("fifo")
        else:
            out[child] = Entry("file", driver.read_file(child))
    return out


def check(driver: CoreDriver, model: Model, log: list[str], when: str) -> None:
    shown = walk(driver)
    if shown != model.tree:
        extra = sorted(set(shown) - set(model.tree))
        missing = sorted(set(model.tree) - set(shown))
        differ = sorted(p for p in set(shown) & set(model.tree) if shown[p] != model.tree[p])
        raise AssertionError(
            f"{when}: extra {extra}, missing {missing}, different {differ}; "
            f"last operations: {log[-12:]}"
        )


# Seeds that found a bug (see the commits that name this test) and a few more: 60 s keeps
# every version queued until a remount sends it (the journal-move paths); 0 sends at once (the
# copy-in-S3 paths); in between, the two race.
@pytest.mark.parametrize(
    ("seed", "delay"),
    [(1, 60.0), (8, 0.0), (110, 60.0), (114, 60.0), (216, 0.05), (407, 60.0), (2, 60.0),
     (3, 0.0), (5, 0.05)],
)  # fmt: skip
def test_random_operations_leave_s3_as_the_mount_showed(
    driver: CoreDriver, seed: int, delay: float
) -> None:
    """*delay*: the upload delay."""
    driver.core.stop()
    driver.core.start(upload_delay=delay)
    rng = random.Random(seed)
    model = Model()
    log: list[str] = []
    for round_ in range(4):
        for _ in range(90):
            try:
                step(driver, model, rng, log)
            except OSError as exc:
                raise AssertionError(
                    f"{errno.errorcode.get(exc.errno or 0)} from {log[-1]}; before: {log[-12:-1]}"
                ) from exc
        check(driver, model, log, f"round {round_}, mounted")
        if round_ % 2:
            driver.core.stop(drain=False)  # a crash: what was closed is uploaded at the start
            driver.core.start()
            log.append("-- crash")
        else:
            driver.remount()
            log.append("-- remount")
        check(driver, model, log, f"round {round_}, after the {log[-1][3:]}")
