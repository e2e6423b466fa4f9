"""The mount's status in numbers (`s3cryptfs status`, the stats attribute, `df`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s3cryptfs.vfs.core import Filesystem


def status_of(fs: Filesystem) -> dict[str, Any]:
    """What `s3cryptfs status` shows: requests, errors, uploads, caches (no key managers:
    asking them is slow, and the status attribute adds them itself)."""
    with fs.store.stats_lock:
        requests = dict(fs.store.requests)
        errors = dict(fs.store.errors)
        moved = {"sent": fs.store.bytes_sent, "received": fs.store.bytes_received}
    kms: dict[str, dict[str, dict[str, float]]] = {}
    for (provider, op), calls in fs.codec.kms_calls.snapshot().items():
        kms.setdefault(provider, {})[op] = {
            "calls": calls.calls,
            "errors": calls.errors,
            "seconds": round(calls.seconds, 6),
        }
    out: dict[str, Any] = {
        "requests": requests,
        "errors": errors,
        "bytes": moved,
        "kms_calls": kms,
        "index_writes": fs.index.writes,
        "fuse": dict(fs.writes.counters),
    }
    out["uploads"] = {
        "queued": len(fs.uploader.queue),
        "in_flight": len(fs.uploader.in_flight),
        "queued_bytes": fs.uploader.queued_bytes,
    }
    out["conflicts"] = {
        "count": fs.uploader.conflicts,
        "latest": [k.removeprefix(fs.prefix) for k in fs.uploader.recent_conflicts],
    }
    helper = fs.writes.helper
    if helper is not None:
        out["upload_helper"] = {
            "pid": helper.pid,
            "calls": helper.calls,
            "restarts": helper.restarts,
            "disabled": helper.disabled,
        }
    out["streaming"] = {
        "active": len(fs.writes.streams),
        "sent_bytes": sum(s.sent_bytes for s in fs.writes.streams),
    }
    dirty = [n for n in fs.nodes.by_ino.values() if n.dirty()]
    out["dirty_files"] = len(dirty)
    out["dirty_bytes"] = sum(n.size for n in dirty)
    out["closed_not_sealed"] = len(fs.closed_pending)
    out["cache_dir"] = fs.cache_dir
    out["block_cache"] = {
        "bytes": fs.blocks.used,
        "budget": fs.blocks.budget,
        "hits": fs.blocks.hits,
        "misses": fs.blocks.misses,
    }
    out["read_ahead"] = fs.small.stats()  # small files fetched ahead of their open
    out["inodes"] = {
        "known": len(fs.nodes.by_ino),
        "limit": fs.nodes.limit,
        "dropped": fs.nodes.asked,  # files the kernel was asked to drop (--max-inodes)
    }
    if fs.disk is not None:
        out["disk_cache"] = {
            "bytes": fs.disk.size,
            "hits": fs.disk.hits,
            "misses": fs.disk.misses,
        }
    return out


def usage(fs: Filesystem) -> tuple[int, int]:
    """(bytes, files) of what this mount knows the volume holds, for `df`: the files of every
    directory listing it holds and every other file it has looked up (their size in S3,
    encrypted), with the files written here and not in S3 yet at their size here. Never a
    request: a LIST of the whole bucket per statfs would cost more than df is worth
    (docs/SEMANTICS.md says what df shows)."""
    total = files = 0
    nodes = list(fs.nodes.by_ino.values())
    for node in nodes:
        if node.is_dir and node.listing is not None:
            for info in node.listing.children.values():
                if not info.is_dir:
                    total += info.size
                    files += 1
    for node in nodes:
        if node.is_dir or node.unlinked:
            continue
        parent = fs.nodes.at(node.parent_path)
        listing = parent.listing if parent is not None else None
        listed = listing.children.get(node.name) if listing is not None else None
        if listed is not None and listed.is_dir:
            continue
        if listed is None:
            files += 1
            total += node.size if node.dirty() or node.remote is None else node.remote.body_size
        elif node.dirty():  # its newer content stands for the listed version
            total += node.size - listed.size
    return max(0, total), files
