"""S3 client probe: boto3 against obstore (Rust object_store) and awscrt (the AWS CRT S3 client),
on the same server in one run.

    python3 bench/clients.py [--endpoint URL --bucket NAME] [--big-mib 256] [--small 400]

Without --endpoint, a SeaweedFS is started on loopback (credentials then come from it; with
--endpoint they come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Per 4 KiB object: GET
latency and the process's CPU time per GET, PUT latency, GETs/s and PUTs/s from 8 threads; then
one big object streamed in (GET) and uploaded (PUT, multipart where the client does it), with the
process CPU time per GiB moved. Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

MIB = 1024 * 1024
PART = 8 * MIB


class Boto3Client:
    name = "boto3"

    def __init__(self, endpoint: str, bucket: str, key: str, secret: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(
                max_pool_connections=32,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def get(self, key: str) -> bytes:
        data: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get_stream(self, key: str) -> int:
        n = 0
        for chunk in self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(MIB):
            n += len(chunk)
        return n

    def put_big(self, key: str, data: bytes) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_chunksize=PART, max_concurrency=10)
        self.s3.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=config)

    def put_file(self, key: str, path: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_chunksize=PART, max_concurrency=10)
        self.s3.upload_file(str(path), self.bucket, key, Config=config)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        rng = f"bytes={start}-{start + length - 1}"
        data: bytes = self.s3.get_object(Bucket=self.bucket, Key=key, Range=rng)["Body"].read()
        return data


class ObstoreClient:
    name = "obstore"

    def __init__(self, endpoint: str, bucket: str, key: str, secret: str) -> None:
        import obstore
        from obstore.store import S3Store

        self.ob = obstore
        self.store = S3Store(
            bucket,
            endpoint=endpoint,
            access_key_id=key,
            secret_access_key=secret,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "pool_max_idle_per_host": "32"},
        )

    def get(self, key: str) -> bytes:
        return bytes(self.ob.get(self.store, key).bytes())

    def put(self, key: str, data: bytes) -> None:
        self.ob.put(self.store, key, data, use_multipart=False)

    def get_stream(self, key: str) -> int:
        n = 0
        for chunk in self.ob.get(self.store, key).stream(min_chunk_size=MIB):
            n += len(chunk)
        return n

    def put_big(self, key: str, data: bytes) -> None:
        self.ob.put(self.store, key, data, chunk_size=PART, max_concurrency=10)

    def put_file(self, key: str, path: Path) -> None:
        self.ob.put(self.store, key, path, chunk_size=PART, max_concurrency=10)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return bytes(self.ob.get_range(self.store, key, start=start, length=length))

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy (CopyObject): what a rename of an object in S3 costs."""
        self.ob.copy(self.store, src, dst)


class CrtClient:
    name = "awscrt"

    def __init__(self, endpoint: str, bucket: str, key: str, secret: str) -> None:
        from awscrt import auth, s3
        from awscrt import io as crtio
        from awscrt.http import HttpHeaders, HttpRequest

        self.s3, self.HttpHeaders, self.HttpRequest = s3, HttpHeaders, HttpRequest
        scheme, _, host = endpoint.partition("://")
        self.host = host.rstrip("/")
        self.bucket = bucket
        elg = crtio.EventLoopGroup()
        bootstrap = crtio.ClientBootstrap(elg, crtio.DefaultHostResolver(elg))
        tls = s3.S3RequestTlsMode.ENABLED if scheme == "https" else s3.S3RequestTlsMode.DISABLED
        self.client = s3.S3Client(
            bootstrap=bootstrap,
            region="us-east-1",
            tls_mode=tls,
            credential_provider=auth.AwsCredentialsProvider.new_static(key, secret),
            part_size=PART,
            multipart_upload_threshold=PART,
            throughput_target_gbps=10.0,
        )

    def _request(
        self,
        method: str,
        key: str,
        body: bytes | None,
        on_body: Callable[..., None] | None,
        headers: tuple[tuple[str, str], ...] = (),
        send_filepath: Path | None = None,
    ) -> None:
        http_headers = self.HttpHeaders([("Host", self.host), *headers])
        stream = None
        if body is not None:
            http_headers.add("Content-Length", str(len(body)))
            stream = io.BytesIO(body)
        if send_filepath is not None:
            http_headers.add("Content-Length", str(send_filepath.stat().st_size))
        request = self.HttpRequest(method, f"/{self.bucket}/{key}", http_headers, stream)
        types = self.s3.S3RequestType
        kind = types.GET_OBJECT if method == "GET" else types.PUT_OBJECT
        extra: dict[str, Any] = {}
        if any(name == "x-amz-copy-source" for name, _ in headers):
            kind, extra = types.DEFAULT, {"operation_name": "CopyObject"}
        done = self.client.make_request(
            type=kind,
            request=request,
            on_body=on_body,
            send_filepath=None if send_filepath is None else str(send_filepath),
            **extra,
        )
        done.finished_future.result()

    def get(self, key: str) -> bytes:
        chunks: list[bytes] = []
        self._request("GET", key, None, lambda chunk, **_: chunks.append(chunk))
        return b"".join(chunks)

    def put(self, key: str, data: bytes) -> None:
        self._request("PUT", key, data, None)

    def get_stream(self, key: str) -> int:
        total = [0]
        lock = threading.Lock()

        def on_body(chunk: bytes, **_: Any) -> None:
            with lock:
                total[0] += len(chunk)

        self._request("GET", key, None, on_body)
        return total[0]

    def put_big(self, key: str, data: bytes) -> None:
        self._request("PUT", key, data, None)

    def put_file(self, key: str, path: Path) -> None:
        # The CRT reads the file itself, in parallel parts: its fastest upload path, where a
        # Python stream would be read in small pieces under the interpreter lock.
        self._request("PUT", key, None, None, send_filepath=path)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        chunks: list[bytes] = []
        rng = (("Range", f"bytes={start}-{start + length - 1}"),)
        self._request("GET", key, None, lambda chunk, **_: chunks.append(chunk), rng)
        return b"".join(chunks)

    def copy(self, src: str, dst: str) -> None:
        """A server-side copy (CopyObject): what a rename of an object in S3 costs."""
        self._request("PUT", dst, b"", None, (("x-amz-copy-source", f"/{self.bucket}/{src}"),))


def measure(client: Any, small: int, big: bytes) -> dict[str, float]:
    name = client.name
    payload = os.urandom(4096)
    keys = [f"probe/{name}/small/{i:05d}" for i in range(small)]
    for k in keys[:8]:  # warm the connection pool
        client.put(k, payload)
    row: dict[str, float] = {}

    lat = []
    cpu0 = time.process_time()
    for k in keys:
        t = time.perf_counter()
        client.put(k, payload)
        lat.append(time.perf_counter() - t)
    row["put_ms"] = statistics.median(lat) * 1e3
    row["put_cpu_ms"] = (time.process_time() - cpu0) / len(keys) * 1e3

    lat = []
    cpu0 = time.process_time()
    for k in keys:
        t = time.perf_counter()
        assert len(client.get(k)) == 4096
        lat.append(time.perf_counter() - t)
    row["get_ms"] = statistics.median(lat) * 1e3
    row["get_cpu_ms"] = (time.process_time() - cpu0) / len(keys) * 1e3

    with cf.ThreadPoolExecutor(8) as pool:
        t = time.perf_counter()
        list(pool.map(lambda k: client.get(k), keys * 2))
        row["get8_ops"] = 2 * len(keys) / (time.perf_counter() - t)
        t = time.perf_counter()
        list(pool.map(lambda k: client.put(k, payload), keys * 2))
        row["put8_ops"] = 2 * len(keys) / (time.perf_counter() - t)

    gib = len(big) / 1024**3
    key = f"probe/{name}/big"
    cpu0, t = time.process_time(), time.perf_counter()
    client.put_big(key, big)
    row["put_big_mibs"] = len(big) / MIB / (time.perf_counter() - t)
    row["put_cpu_gib"] = (time.process_time() - cpu0) / gib
    cpu0, t = time.process_time(), time.perf_counter()
    assert client.get_stream(key) == len(big)
    row["get_big_mibs"] = len(big) / MIB / (time.perf_counter() - t)
    row["get_cpu_gib"] = (time.process_time() - cpu0) / gib
    return row


COLUMNS = [
    ("GET ms", "get_ms", "{:.2f}"),
    ("GET CPU ms", "get_cpu_ms", "{:.2f}"),
    ("PUT ms", "put_ms", "{:.2f}"),
    ("PUT CPU ms", "put_cpu_ms", "{:.2f}"),
    ("8-thr GET/s", "get8_ops", "{:,.0f}"),
    ("8-thr PUT/s", "put8_ops", "{:,.0f}"),
    ("big GET MiB/s", "get_big_mibs", "{:.0f}"),
    ("big PUT MiB/s", "put_big_mibs", "{:.0f}"),
    ("GET CPU s/GiB", "get_cpu_gib", "{:.2f}"),
    ("PUT CPU s/GiB", "put_cpu_gib", "{:.2f}"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--endpoint", help="an S3 endpoint URL (default: start a SeaweedFS)")
    ap.add_argument("--bucket", default="probe")
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--small", type=int, default=400, help="4 KiB objects per client")
    ap.add_argument("--clients", default="boto3,obstore,awscrt")
    args = ap.parse_args()
    server = None
    if args.endpoint:
        endpoint = args.endpoint
        key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    else:
        from common import start

        work = Path(tempfile.mkdtemp(prefix="s3cryptfs-clients-"))
        server, _env, _pw = start(work, args.bucket, b"unused")
        endpoint, key, secret = server.endpoint_url, server.access_key, server.secret_key
    kinds = {c.name: c for c in (Boto3Client, ObstoreClient, CrtClient)}
    big = os.urandom(args.big_mib * MIB)
    try:
        rows = []
        for name in args.clients.split(","):
            client = kinds[name](endpoint, args.bucket, key, secret)
            rows.append((name, measure(client, args.small, big)))
            print(f"{name}: done", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"{args.small} x 4 KiB objects per client; big object {args.big_mib} MiB")
    print("| client | " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(fmt.format(row[k]) for _, k, fmt in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
