"""The wide-directory case of bench/run.py (``--wide-dir N``): N valid encrypted objects that
arrived in one directory without the mount (server-side copies, as a restore or another tool
would leave them), listed with ``ls -l`` on a fresh mount (no directory index: one HEAD per
object), then again on the next mount (the index the first pass wrote).

BENCH_PYSPY=FILE records the mount's stacks during the first pass (py-spy, raw format);
BENCH_PYSPY_PASS=index records the pass with the index instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import cli, start, timed

MIB = 1024 * 1024
PASSWORD = b"benchmark password, not secret"
BUCKET = "bench"


def _rss(pid: int, field: str = "VmHWM") -> int:
    """The highest resident set the process reached (VmHWM), or the current one (VmRSS), in
    bytes. The peak includes the password's key derivation at mount (scrypt, 128 MiB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu(pid: int | None) -> float:
    """User and system CPU seconds the process has used so far."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status(mnt: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(os.getxattr(mnt, "user.s3cryptfs.status"))
    return loaded


def _ls(path: Path, recursive: bool) -> int:
    """Files listed by `ls -l` (`ls -lR` through the subdirectories)."""
    args = ["ls", "-lR" if recursive else "-l", str(path)]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("-"))


def run_wide(n: int, client: str | None, max_inodes: int | None = None, dirs: int = 1) -> int:
    """*dirs* > 1: the N objects spread over that many subdirectories of the directory, listed
    with `ls -lR` (a walk over a tree, where --max-inodes bounds what the mount keeps)."""
    work = Path(tempfile.mkdtemp(prefix="s3cryptfs-bench-wide-"))
    server, env, pwfile = start(work, BUCKET, PASSWORD)
    mnt = work / "mnt"
    mnt.mkdir()
    url = f"s3://{BUCKET}/vol"
    common = ["--endpoint-url", server.endpoint_url, "--password-file", str(pwfile)]
    rows: list[tuple[str, str]] = []
    try:
        cli(env, "init", url, *common)
        if client:  # else the CLI's default; init has no --s3-client
            common += ["--s3-client", client]
        extra = [] if max_inodes is None else ["--max-inodes", str(max_inodes)]

        def mount() -> int:
            cli(env, "mount", url, str(mnt), *common, "--cache-dir", str(work / "cache"), *extra)
            return int(os.getxattr(mnt, "user.s3cryptfs.pid"))

        def umount() -> None:
            cli(env, "umount", str(mnt))

        mount()
        (mnt / "wide").mkdir()
        (mnt / "wide" / "seed").write_bytes(os.urandom(4096))
        umount()

        s3 = server.client()
        seed = "vol/wide/seed"
        meta = s3.head_object(Bucket=BUCKET, Key=seed)["Metadata"]
        copied = 0
        lock = threading.Lock()

        def copy(i: int) -> None:
            nonlocal copied
            s3.copy_object(
                Bucket=BUCKET,
                Key=f"vol/wide/f{i:06d}" if dirs <= 1 else f"vol/wide/d{i % dirs:04d}/f{i:06d}",
                CopySource={"Bucket": BUCKET, "Key": seed},
                Metadata=meta,
                MetadataDirective="REPLACE",
            )
            with lock:
                copied += 1

        t_copy = timed(lambda: list(cf.ThreadPoolExecutor(16).map(copy, range(n))))
        rows.append(("server-side copies", f"{copied} in {t_copy:.1f} s"))

        def dirs_objects() -> int:
            page = s3.list_objects_v2(Bucket=BUCKET, Prefix="vol/.s3cryptfs/dirs/")
            return int(page.get("KeyCount", 0))

        index_before = dirs_objects()
        for label in ("first contact (no index)", "with the index"):
            pid = mount()
            spy = None
            first = label.startswith("first")
            wanted = os.environ.get("BENCH_PYSPY_PASS", "first") == "first"
            if os.environ.get("BENCH_PYSPY") and first == wanted:
                # Where the mount's time goes on first contact: collapsed stacks for flame graphs.
                spy = subprocess.Popen(
                    ["py-spy", "record", "-p", str(pid), "-r", "100", "--nonblocking", "--gil",
                     "--format", "raw", "-o", os.environ["BENCH_PYSPY"]],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1)
            cpu_mount, cpu_weed = _cpu(pid), _cpu(server.proc.pid if server.proc else None)
            rss_mounted = _rss(pid, "VmRSS")  # (what the listing adds is measured from here)
            start_t = time.perf_counter()
            listed = _ls(mnt / "wide", dirs > 1)
            seconds = time.perf_counter() - start_t
            cpu_mount = _cpu(pid) - cpu_mount
            cpu_weed = _cpu(server.proc.pid if server.proc else None) - cpu_weed
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
            # The index is written in the background: wait for it before the next mount.
            deadline = time.monotonic() + 120
            status = _status(mnt)
            while label.startswith("first") and time.monotonic() < deadline:
                status = _status(mnt)
                if status.get("index_writes"):
                    break
                time.sleep(0.5)
            peak, now = _rss(pid), _rss(pid, "VmRSS")
            requests = status.get("requests", {})
            inodes = status.get("inodes", {})
            kernel = status.get("kernel", {})
            assert isinstance(kernel, dict)
            assert isinstance(inodes, dict)
            umount()
            rows.append(
                (
                    f"ls -l, {label}",
                    f"{seconds:.2f} s, {listed} files, peak RSS {peak / MIB:.0f} MiB, "
                    f"RSS after {now / MIB:.0f} MiB "
                    f"({(now - rss_mounted) / max(listed, 1):.0f} B per listed file), "
                    f"CPU s mount {cpu_mount:.1f} weed {cpu_weed:.1f}, "
                    f"inodes known {inodes.get('known')} (dropped {inodes.get('dropped')}), "
                    f"index writes {status.get('index_writes')}, requests {requests}, "
                    f"kernel requests {kernel.get('requests')}",
                )
            )
        rows.append(("index objects (before, after)", f"{index_before}, {dirs_objects()}"))
    finally:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mnt)], check=False, stderr=subprocess.DEVNULL
        )
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nwide directory: {n} objects, --s3-client {client or '(CLI default)'}, "
        f"--max-inodes {max_inodes or '(CLI default)'}, {dirs} subdirectories (1: none)"
    )
    for name, value in rows:
        print(f"  {name:32} {value}")
    return 0
