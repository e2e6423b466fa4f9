"""A name looked up in a directory not listed yet (vfs/listing.py, Listings.child): a small
directory, as its index tells, is listed once, and that listing answers the next names and
the readdir; a directory of unknown or large size is asked for the one name. Counted request
by request on the real server through the fault-injecting store's call log."""

from __future__ import annotations

import collections

import pytest

from s3cryptfs.vfs import listing
from tests.vfs.harness import CoreDriver, CoreFs


def calls(core: CoreFs, op: str) -> collections.Counter[str]:
    return collections.Counter(
        c.split(" ", 1)[1] for c in core.store.calls if c.startswith(op + " ")
    )


def project(driver: CoreDriver) -> None:
    driver.mkdir("proj")
    driver.mkdir("proj/src")
    for name in ("main.c", "util.c", "util.h"):
        driver.write_file(f"proj/src/{name}", name.encode() * 100)
    driver.core.call(driver.fs.drain, 5.0)
    driver.core.stop()
    driver.core.start()
    driver.core.store.calls.clear()


def test_names_missing_from_a_small_directory_cost_one_listing(
    core: CoreFs, driver: CoreDriver
) -> None:
    project(driver)
    # What git asks in each directory it enters, before it reads the directory.
    assert not driver.exists("proj/src/.git")
    assert not driver.exists("proj/src/.gitignore")
    assert driver.stat("proj/src/util.h").size == 600
    assert sorted(driver.listdir("proj/src")) == ["main.c", "util.c", "util.h"]
    assert calls(core, "list")["vol/proj/src/"] == 1
    assert not calls(core, "head")  # not one per name
    assert driver.read_file("proj/src/main.c") == b"main.c" * 100


def test_a_directory_too_large_for_one_listing_is_asked_for_the_one_name(
    core: CoreFs, driver: CoreDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(driver)
    monkeypatch.setattr(listing, "LIST_ON_LOOKUP_MAX", 2)
    assert not driver.exists("proj/src/.git")
    assert driver.stat("proj/src/util.h").size == 600
    assert calls(core, "head")["vol/proj/src/.git"] == 1
    assert calls(core, "list")["vol/proj/src/.git/"] == 1  # (is it a directory?)
    assert calls(core, "head")["vol/proj/src/util.h"] == 1
    assert calls(core, "list")["vol/proj/src/"] == 0
