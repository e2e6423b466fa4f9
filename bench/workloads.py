"""The workloads of bench/run.py, run the same way on any file system of bench/mounts.py or
bench/peers.py. Each timed step starts after os.sync(), so that the dirty pages of the step
before (a GiB of SeaweedFS data, say) slow neither side. "Until in S3" includes the
``settle_unmount()``. Where a step says fresh or cold, it runs on a new mount process.

Results are keyed by row id (bench/run.py's ROWS); times in seconds, speeds in MiB/s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import timed

MIB = 1024 * 1024
GIB = 1024 * MIB
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": "/dev/null",  # the machine's settings are not the benchmark's
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


@dataclass
class Inputs:
    """Local files the workloads copy in, made once and shared by every file system."""

    big: Path  # --size-mib of random bytes
    mv_file: Path  # the file renamed by the mv step
    small: Path  # a directory of --files x 4 KiB
    tarball: Path  # the synthetic tree (bench/tree.py)
    repo: Path  # the directory committed with git: part of the tree
    fio_runtime: int
    random_reads: int  # when fio is missing: this many 4 KiB preads instead


def quiet(fn) -> float:  # type: ignore[no-untyped-def]
    os.sync()
    return timed(fn)


def until_in_s3(fs: Any, work: Any) -> float:
    """Seconds for *work* and then everything it wrote to reach S3 (with the unmount)."""
    os.sync()
    start = time.perf_counter()
    work()
    uncounted = fs.settle_unmount()
    return time.perf_counter() - start - uncounted


def run(args: list[str], **kwargs: Any) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kwargs)


def random_read_iops(path: Path, inputs: Inputs) -> float:
    """4 KiB random reads from one thread: fio (psync, through the page cache as programs read),
    or, without fio, a fixed number of preads at seeded offsets."""
    if shutil.which("fio"):
        os.sync()
        out = subprocess.run(
            ["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k",
             "--ioengine=psync", "--direct=0", f"--runtime={inputs.fio_runtime}",
             "--time_based", "--readonly", "--output-format=json"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        return float(json.loads(out)["jobs"][0]["read"]["iops"])
    rnd = random.Random(1)
    offsets = [rnd.randrange(0, path.stat().st_size - 4096) for _ in range(inputs.random_reads)]
    fd = os.open(path, os.O_RDONLY)
    try:
        return len(offsets) / quiet(lambda: [os.pread(fd, 4096, off) for off in offsets])
    finally:
        os.close(fd)


def run_all(fs: Any, inputs: Inputs) -> dict[str, float]:
    """Every workload on *fs*, in an order where each one finds what it needs in S3."""
    r: dict[str, float] = {}
    mnt: Path = fs.mnt
    size = inputs.big.stat().st_size

    names: list[str] = []

    def step(name: str) -> None:
        names.append(name)
        print(f"{fs.name}: {name}", file=sys.stderr, flush=True)

    step("big write")
    w = fs.mount()
    cpu = w.sample()
    t = until_in_s3(fs, lambda: run(["cp", str(inputs.big), str(mnt / "big")]))
    r["big_write"] = size / MIB / t
    r["cpu_write"] = (w.cpu - cpu) / (size / GIB)
    r["rss_write"], peaks = w.peak, [w]

    step("cold big read")
    w = fs.mount()
    cpu = w.sample()
    r["big_read"] = size / MIB / quiet(lambda: run(["cat", str(mnt / "big")]))
    r["cpu_read"] = (w.sample() - cpu) / (size / GIB)
    r["rss_read"] = w.peak
    run(["cp", str(inputs.mv_file), str(mnt / "tomove")])  # for the mv step, on a later mount
    fs.settle_unmount()
    peaks.append(w)

    step("cold random reads")
    w = fs.mount()
    r["rand_read"] = random_read_iops(mnt / "big", inputs)
    # The file to rename was written by the mount before: this one has not read it.
    # One CopyObject of 100 MiB takes about 0.3 s or about 1.1 s on SeaweedFS from try to
    # try, whatever the client: the median of three moves (there and back, and there again).
    moves, ends = [], [mnt / "tomove", mnt / "moved"]
    for _ in range(3):
        moves.append(quiet(lambda: run(["mv", str(ends[0]), str(ends[1])])))
        ends.reverse()
    r["mv"] = statistics.median(moves)
    fs.settle_unmount()
    peaks.append(w)

    step("small files")
    w = fs.mount()

    def copy_small() -> None:
        r["small_cp"] = timed(lambda: run(["cp", "-r", str(inputs.small), str(mnt / "small")]))

    r["small_s3"] = until_in_s3(fs, copy_small)
    peaks.append(w)

    step("ls -l")
    w = fs.mount()
    r["ls"] = quiet(lambda: run(["ls", "-l", str(mnt / "small")]))
    fs.settle_unmount()
    peaks.append(w)

    step("cat of small files")
    w = fs.mount()
    r["cat_small"] = quiet(lambda: run(["bash", "-c", f"cat '{mnt}'/small/* > /dev/null"]))
    # For the git step: its files are in S3 before it starts.
    run(["cp", "-r", str(inputs.repo), str(mnt / "repo")])
    fs.settle_unmount()
    peaks.append(w)

    step("tar -xf")
    w = fs.mount()
    (mnt / "untar").mkdir()
    r["tar"] = until_in_s3(
        fs, lambda: run(["tar", "-xf", str(inputs.tarball), "-C", str(mnt / "untar")])
    )
    peaks.append(w)

    step("git")
    w = fs.mount()
    env = {**os.environ, **GIT_ENV}
    git = ["git", "-C", str(mnt / "repo")]

    def commit() -> None:
        run([*git, "init", "-q"], env=env)
        run([*git, "add", "-A"], env=env)
        run([*git, "commit", "-q", "-m", "x"], env=env)

    r["git"] = until_in_s3(fs, commit)
    peaks.append(w)

    # (which step the peak belongs to: each step runs on a mount of its own)
    by_step = ", ".join(f"{n} {x.peak / MIB:.0f}" for n, x in zip(names, peaks, strict=True))
    print(f"{fs.name}: peak RSS (MiB) by step: {by_step}", file=sys.stderr, flush=True)
    r["rss"] = max(x.peak for x in peaks)
    r["rss_all"] = max(x.peak_all for x in peaks)
    for key in ("rss", "rss_all", "rss_write", "rss_read"):
        r[key] /= MIB
    return r
