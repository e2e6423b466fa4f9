"""The ceilings of bench/run.py: what the server gives a raw client, measured with awscrt and
with obstore (bench/clients.py) on the endpoint the mounts use, in the same run. The faster of
the two is each row's ceiling, so the mount is compared with the best raw client available, not
with one that is slow in its own right (boto3 spends milliseconds of Python per request).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clients import CrtClient, ObstoreClient
from common import timed

Client = CrtClient | ObstoreClient

MIB = 1024 * 1024
SMALL = 4096


@dataclass
class Ceiling:
    """One row: the best value, the client that gave it, and every client's value."""

    value: float
    client: str
    by_client: dict[str, float] = field(default_factory=dict)


# Row id -> unit; every ceiling is a rate (higher is faster), so "best" is the maximum.
ROWS = {
    "put_big": "MiB/s",
    "get_big": "MiB/s",
    "put_small_8": "objects/s",
    "get_small_seq": "objects/s",
    "get_range": "GETs/s",
    "copy_mv": "copies/s",  # CopyObject of the mv step's object (a rename in S3)
}


def measure(
    endpoint: str,
    bucket: str,
    key: str,
    secret: str,
    data: Path,
    files: int,
    ranged: int,
    repeats: int = 2,
    mv_data: Path | None = None,
) -> dict[str, Ceiling]:
    """Each client in turn for each row (so that drift in the server's speed over the run falls
    on both alike), *repeats* times, keeping each client's best: a ceiling is the most the
    server gives, and one try on a shared machine can land in someone else's busy second.
    Every step starts after os.sync() like the mount's."""
    size = data.stat().st_size
    clients = [cls(endpoint, bucket, key, secret) for cls in (CrtClient, ObstoreClient)]
    payload = os.urandom(SMALL)
    for c in clients:  # open the connections before anything is timed
        for i in range(8):
            c.put(f"ceiling/{c.name}/warm/{i}", payload)
    rnd = random.Random(2)
    offsets = [rnd.randrange(0, size - SMALL) for _ in range(ranged)]
    values: dict[str, dict[str, list[float]]] = {row: {} for row in ROWS}

    def quiet(fn) -> float:  # type: ignore[no-untyped-def]
        os.sync()
        return timed(fn)

    def put_big(c: Client) -> float:
        # A new key each time: an overwrite would add the old object's deletion to the server.
        big = f"ceiling/{c.name}/big{len(values['put_big'].get(c.name, []))}"
        return size / MIB / quiet(lambda: c.put_file(big, data))

    def get_big(c: Client) -> float:
        return size / MIB / quiet(lambda: c.get_stream(f"ceiling/{c.name}/big0"))

    def put_small_8(c: Client) -> float:
        keys = [f"ceiling/{c.name}/small/{i:05d}" for i in range(files)]

        def put_all() -> None:
            with cf.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda k: c.put(k, payload), keys))

        return files / quiet(put_all)

    def get_small_seq(c: Client) -> float:
        # One after the other, as `cat` reads files: latency, not parallelism.
        keys = [f"ceiling/{c.name}/small/{i:05d}" for i in range(files)]
        return files / quiet(lambda: [c.get(k) for k in keys])

    def get_range(c: Client) -> float:
        big = f"ceiling/{c.name}/big0"
        return ranged / quiet(lambda: [c.get_range(big, off, SMALL) for off in offsets])

    def copy_mv(c: Client) -> float:
        # A new destination each time, as a rename makes one.
        n = len(values["copy_mv"].get(c.name, []))
        return 1 / quiet(lambda: c.copy(f"ceiling/{c.name}/mv", f"ceiling/{c.name}/mv-{n}"))

    steps = [put_big, get_big, put_small_8, get_small_seq, get_range]
    if mv_data is not None:
        for c in clients:
            c.put_file(f"ceiling/{c.name}/mv", mv_data)
        steps.append(copy_mv)
    else:
        del values["copy_mv"]
    for step in steps:
        for _ in range(repeats):
            for c in clients:
                values[step.__name__].setdefault(c.name, []).append(step(c))
    print("ceilings measured", file=sys.stderr, flush=True)
    result = {}
    for row, tries in values.items():
        by_client = {name: max(rates) for name, rates in tries.items()}
        best = max(by_client, key=lambda name: by_client[name])
        result[row] = Ceiling(by_client[best], best, by_client)
    return result
