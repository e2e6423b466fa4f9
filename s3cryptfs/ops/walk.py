"""Walk every object of a volume: paged LIST, then HEAD in parallel for the metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from s3cryptfs.errors import ObjectNotFound
from s3cryptfs.format.descriptor import META_DIR
from s3cryptfs.ops.progress import Progress
from s3cryptfs.store.base import ObjectInfo, ObjectStore
from s3cryptfs.vfs.attrindex import is_index_key


class Tracker(Protocol):
    """Told about every key in listing order, and when its work is over (ok or not)."""

    def submitted(self, key: str) -> None: ...

    def finished(self, key: str, ok: bool) -> None: ...


def object_keys(
    store: ObjectStore, prefix: str, start_after: str | None = None, indexes: bool = False
) -> Iterator[str]:
    """Every file object under *prefix*: no directory markers, nothing under ``.s3cryptfs/``
    but, with *indexes*, the directory indexes (sealed like files; never the descriptor)."""
    skip = f"{prefix}{META_DIR}/"
    for page in store.list_all(prefix, delimiter=None, start_after=start_after):
        for obj in page.objects:
            if obj.key.endswith("/"):
                continue
            if obj.key.startswith(skip) and not (indexes and is_index_key(prefix, obj.key)):
                continue
            yield obj.key


def walk_heads(
    store: ObjectStore,
    prefix: str,
    jobs: int,
    work: Callable[[ObjectInfo], bool | None],
    start_after: str | None = None,
    tracker: Tracker | None = None,
    indexes: bool = False,
    progress: Progress | None = None,
) -> None:
    """HEAD every object (and with *indexes* every directory index) and call *work* on it,
    *jobs* at a time; keys deleted meanwhile are passed over. *work* returns False for an
    object it could not finish. Exceptions from *work* propagate (callers catch what they
    expect)."""
    window = max(1, jobs) * 4  # bounded queue: a huge bucket never sits in memory
    if progress is not None:
        progress.count_in_background(
            lambda: sum(1 for _ in object_keys(store, prefix, start_after, indexes))
        )

    def one(key: str) -> None:
        ok: bool | None = True
        try:
            try:
                info = store.head(key)
            except ObjectNotFound:
                return
            ok = work(info)
        except BaseException:
            ok = False
            raise
        finally:
            if tracker is not None:
                tracker.finished(key, ok is not False)
            if progress is not None:
                progress.advance()

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        pending: list[Future[None]] = []
        try:
            for key in object_keys(store, prefix, start_after, indexes):
                if tracker is not None:
                    tracker.submitted(key)
                pending.append(pool.submit(one, key))
                if len(pending) >= window:
                    pending.pop(0).result()
            for fut in pending:
                fut.result()
        except BaseException:
            # Interrupted (or failed): finish only what is running, start nothing new. A key
            # never started stays unfinished for the tracker, so a checkpoint stops before it.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
