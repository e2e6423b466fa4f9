"""Before a key version (or a whole previous key manager) stops unwrapping: wait for the running
mounts of the volume to let go of it (registry.py)."""

from __future__ import annotations

import sys
import time

from s3cryptfs import registry
from s3cryptfs.store.base import ObjectStore

POLL = 2.0


def wait_for_mounts(
    store: ObjectStore,
    prefix: str,
    provider: str,
    version: int | None,
    generation: int,
    wait: float,
    what: str,
    force: bool = False,
) -> bool:
    """True once no mount of the volume holds *provider* *version* (None: any version) and
    every live one has descriptor *generation* in force; False (with the reason on stderr)
    when *wait* seconds pass first, or a mount that stopped without unmounting holds some
    (unless *force*: what such a mount left behind is given up, as --force gives up objects;
    a running mount that would go on wrapping new files under it never is)."""
    deadline = time.monotonic() + wait
    announced = False
    while True:
        waiting, lost = registry.blockers(
            registry.read_all(store, prefix), provider, version, generation
        )
        if lost and not force:
            for record in lost:
                print(
                    f"s3cryptfs: refusing to retire {what}: {record.describe()} stopped "
                    f"{record.age / 60:.0f} min ago without unmounting, holding file versions "
                    "under it that are not in S3 yet; mount the volume there again (it uploads "
                    "them), or use --force to make them unreadable",
                    file=sys.stderr,
                )
            return False
        if not waiting:
            return True
        if time.monotonic() >= deadline:
            for record in waiting:
                print(
                    f"s3cryptfs: refusing to retire {what}: {record.describe()} still uses it "
                    f"(it runs descriptor generation {record.generation}, this change needs "
                    f"{generation}); wait until it has re-read the descriptor (its heartbeat "
                    f"is {record.heartbeat:.0f} s) and uploaded what it holds, or unmount it",
                    file=sys.stderr,
                )
            return False
        if not announced:
            print(
                f"waiting for {len(waiting)} running mount(s) to stop using {what}...",
                file=sys.stderr,
            )
            announced = True
        time.sleep(POLL)
