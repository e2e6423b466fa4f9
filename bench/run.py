"""s3cryptfs benchmark: the mount against the fastest raw S3 client and, with --peers, against
rclone crypt, on the same local SeaweedFS in one run.

    python3 bench/run.py [--quick] [--peers] [--s3-client native] [--json FILE]
    python3 bench/run.py --wide-dir 50000 [--s3-client boto3] [--max-inodes N] [--wide-dirs D]

Starts a private SeaweedFS on 127.0.0.1; measures the ceilings with awscrt and with obstore
(bench/ceilings.py; the faster per row counts), then the workloads of bench/workloads.py on an
s3cryptfs mount and, with --peers, on an rclone crypt mount (bench/peers.py). Prints one table;
every ratio is s3cryptfs's speed over the other's (above 1: s3cryptfs is faster, or uses less).
Targets are printed as text: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import ceilings  # noqa: E402
import workloads  # noqa: E402
from common import start  # noqa: E402
from mounts import S3cryptfs  # noqa: E402
from tree import make_tree  # noqa: E402

MIB = 1024 * 1024
PASSWORD = b"benchmark password, not secret"
BUCKET = "bench"
UNITS = {"MiB/s": "{:.1f} MiB/s", "s": "{:.2f} s", "IOPS": "{:,.0f} IOPS", "MiB": "{:.0f} MiB",
         "s/GiB": "{:.2f} s/GiB"}  # fmt: skip


@dataclass
class Row:
    id: str
    label: str
    unit: str
    faster_is_higher: bool  # speeds; times, CPU and memory are better lower
    ceiling: str = ""  # a row of bench/ceilings.py
    target: str = ""


def rows_for(args: argparse.Namespace, tree_mb: float) -> list[Row]:
    n = f"{args.files:,}"
    root = " (as root: owner, mode, mtime kept, = --same-owner -xpf)" if os.geteuid() == 0 else ""
    return [
        Row("big_write", f"{args.size_mib} MiB sequential write until in S3", "MiB/s", True,
            "put_big", ">= 0.90 of PUT; >= 1 vs rclone"),
        Row("big_read", f"{args.size_mib} MiB cold sequential read (cat)", "MiB/s", True,
            "get_big", ">= 0.70 of GET; >= 1 vs rclone"),
        Row("rand_read", "4 KiB random reads, cold (fio psync)", "IOPS", True, "get_range",
            ">= 1 vs rclone"),
        Row("mv", f"mv of a {args.mv_mib} MiB file (median of 3)", "s", False, "copy_mv",
            ">= 1 vs rclone"),
        Row("small_cp", f"{n} x 4 KiB: cp -r returns", "s", False, "", ">= 1 vs rclone"),
        Row("small_s3", f"{n} x 4 KiB until in S3", "s", False, "put_small_8",
            "within 2.5x of 8-thread PUT (>= 0.40); >= 2 vs rclone"),
        Row("ls", f"ls -l of {n} files, fresh mount", "s", False, "", "< 0.5 s; >= 1 vs rclone"),
        Row("cat_small", f"cat of {n} x 4 KiB, fresh mount", "s", False, "get_small_seq",
            "within 1.0x of sequential GET (>= 1.00); >= 2 vs rclone"),
        Row("tar", f"tar -xf of {args.tree_files:,} files ({tree_mb:.0f} MB) until in S3{root}",
            "s", False, "", ">= 2 vs rclone"),
        Row("git", f"git init, add -A, commit of {args.git_files} files until in S3", "s",
            False, "", ">= 1 vs rclone"),
        Row("cpu_write", "mount CPU per GiB written", "s/GiB", False),
        Row("cpu_read", "mount CPU per GiB read", "s/GiB", False),
        Row("rss", "peak RSS of the mount", "MiB", False, "", "< 300 MiB"),
        Row("rss_all", "  with its children (upload helper)", "MiB", False),
        Row("rss_write", "  while writing the big file", "MiB", False),
        Row("rss_read", "  while reading it", "MiB", False),
    ]  # fmt: skip


def ceiling_value(row: Row, ceiling: ceilings.Ceiling, args: argparse.Namespace) -> float:
    """The ceiling in the row's unit: ceilings are rates; a time row is the time for its files
    (for one object, for the mv row's copy)."""
    if row.faster_is_higher:
        return ceiling.value
    return (1 if row.id == "mv" else args.files) / ceiling.value


def ratio(row: Row, ours: float | None, other: float | None) -> float | None:
    if not ours or not other:
        return None
    return ours / other if row.faster_is_higher else other / ours


def make_inputs(work: Path, args: argparse.Namespace) -> tuple[workloads.Inputs, float]:
    def random_file(path: Path, mib: int) -> Path:
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
        return path

    small = work / "small"
    small.mkdir()
    payload = os.urandom(4096)
    for i in range(args.files):
        (small / f"{i:05d}").write_bytes(payload)
    files = make_tree(work / "tree", args.tree_files, int(args.tree_mb * 1e6))
    tree_mb = sum(f.stat().st_size for f in files) / 1e6
    tarball = work / "tree.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(work), "tree"], check=True)
    repo = work / "repo"
    for f in files[: args.git_files]:
        dest = repo / f.relative_to(work / "tree")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
    shutil.rmtree(work / "tree")
    inputs = workloads.Inputs(
        big=random_file(work / "big.bin", args.size_mib),
        mv_file=random_file(work / "mv.bin", args.mv_mib),
        small=small,
        tarball=tarball,
        repo=repo,
        fio_runtime=args.fio_runtime,
        random_reads=args.random_reads,
    )
    return inputs, tree_mb


def fmt(unit: str, value: float | None) -> str:
    return "" if value is None else UNITS[unit].format(value)


def report(
    rows: list[Row],
    ours: dict[str, float],
    ceils: dict[str, ceilings.Ceiling],
    peer: dict[str, float] | None,
    args: argparse.Namespace,
) -> list[dict[str, object]]:
    out = []
    print("\n| workload | s3cryptfs | ceiling (client) | ratio | rclone crypt | ratio vs rclone "
          "| target |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for row in rows:
        ceiling, client = None, ""
        if row.ceiling:
            ceiling = ceiling_value(row, ceils[row.ceiling], args)
            client = ceils[row.ceiling].client
        theirs = peer.get(row.id) if peer else None
        r_ceil, r_peer = ratio(row, ours[row.id], ceiling), ratio(row, ours[row.id], theirs)
        cells = [
            row.label,
            fmt(row.unit, ours[row.id]),
            f"{fmt(row.unit, ceiling)} ({client})" if client else "",
            "" if r_ceil is None else f"{r_ceil:.2f}",
            fmt(row.unit, theirs),
            "" if r_peer is None else f"{r_peer:.2f}",
            row.target,
        ]
        print("| " + " | ".join(cells) + " |")
        out.append({"id": row.id, "workload": row.label, "unit": row.unit,
                    "s3cryptfs": ours[row.id], "ceiling": ceiling, "ceiling_client": client,
                    "ratio": r_ceil, "rclone": theirs, "ratio_vs_rclone": r_peer,
                    "target": row.target})  # fmt: skip
    print("\nceilings by client: " + "; ".join(
        f"{name} " + ", ".join(f"{c} {v:,.1f}" for c, v in ceil.by_client.items())
        + f" {ceilings.ROWS[name]}" for name, ceil in ceils.items()
    ))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes for development: 256 MiB, 500 files, 600-file tree")
    ap.add_argument("--size-mib", type=int, help="the big file (default 1024)")
    ap.add_argument("--files", type=int, help="the 4 KiB files (default 2000)")
    ap.add_argument("--tree-files", type=int, help="files in the tar tree (default 2374)")
    ap.add_argument("--tree-mb", type=float, help="its total size in MB (default 87)")
    ap.add_argument("--git-files", type=int, help="files committed with git (default 300)")
    ap.add_argument("--fio-runtime", type=int, help="seconds of fio random reads (default 15)")
    ap.add_argument("--mv-mib", type=int, default=100)
    ap.add_argument("--random-reads", type=int, default=500, help="4 KiB preads if fio is missing")
    ap.add_argument("--ranged-gets", type=int, default=1000, help="for the random-read ceiling")
    ap.add_argument("--ceiling-tries", type=int, default=2, help="each client's best of these")
    ap.add_argument("--s3-client", help="passed to `s3cryptfs mount` when given")
    ap.add_argument("--peers", nargs="?", const="rclone", choices=["rclone"],
                    help="also run the workloads on rclone crypt")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    ap.add_argument("--wide-dir", type=int, metavar="N",
                    help="only the wide-directory case (bench/wide.py)")
    ap.add_argument("--max-inodes", type=int, metavar="N",
                    help="passed to `s3cryptfs mount` by --wide-dir when given")
    ap.add_argument("--wide-dirs", type=int, default=1, metavar="D",
                    help="--wide-dir: spread the objects over D subdirectories (ls -lR)")
    args = ap.parse_args()  # fmt: skip
    if args.wide_dir:
        from wide import run_wide

        return run_wide(args.wide_dir, args.s3_client, args.max_inodes, args.wide_dirs)
    if importlib.util.find_spec("obstore") is None:
        # The ceilings are measured with it: without it they would be the slower client's.
        print("bench/run.py: obstore is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    defaults = (
        {"size_mib": 256, "files": 500, "tree_files": 600, "tree_mb": 22, "git_files": 100,
         "fio_runtime": 5}
        if args.quick
        else {"size_mib": 1024, "files": 2000, "tree_files": 2374, "tree_mb": 87,
              "git_files": 300, "fio_runtime": 15}
    )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.mv_mib = min(args.mv_mib, args.size_mib)

    work = Path(tempfile.mkdtemp(prefix="s3cryptfs-bench-"))
    server, env, pwfile = start(work, BUCKET, PASSWORD)
    mounted: list[object] = []
    try:
        inputs, tree_mb = make_inputs(work, args)
        ceils = ceilings.measure(
            server.endpoint_url, BUCKET, server.access_key, server.secret_key,
            inputs.big, args.files, args.ranged_gets, args.ceiling_tries, inputs.mv_file,
        )  # fmt: skip
        ours_fs = S3cryptfs(work, env, server.endpoint_url, pwfile, BUCKET, args.s3_client)
        mounted.append(ours_fs)
        ours = workloads.run_all(ours_fs, inputs)
        peer = None
        if args.peers:
            from peers import Rclone

            peer_fs = Rclone(work, server.endpoint_url, server.access_key, server.secret_key,
                             BUCKET)  # fmt: skip
            mounted.append(peer_fs)
            peer = workloads.run_all(peer_fs, inputs)
    finally:
        for fs in mounted:
            fs.cleanup()  # type: ignore[attr-defined]
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of test data and bucket
    rows = rows_for(args, tree_mb)
    client = args.s3_client or "CLI default"
    print(f"\ns3cryptfs --s3-client {client}; {datetime.date.today()}; {os.cpu_count()} cores")
    table = report(rows, ours, ceils, peer, args)
    if args.json:
        args.json.write_text(json.dumps({
            "date": str(datetime.date.today()),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "ceilings": {k: vars(v) for k, v in ceils.items()},
            "rows": table,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
