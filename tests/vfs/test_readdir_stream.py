"""readdir answered page by page (vfs/listing.py stream): the first entries of a wide
directory are ready after its first LIST page, not after the last one."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import tracemalloc

import pytest

from s3cryptfs.errors import AccessDenied
from s3cryptfs.vfs.attrindex import SELF
from tests.vfs.harness import CoreDriver, CoreFs


def copies(core: CoreFs, driver: CoreDriver, names: list[str]) -> None:
    """Objects that arrived without the mount (server-side copies of one file): no index
    describes them, so each needs a HEAD."""
    driver.mkdir("wide")
    driver.write_file("wide/seed", b"x" * 100)
    core.call(driver.fs.drain, 5.0)
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: core.store.copy("vol/wide/seed", f"vol/wide/{n}"), names))


def stream(core: CoreFs, driver: CoreDriver, path: str) -> list[tuple[list[str], int]]:
    """Each batch's names, with how many LIST requests had been made when it came."""
    node = driver._lookup(path)
    batches: list[tuple[list[str], int]] = []
    before = core.store.calls.count(f"list vol/{path}/")

    def emit(batch: list) -> None:
        lists = core.store.calls.count(f"list vol/{path}/") - before
        batches.append(([name for name, _ in batch], lists))

    core.call(driver.fs.readdir_stream, node.ino, emit)
    return batches


def test_first_entries_come_after_the_first_page(core: CoreFs, driver: CoreDriver) -> None:
    names = [f"f{i:05d}" for i in range(2300)]  # three LIST pages of 1,000
    copies(core, driver, names)
    core.stop()
    core.start()
    driver._lookup("wide")  # (its own LIST of "wide/", to see that it is a directory)
    core.store.calls.clear()
    batches = stream(core, driver, "wide")
    first, lists_then = batches[0]
    # the first page's entries, not the whole directory's; later pages are fetched meanwhile
    # (at most two ahead), each once
    assert 900 <= len(first) <= 1000
    assert 1 <= lists_then <= 3
    assert core.store.calls.count("list vol/wide/") == 3
    seen = [n for batch, _ in batches for n in batch]
    assert sorted(seen) == sorted([*names, "seed"])
    assert len(seen) == len(set(seen))
    # the listing the stream left is the directory's, for the next readdir and lookups
    assert driver.listdir("wide") == sorted([*names, "seed"])


def test_entries_streamed_by_a_first_listing_are_trusted_as_long_as_it(
    core: CoreFs, driver: CoreDriver
) -> None:
    """What a readdir answers from a LIST still in flight goes to the kernel with the
    listing's own trust (--dir-cache-ttl from its start), not the adapter's shortest: a
    `cat *` after its glob would otherwise send a LOOKUP per name once that has passed."""
    names = [f"f{i:04d}" for i in range(1200)]  # two pages: the first is answered mid-LIST
    copies(core, driver, names)
    core.stop()
    core.start(dir_ttl=30.0)
    node = driver._lookup("wide")
    ttls: list[float] = []

    def emit(batch: list) -> None:
        ttls.extend(driver.fs.attr(child).ttl for _, child in batch)

    core.call(driver.fs.readdir_stream, node.ino, emit)
    assert len(ttls) == len(names) + 1
    assert min(ttls) > 20.0
    # the directory's files are trusted no longer than its listing
    assert max(ttls) <= 30.0


def test_a_listing_in_flight_vouches_only_for_the_versions_it_shows(
    core: CoreFs, driver: CoreDriver
) -> None:
    """Files known from an expired listing are trusted anew once the next LIST shows them in
    the version the mount knows (a second `cat *`); one changed by another writer since is
    not, until the mount has looked at it again."""
    names = [f"f{i:04d}" for i in range(1200)]
    copies(core, driver, names)
    core.stop()
    core.start(dir_ttl=30.0)
    node = driver._lookup("wide")
    driver.write_file("other", b"another version")
    core.call(driver.fs.drain, 5.0)
    core.call(driver.fs.readdir_stream, node.ino, lambda batch: None)  # the files known
    assert node.listing is not None
    node.listing.fetched_at -= 31.0  # that listing has expired
    # another writer replaces one file (another object: another ETag)
    core.store.copy("vol/other", "vol/wide/f0007")
    ttls: dict[str, float] = {}

    def emit(batch: list) -> None:
        ttls.update((name, driver.fs.attr(child).ttl) for name, child in batch)

    core.call(driver.fs.readdir_stream, node.ino, emit)
    assert len(ttls) == len(names) + 1
    assert ttls["f0007"] == 0.0
    others = [t for name, t in ttls.items() if name != "f0007"]
    assert min(others) > 20.0


def test_a_directory_replaces_a_file_of_its_name_across_pages(
    core: CoreFs, driver: CoreDriver
) -> None:
    """"d" (a file), then keys between "d" and "d/" ("d-0000"...), then "d/x": one entry "d",
    a directory, even when "d/" is on a later LIST page than "d"."""
    between = [f"d-{i:04d}" for i in range(1100)]
    copies(core, driver, ["d", *between])
    core.store.copy("vol/wide/seed", "vol/wide/d/x")
    core.stop()
    core.start()
    batches = stream(core, driver, "wide")
    seen = [n for batch, _ in batches for n in batch]
    assert seen.count("d") == 1
    assert len(batches) >= 2
    node = driver._lookup("wide/d")
    assert node.is_dir


def test_files_listed_by_their_heads_keep_attributes_not_metadata(
    core: CoreFs, driver: CoreDriver
) -> None:
    """A wide directory's files, HEADed for `ls -l`, keep their mode and owner but not the
    object's metadata (the bulk of what a known file costs): what needs it later (extended
    attributes, an open) reads it again."""
    copies(core, driver, ["plain"])
    driver.write_file("wide/tagged", b"a file with an extended attribute")
    node = driver._lookup("wide/tagged")
    core.call(driver.fs.xattrs.setxattr, node.ino, b"user.colour", b"blue")
    driver.chmod("wide/tagged", 0o640)
    core.call(driver.fs.drain, 5.0)
    client = core.store._client
    for key in [o["Key"] for o in client.list_objects_v2(Bucket=core.url.bucket)["Contents"]]:
        if "/.s3cryptfs/dirs/" in key:  # no index: every file needs a HEAD
            client.delete_object(Bucket=core.url.bucket, Key=key)
    core.stop()
    core.start()
    listed = dict(driver._run(driver.fs.readdir, driver._lookup("wide").ino))
    assert sorted(listed) == ["plain", "seed", "tagged"]
    tagged = listed["tagged"]
    assert tagged.remote is not None and tagged.attrs_known
    assert tagged.metadata is None  # shed after the HEAD
    assert driver.stat("wide/tagged").mode & 0o777 == 0o640
    assert core.call(driver.fs.xattrs.getxattr, tagged.ino, b"user.colour") == b"blue"
    assert driver.read_file("wide/tagged") == b"a file with an extended attribute"
    assert driver.read_file("wide/plain") == b"x" * 100


def test_heads_of_a_listing_are_retried_and_a_refusal_fails_the_readdir(
    core: CoreFs, driver: CoreDriver
) -> None:
    """The HEADs of unindexed files go out together (ObjectStore.head_many): one that fails
    transiently is sent again, and one S3 refuses fails the readdir instead of leaving a file
    without its attributes."""
    names = [f"f{i:03d}" for i in range(40)]
    copies(core, driver, names)
    core.stop()
    core.start()
    core.store.fail("head", "wide/f01", times=3)  # three HEADs of f010..f019 fail
    listed = dict(driver._run(driver.fs.readdir, driver._lookup("wide").ino))
    assert sorted(listed) == sorted([*names, "seed"])
    for node in listed.values():
        assert node.remote is not None and node.attrs_known
    assert sum(c.startswith("head vol/wide/f01") for c in core.store.calls) >= 13

    core.stop()
    client = core.store._client
    for key in [o["Key"] for o in client.list_objects_v2(Bucket=core.url.bucket)["Contents"]]:
        if "/.s3cryptfs/dirs/" in key:  # the index the first pass wrote: HEADs again
            client.delete_object(Bucket=core.url.bucket, Key=key)
    core.start()
    core.store.fail("head", "wide/f020", times=None, error=lambda w: AccessDenied(f"{w}: no"))
    with pytest.raises(PermissionError):  # AccessDenied, through the errno table
        driver._run(driver.fs.readdir, driver._lookup("wide").ino)
    core.store.heal()
    assert len(dict(driver._run(driver.fs.readdir, driver._lookup("wide").ino))) == 41


def listed_cost(core: CoreFs, driver: CoreDriver, path: str) -> float:
    """Bytes per entry a readdir of *path* leaves in memory (tracemalloc, after a collection)."""
    node = driver._lookup(path)
    core.store.record = False
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        count = len(driver._run(driver.fs.readdir, node.ino))
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / count


def test_a_listed_file_costs_well_under_a_kilobyte(core: CoreFs, driver: CoreDriver) -> None:
    """What a wide directory's files cost once listed with their attributes (node, listing
    entry, index entry, their strings and table slots), counted by tracemalloc: about 890
    bytes, of which the S3 client's and the test's own about 130 (990 before the node shared
    its listing's entry as its version in S3 instead of a copy, and kept its lock aside;
    1,215 before directory-only and rarely set node fields went aside, names were shared
    with the index and modes and owners between files). Listed with the directory's index
    (the next mount), about 720 bytes: the listing entry shares the index entry's ETag,
    mtime and name (810 before the node shared the entry, 1,030 before that)."""
    names = [f"f{i:05d}" for i in range(2000)]
    copies(core, driver, names)
    core.stop()
    core.start()
    per_file = listed_cost(core, driver, "wide")
    assert per_file < 940, f"{per_file:.0f} bytes per listed file"
    core.stop()  # (writes the index the HEADs made)
    core.start()
    per_file = listed_cost(core, driver, "wide")
    assert per_file < 770, f"{per_file:.0f} bytes per file listed with the index"
    wide = driver._lookup("wide")
    assert wide.listing is not None and wide.index is not None
    index_names = {id(n) for n in wide.index}
    for name, info in wide.listing.children.items():
        if name == "seed":
            continue
        entry = wide.index[name]
        assert info.attrs is entry and info.etag is entry.etag, name
        assert info.mtime_ns is entry.mtime_ns and id(name) in index_names, name
        node = driver.fs.nodes.at(f"wide/{name}")
        assert node is not None and node.remote is info, name  # one record, not two
        assert node.attrs_known and node.metadata is None, name


def test_the_index_keeps_only_names_the_directory_still_holds(
    core: CoreFs, driver: CoreDriver
) -> None:
    """A full listing tells the index writer which names exist (by reference to the listing's
    own table, not a copy): a name deleted by another machine leaves the index at its next
    write, and the names this mount creates or removes after the listing are followed."""
    driver.mkdir("d")
    for name in ("a", "b", "gone"):
        driver.write_file(f"d/{name}", name.encode())
    core.call(driver.fs.drain, 5.0)
    assert {"a", "b", "gone"} <= set(driver.fs.index._fetch("d"))
    core.store._client.delete_object(Bucket=core.url.bucket, Key="vol/d/gone")  # elsewhere
    core.stop()
    core.start()
    assert driver.listdir("d") == ["a", "b"]  # a full listing, without "gone"
    driver.write_file("d/new", b"created after the listing")
    driver.unlink("d/b")
    core.call(driver.fs.drain, 5.0)
    names = set(driver.fs.index._fetch("d")) - {SELF}
    assert names == {"a", "new"}, names
