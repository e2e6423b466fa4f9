"""Walk every object of a volume: paged LIST, then HEAD in parallel for the metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from s3cryptfs.errors import ObjectNotFound
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.store.s3 import ObjectInfo, S3Store


def object_keys(store: S3Store, prefix: str) -> Iterator[str]:
    """Every file object under *prefix*: no directory markers, nothing under ``.s3cryptfs/``."""
    skip = f"{prefix}{META_DIR}/"
    for page in store.list_all(prefix, delimiter=None):
        for obj in page.objects:
            if obj.key.startswith(skip) or obj.key.endswith("/"):
                continue
            yield obj.key


def walk_heads(
    store: S3Store,
    prefix: str,
    jobs: int,
    work: Callable[[ObjectInfo], None],
) -> None:
    """HEAD every object and call *work* on it, *jobs* at a time; keys deleted meanwhile are
    passed over. Exceptions from *work* propagate (callers catch what they expect)."""
    window = max(1, jobs) * 4  # bounded queue: a huge bucket never sits in memory

    def one(key: str) -> None:
        try:
            info = store.head(key)
        except ObjectNotFound:
            return
        work(info)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        pending: list[Future[None]] = []
        for key in object_keys(store, prefix):
            pending.append(pool.submit(one, key))
            if len(pending) >= window:
                pending.pop(0).result()
        for fut in pending:
            fut.result()
