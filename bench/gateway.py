"""What reading and writing S3 Encryption Gateway objects costs through the mount.

    python3 bench/gateway.py [--files 20] [--size-kib 256] [--iterations 600000]

The gateway wraps every object's data key under its own PBKDF2 salt (600000 iterations by
default), so the first open of each gateway file costs one key derivation; a re-open hits the
mount's data-key cache. Files written by a gateway-format mount stretch the password once per
mount. Ceilings measured in the same run: raw boto3 GETs of the same objects, and our own format.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import cli, start, timed  # noqa: E402

from s3cryptfs.format import gateway as gw  # noqa: E402

PASSWORD = "benchmark password, not secret"


def drop_page_cache() -> None:
    # Re-reads must reach the mount (and its key cache), not the kernel's page cache.
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--size-kib", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=600_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s3cryptfs-bench-gw-"))
    server, env, pwfile = start(work, "benchgw", PASSWORD.encode())
    try:
        s3 = server.client()
        payloads = [os.urandom(args.size_kib * 1024) for _ in range(args.files)]
        t_make = time.perf_counter()
        for i, data in enumerate(payloads):
            # as the gateway 0.8 writes them: a random DEK under a per-object PBKDF2 salt
            body, md = gw.encrypt_chunked(data, PASSWORD, iterations=args.iterations, wrap=True)
            s3.put_object(Bucket="benchgw", Key=f"gw/f{i:04d}", Body=body, Metadata=md)
        t_make = time.perf_counter() - t_make

        def raw_get() -> None:
            for i in range(args.files):
                s3.get_object(Bucket="benchgw", Key=f"gw/f{i:04d}")["Body"].read()

        ceiling = timed(raw_get)
        mnt = work / "mnt"
        mnt.mkdir()
        common = ["--endpoint-url", server.endpoint_url, "--password-file", str(pwfile)]
        cli(env, "init", "s3://benchgw/gw", *common, "--format", "gateway")
        mount = ["mount", "s3://benchgw/gw", str(mnt), *common, "--cache-dir", str(work / "c")]
        cli(env, *mount)

        def read_all() -> None:
            for i in range(args.files):
                (mnt / f"f{i:04d}").read_bytes()

        cold = timed(read_all)
        drop_page_cache()
        warm = timed(read_all)
        new = [os.urandom(args.size_kib * 1024) for _ in range(args.files)]

        def write_all(prefix: str) -> None:
            for i, data in enumerate(new):
                (mnt / f"{prefix}{i:04d}").write_bytes(data)
            subprocess.run(["sync", "-f", str(mnt)], check=False)
            for i in range(args.files):  # until every file is in S3
                while os.getxattr(mnt / f"{prefix}{i:04d}", "user.s3cryptfs.state") != b"clean":
                    time.sleep(0.01)

        write_gw = timed(lambda: write_all("w"))
        cli(env, "umount", str(mnt))

        cli(env, "init", "s3://benchgw/ours", *common)
        ours = ["mount", "s3://benchgw/ours", str(mnt), *common, "--cache-dir", str(work / "o")]
        cli(env, *ours)
        write_ours = timed(lambda: write_all("w"))
        cli(env, "umount", str(mnt))

        n = args.files
        print(f"{n} files of {args.size_kib} KiB; gateway objects at {args.iterations} iterations")
        print(f"  building them in Python (one PBKDF2 each):   {1000 * t_make / n:8.1f} ms/file")
        print(f"  raw boto3 GET (ceiling):                     {1000 * ceiling / n:8.1f} ms/file")
        print(
            f"  first read through the mount (KDF + GET):    {1000 * cold / n:8.1f} ms/file"
            f"  ({ceiling / cold:.2f} of the ceiling)"
        )
        print(
            f"  re-read, key cached (page cache dropped):    {1000 * warm / n:8.1f} ms/file"
            f"  ({ceiling / warm:.2f} of the ceiling)"
        )
        print(f"  write until in S3, gateway format:           {1000 * write_gw / n:8.1f} ms/file")
        print(f"  write until in S3, our format:               {1000 * write_ours / n:8.1f} ms/f")
    finally:
        subprocess.run(["umount", "-l", str(work / "mnt")], check=False, capture_output=True)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of test data and bucket
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
