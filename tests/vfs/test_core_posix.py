"""The shared POSIX checks against the filesystem core itself: no kernel, no FUSE."""

from __future__ import annotations

import pytest

from tests.vfs.posix_checks import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_core(check, driver) -> None:
    check(driver)
