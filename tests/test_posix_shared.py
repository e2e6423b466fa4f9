"""The shared POSIX checks of tests/vfs/posix_checks.py through a real FUSE mount."""

from __future__ import annotations

import pytest

from tests.vfs.harness import MountDriver
from tests.vfs.posix_checks import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_mount(check, mounted) -> None:
    check(MountDriver(mounted))
