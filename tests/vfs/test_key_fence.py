"""A key a mount took before a descriptor change must not be erased under it: until the work
that took it has queued its upload (or written its object), the mount's record names the
generation that work began under, so `keys retire` and `migrate` wait (codec.fence,
registry.blockers)."""

from __future__ import annotations

import dataclasses

import pytest

from s3cryptfs import registry
from tests.vfs.harness import CoreDriver, CoreFs


def record(generation: int, holds: list[tuple[str, int]]) -> registry.MountRecord:
    return registry.MountRecord("m", "host", 1, generation, heartbeat=30.0, holds=holds)


@pytest.mark.parametrize(
    ("sealer", "size"),
    [("seal_small_now", 100), ("seal_stream", 100 * 1024)],
    ids=["small, on the event loop", "larger, in a worker thread"],
)
def test_a_seal_that_began_before_a_refresh_holds_the_old_generation(
    core: CoreFs, driver: CoreDriver, sealer: str, size: int
) -> None:
    codec = driver.fs.codec
    before = codec.descriptor.generation
    seen: list[int] = []
    real = getattr(codec, sealer)

    def seal_across_a_refresh(*args, **kwargs):  # type: ignore[no-untyped-def]
        # The key is taken (from the pool, under the old generation's key version) while a
        # refresh lands: a `keys rotate` and the pool emptied, as codec.refresh does.
        sealed = real(*args, **kwargs)
        codec.descriptor = dataclasses.replace(codec.descriptor, generation=before + 1)
        if codec.pool is not None:
            codec.pool.clear()
        seen.append(codec.generation_in_force())
        return sealed

    setattr(codec, sealer, seal_across_a_refresh)
    try:
        driver.write_file("f.txt", b"k" * size)
    finally:
        setattr(codec, sealer, real)
    on_loop = driver.fs.writes.counters["seals_on_event_loop"]
    assert on_loop == (sealer == "seal_small_now"), on_loop  # the path meant was taken
    assert seen == [before]
    # Until then a retire that needs the new generation waited for this mount:
    waiting, _ = registry.blockers([record(seen[0], [])], "s3cryptfs-password", 1, before + 1)
    assert waiting
    # Once the upload is queued, its version is a hold of its own and the fence is gone.
    assert codec.generation_in_force() == before + 1
    held = driver.fs.queued_versions()
    assert held, "the queued upload names its key version"


def test_fences_nest_and_the_oldest_counts(core: CoreFs, driver: CoreDriver) -> None:
    codec = driver.fs.codec
    g = codec.descriptor.generation
    with codec.fence():
        codec.descriptor = dataclasses.replace(codec.descriptor, generation=g + 1)
        with codec.fence():
            codec.descriptor = dataclasses.replace(codec.descriptor, generation=g + 2)
            assert codec.generation_in_force() == g
        assert codec.generation_in_force() == g
    assert codec.generation_in_force() == g + 2
