"""s3cryptfs benchmark: the mount against raw boto3 on the same local SeaweedFS, in one run.

    python3 bench/run.py [--size-mib 1024] [--files 2000]
    python3 bench/run.py --wide-dir 50000 [--s3-client boto3]

Prints each measurement with its ceiling (raw boto3 on the same endpoint) and the ratio.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import cli, start, timed  # noqa: E402

MIB = 1024 * 1024
PASSWORD = b"benchmark password, not secret"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssWatcher(threading.Thread):
    """Peak resident memory of the mount process, and of the mount with its upload helper
    (its child), sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.peak_all, self.running = pid, 0, 0, True

    def run(self) -> None:
        while self.running:
            try:
                own = rss(self.pid)
                tasks = os.listdir(f"/proc/{self.pid}/task")
            except FileNotFoundError:
                return
            children = []
            for task in tasks:  # the helper is the child of whichever thread started it
                try:
                    with open(f"/proc/{self.pid}/task/{task}/children") as f:
                        children += [int(c) for c in f.read().split()]
                except FileNotFoundError:
                    pass
            total = own
            for child in children:
                try:
                    total += rss(child)
                except FileNotFoundError:
                    pass
            self.peak = max(self.peak, own)
            self.peak_all = max(self.peak_all, total)
            time.sleep(0.05)


def quiet(fn):  # type: ignore[no-untyped-def]
    """Time *fn* from a quiet disk: the dirty pages of the step before (a GiB of SeaweedFS
    data, say) are written back first, so that they slow neither ours nor the ceiling."""
    os.sync()
    return timed(fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--random-reads", type=int, default=500)
    ap.add_argument("--tar-files", type=int, default=3000)
    ap.add_argument(
        "--wide-dir", type=int, metavar="N", help="only the wide-directory case (bench/wide.py)"
    )
    ap.add_argument("--s3-client", default="native", help="for --wide-dir")
    args = ap.parse_args()
    if args.wide_dir:
        from wide import run_wide

        return run_wide(args.wide_dir, args.s3_client)
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="s3cryptfs-bench-"))
    server, env, pwfile = start(work, "bench", PASSWORD)
    rows: list[tuple[str, float, float, str]] = []
    try:
        s3 = server.client()
        data = work / "data.bin"
        with open(data, "wb") as f:
            for _ in range(size // (8 * MIB)):
                f.write(os.urandom(8 * MIB))

        # ceilings
        put_raw = quiet(lambda: s3.upload_file(str(data), "bench", "raw/big"))
        get_raw = quiet(lambda: s3.download_file("bench", "raw/big", str(work / "raw.out")))
        (work / "raw.out").unlink()
        small = os.urandom(4096)

        def put_small(i: int) -> None:
            s3.put_object(Bucket="bench", Key=f"raw/small/{i:05d}", Body=small)

        def put_all() -> None:
            with cf.ThreadPoolExecutor(8) as pool:
                list(pool.map(put_small, range(args.files)))

        small_raw = quiet(put_all)
        disk_copy = quiet(
            lambda: subprocess.run(["cp", str(data), str(work / "disk.copy")], check=True)
        )
        (work / "disk.copy").unlink()

        url = "s3://bench/vol"
        mnt = work / "mnt"
        mnt.mkdir()
        common = ["--endpoint-url", server.endpoint_url, "--password-file", str(pwfile)]
        cli(env, "init", url, *common)

        watchers: list[RssWatcher] = []

        def mount() -> RssWatcher:
            cli(env, "mount", url, str(mnt), *common, "--cache-dir", str(work / "cache"))
            watcher = RssWatcher(int(os.getxattr(mnt, "user.s3cryptfs.pid")))
            watcher.start()
            watchers.append(watcher)
            return watcher

        def umount(w: RssWatcher) -> int:
            cli(env, "umount", str(mnt))
            w.running = False
            return w.peak

        w = mount()
        seq_write = quiet(
            lambda: (subprocess.run(["cp", str(data), str(mnt / "big")], check=True), umount(w))
        )
        peak_write = w.peak
        w = mount()
        seq_read = quiet(
            lambda: subprocess.run(["cat", str(mnt / "big")], check=True, stdout=subprocess.DEVNULL)
        )
        # Random reads on a fresh mount: neither the kernel's page cache nor the block cache
        # holds the file, so each read is a range GET (the ceiling: raw 4 KiB range GETs).
        peak_read = umount(w)
        w = mount()
        rnd = random.Random(1)
        offsets = [rnd.randrange(0, size - 4096) for _ in range(args.random_reads)]
        fd = os.open(mnt / "big", os.O_RDONLY)
        t = quiet(lambda: [os.pread(fd, 4096, off) for off in offsets])
        os.close(fd)
        iops = len(offsets) / t
        t_raw = quiet(
            lambda: [
                s3.get_object(Bucket="bench", Key="raw/big", Range=f"bytes={o}-{o + 4095}")[
                    "Body"
                ].read()
                for o in offsets
            ]
        )
        iops_raw = len(offsets) / t_raw
        (mnt / "small").mkdir()

        def create_small() -> None:
            for i in range(args.files):
                (mnt / "small" / f"{i:05d}").write_bytes(small)
            umount(w)

        small_mnt = quiet(create_small)
        w = mount()
        (mnt / "small8").mkdir()

        def create_small_parallel() -> None:
            # The ceiling PUTs with 8 threads: the same parallelism, through the mount.
            def one(i: int) -> None:
                (mnt / "small8" / f"{i:05d}").write_bytes(small)

            with cf.ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(args.files)))
            umount(w)

        small_par = quiet(create_small_parallel)
        w = mount()
        ls = quiet(
            lambda: subprocess.run(
                ["ls", "-l", str(mnt / "small")], check=True, stdout=subprocess.DEVNULL
            )
        )
        # A tar of many small files (a source tree), extracted until durable; ceiling: local disk.
        tree = work / "tree"
        for i in range(args.tar_files):
            d = tree / f"d{i // 100:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:05d}.c").write_bytes(os.urandom(rnd.randrange(200, 6000)))
        tarball = work / "tree.tar"
        subprocess.run(["tar", "-cf", str(tarball), "-C", str(work), "tree"], check=True)
        (work / "untar").mkdir()
        tar_disk = quiet(
            lambda: subprocess.run(
                ["tar", "-xf", str(tarball), "-C", str(work / "untar")], check=True
            )
        )

        def untar() -> None:
            subprocess.run(["tar", "-xf", str(tarball), "-C", str(mnt)], check=True)
            umount(w)

        tar_mnt = quiet(untar)
        peak = max(peak_write, peak_read, w.peak)
        peak_all = max(x.peak_all for x in watchers)

        rows = [
            (
                "sequential write until durable",
                size / seq_write / MIB,
                size / put_raw / MIB,
                "MiB/s vs boto3 upload_file",
            ),
            (
                "cold sequential read",
                size / seq_read / MIB,
                size / get_raw / MIB,
                "MiB/s vs boto3 download_file",
            ),
            ("4 KiB random reads, cold", iops, iops_raw, "IOPS vs raw 4 KiB range GETs"),
            (
                f"{args.files} x 4 KiB files until durable",
                small_mnt,
                small_raw,
                "seconds vs 8-thread PUT (ratio = ceiling/ours)",
            ),
            (f"ls -l of {args.files} files, fresh mount", ls, 0.5, "seconds vs 0.5 s target"),
            (
                f"tar x of {args.tar_files} small files until durable",
                tar_mnt,
                tar_disk,
                "seconds vs local disk (ratio = ceiling/ours)",
            ),
            ("peak RSS of the mount", peak / MIB, 300, "MiB vs 300 MiB target"),
            ("  with its upload helper", peak_all / MIB, 300, "MiB (info)"),
            ("  peak RSS while writing the big file", peak_write / MIB, 300, "MiB (info)"),
            ("  peak RSS while reading it", peak_read / MIB, 300, "MiB (info)"),
            (
                f"{args.files} x 4 KiB files, 8 writers, until durable",
                small_par,
                small_raw,
                "seconds vs 8-thread PUT (ratio = ceiling/ours)",
            ),
            ("local disk copy", size / disk_copy / MIB, size / disk_copy / MIB, "MiB/s (info)"),
        ]
    finally:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(work / "mnt")], check=False, stderr=subprocess.DEVNULL
        )
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of test data and bucket
    print(f"\n{'measurement':40} {'ours':>10} {'ceiling':>10} {'ratio':>7}  unit")
    for name, ours, ceiling, unit in rows:
        if "seconds" in unit or "MiB vs" in unit:
            ratio = ceiling / ours if ours else 0.0
        else:
            ratio = ours / ceiling if ceiling else 0.0
        print(f"{name:40} {ours:10.2f} {ceiling:10.2f} {ratio:7.2f}  {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
