"""Fixtures of the kernel-free tests: a Filesystem on the session's SeaweedFS, no FUSE."""

from __future__ import annotations

import pytest

from tests.vfs.harness import CoreDriver, CoreFs


@pytest.fixture
def core(seaweed, bucket, tmp_path):
    """A fresh volume and a Filesystem serving it (no mount); stopped (drained) at the end."""
    fs = CoreFs(seaweed, bucket, tmp_path).init().start()
    yield fs
    fs.stop(drain=False)


@pytest.fixture
def driver(core) -> CoreDriver:
    return CoreDriver(core)
