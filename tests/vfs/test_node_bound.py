"""The bound on known inodes (--max-inodes, vfs/nodes.py NodeTable): which files the kernel is
asked to drop, what is never dropped, and that a dropped file comes back as it was without
asking S3 while its directory's listing is trusted. The kernel's side (the invalidation and
its FORGET) is tests/test_inode_bound.py."""

from __future__ import annotations

import gc
import os
import stat
import sys
import tracemalloc

from s3cryptfs.vfs.nodes import ROOT_INODE, ChildInfo, Node, NodeTable
from tests.vfs.harness import CoreDriver, CoreFs
from tests.vfs.test_readdir_stream import copies


def held_file(table: NodeTable, name: str) -> Node:
    node = Node(table.new_ino(), name, stat.S_IFREG | 0o644, 0, 0, 0, 0)
    table.add(node)
    table.held(node)
    return node


def root_table(limit: int) -> NodeTable:
    table = NodeTable(limit)
    root = Node(ROOT_INODE, "", stat.S_IFDIR | 0o755, 0, 0, 0, 0)
    root.lookups = 1
    table.add(root)
    return table


def forget(table: NodeTable, nodes: list[Node]) -> None:
    """What the kernel's FORGET of *nodes* does (Filesystem.forget)."""
    for node in nodes:
        node.lookups = 0
        table.maybe_drop(node)


def test_files_unused_since_the_last_sweep_go_first_oldest_first() -> None:
    table = root_table(limit=10)
    files = [held_file(table, f"f{i}") for i in range(11)]  # 12 nodes with the root
    assert table.over_limit()
    # Every file is marked as just used: the first pass takes the marks, the second the
    # oldest, down to nine tenths of the limit.
    first = table.to_forget()
    assert first == files[:3]
    forget(table, first)
    assert len(table.by_ino) == 9 and not table.over_limit()
    # f3 is used again; f4 is not: when the table grows past its limit again, f4 goes
    # before f3 although f3 is older.
    table.held(files[3])
    more = [held_file(table, f"g{i}") for i in range(2)]
    assert table.over_limit()
    second = table.to_forget()
    assert files[3] not in second
    assert second == [files[4], files[5]]
    assert table.asked == 5
    assert all(n in table.by_ino.values() for n in [files[3], *more])


def test_directories_open_files_and_files_not_in_s3_are_never_dropped() -> None:
    table = root_table(limit=4)
    directory = Node(table.new_ino(), "d", stat.S_IFDIR | 0o755, 0, 0, 0, 0)
    table.add(directory)
    table.held(directory)
    opened = held_file(table, "d/open")
    opened.opens = 1
    written = held_file(table, "d/written")
    written.w.local = object()  # type: ignore[assignment]  # a sealed version not in S3 yet
    unlinked = held_file(table, "d/unlinked")
    unlinked.unlinked = True
    plain = [held_file(table, f"d/f{i}") for i in range(3)]
    chosen = table.to_forget()
    assert set(map(id, chosen)) <= set(map(id, plain))
    assert len(chosen) == 3  # 8 nodes, down to 3 if it could: only the plain files may go


def test_nodes_the_kernel_does_not_hold_are_dropped_without_asking_it() -> None:
    table = root_table(limit=10)
    listed_ahead = []
    for i in range(8):  # made by a listing whose readdir has not sent them yet
        node = Node(table.new_ino(), f"f{i}", stat.S_IFREG | 0o644, 0, 0, 0, 0)
        listed_ahead.append(table.add(node))
    held = [held_file(table, f"g{i}") for i in range(3)]
    replying = held_file(table, "g3")
    assert table.over_limit()  # 13 nodes
    assert table.to_forget(keep=replying) == []  # 13 - 4 = 9: nine tenths of 10
    assert len(table.by_ino) == 9
    assert all(table.get(n.ino) is n for n in [*held, replying])
    # A node dropped while its lookup waited is put back when the reply goes out...
    dropped = listed_ahead[0]
    assert table.get(dropped.ino) is None
    assert table.held(dropped) is dropped and table.get(dropped.ino) is dropped
    assert dropped.lookups == 1
    # ...unless another node took its path meanwhile: that one is the answer.
    late = listed_ahead[1]
    newer = held_file(table, late.path)
    assert table.held(late) is newer and newer.lookups == 2 and late.lookups == 0


def test_a_kernel_that_keeps_what_it_was_asked_to_drop_does_not_make_every_reply_a_sweep() -> (
    None
):
    table = root_table(limit=100)
    for i in range(100):
        held_file(table, f"f{i}")
    assert table.over_limit()
    asked = table.to_forget()
    assert len(asked) == 101 - 90
    # No FORGET comes: the files asked about count as gone, so the next sweep waits until
    # a tenth of the limit more nodes arrived, and does not ask for the same files again.
    for i in range(10):
        held_file(table, f"g{i}")
        assert not table.over_limit()
    held_file(table, "h")
    assert table.over_limit()
    again = table.to_forget()
    assert again and not set(map(id, again)) & set(map(id, asked))


def test_a_dropped_file_comes_back_from_the_listing_without_a_head(
    core: CoreFs, driver: CoreDriver
) -> None:
    names = [f"f{i:04d}" for i in range(300)]
    copies(core, driver, names)  # no index entries: the first listing HEADs each
    core.stop()
    core.start(max_inodes=100, dir_ttl=300.0)
    fs = driver.fs
    wide = driver._lookup("wide")
    listed = driver._run(fs.readdir, wide.ino)
    for _, node in listed:
        fs.nodes.held(node)  # what the kernel counts for each readdir entry
    before = {name: fs.attr(node) for name, node in listed}
    kept_open = driver.open("wide/f0000", os.O_RDONLY)
    assert fs.nodes.over_limit()
    chosen = fs.nodes.to_forget()
    assert len(chosen) == len(fs.nodes.by_ino) - 90
    assert all(n.path.startswith("wide/f") for n in chosen)
    assert all(n.path != "wide/f0000" for n in chosen)
    fs.forget([(n.ino, n.lookups) for n in chosen])
    assert len(fs.nodes.by_ino) == 90
    head_calls = sum(1 for c in core.store.calls if c.startswith("head "))
    for node in chosen:
        again = fs.attr(driver._lookup(node.path))
        was = before[node.name]
        assert (again.mode, again.size, again.uid, again.mtime_ns) == (
            was.mode,
            was.size,
            was.uid,
            was.mtime_ns,
        )
    assert sum(1 for c in core.store.calls if c.startswith("head ")) == head_calls
    assert driver.read_at(kept_open, 0, 200) == b"x" * 100
    driver.close(kept_open)


def test_a_file_renamed_after_it_was_asked_about_may_be_asked_again() -> None:
    # The kernel is asked by name: asked under the name it had, a renamed file stays in its
    # cache, and would otherwise count as on its way out for good.
    table = root_table(limit=10)
    files = [held_file(table, f"f{i}") for i in range(11)]
    asked = table.to_forget()
    assert files[0] in asked
    table.move(files[0], "renamed")
    files[0].recent = False
    for i in range(2):
        held_file(table, f"g{i}")
    again = table.to_forget()
    assert files[0] in again


def test_a_listed_file_past_the_bound_costs_only_its_listing_entry(
    core: CoreFs, driver: CoreDriver
) -> None:
    """A walk of 2,000 files with room for 100 inodes, swept as the adapter sweeps (after each
    reply's entries): the files the kernel dropped keep only their listing entry, index entry
    and strings. Counted by tracemalloc: about 650 bytes each (of which ~130 are the S3
    client's and the test's log capture); a dropped node left behind (node, path, table
    slots) would add about 300."""
    names = [f"f{i:05d}" for i in range(2000)]
    copies(core, driver, names)
    core.stop()
    core.start(max_inodes=100, dir_ttl=300.0)
    fs = driver.fs
    wide = driver._lookup("wide")
    driver._lookup("wide/f00000")  # the S3 client's first-use allocations, out of the count
    core.store.record = False
    seen: list[int] = []

    def emit(batch: list) -> None:
        for _, node in batch:
            fs.nodes.held(node)  # what the kernel counts for each readdir entry
            seen.append(node.ino)
            if fs.nodes.over_limit():
                fs.forget([(n.ino, n.lookups) for n in fs.nodes.to_forget()])

    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        core.call(fs.readdir_stream, wide.ino, emit)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(seen) == 2001 and len(fs.nodes.by_ino) <= 100
    per_file = sum(s.size_diff for s in after.compare_to(before, "filename")) / 2001
    assert per_file < 800, f"{per_file:.0f} bytes per listed file"


def test_a_file_two_sweeps_chose_is_asked_about_once() -> None:
    """Chosen by a sweep, looked up again before its name went out, then chosen by the next
    sweep: its name goes to the kernel once, and counts once among the dropped."""
    from types import SimpleNamespace

    from s3cryptfs.fuse_ops import FuseOperations

    table = root_table(limit=10)
    for i in range(11):
        held_file(table, f"f{i}")
    fs = SimpleNamespace(nodes=table, reader=SimpleNamespace(nursery=None), pages=SimpleNamespace())
    ops = FuseOperations(fs)  # type: ignore[arg-type]
    first = table.to_forget()
    ops._to_drop += first
    table.held(first[0])  # a lookup takes it back
    first[0].recent = False  # (a sweep in between took its second chance)
    held_file(table, "g")
    second = table.to_forget()
    assert first[0] in second
    ops._to_drop += second
    names = ops._names_to_drop()
    assert len(names) == len(set(names)) == len({id(n) for n in first + second})
    assert table.asked == len(names)


def test_a_node_keeps_its_flags_in_one_slot_and_its_open_counts_aside() -> None:
    """A wide directory holds a node per file: its flags are bits of one slot and its open
    counts and lock live in the side record few files have (dropped again at the last close),
    so a listed file's node stays at 144 bytes (192 with a slot each and the lock in its
    own); the fields still read and write as before."""
    node = Node(5000, "d/f", stat.S_IFREG | 0o644, 0, 0, 0, 0)
    assert sys.getsizeof(node) <= 144
    node.unlinked = True
    node.recent = True
    node.recent = False
    node.attrs_stored = True
    assert (node.unlinked, node.recent, node.attrs_stored, node.mode_set_here) == (
        True,
        False,
        True,
        False,
    )
    assert node.opens == node.writers == 0 and node._extra is None  # nothing set aside yet
    node.opens += 1
    node.writers += 1
    assert (node.opens, node.writers) == (1, 1) and node._extra is not None
    node.opens -= 1
    assert node.opens == 0 and node.writers == 1
    node.writers -= 1  # the last close: a record holding only defaults goes
    assert node._extra is None and (node.opens, node.writers) == (0, 0)
    node.opens = 1
    node.error = "failed"
    node.opens = 0
    assert node._extra is not None and node.error == "failed"  # kept: it holds something


def test_what_a_node_learnt_of_its_version_goes_with_it() -> None:
    """A node made from a listing shares the listing's entry as its version in S3, so what
    the mount learns of the version it opened (metadata, the reader's view, whether its
    attributes are known) is kept on the node: a new version starts without any of it, a
    copy in S3 (rename) keeps all but the reader's view, and the listing's entry never
    carries it to the next node made from it."""
    listed = ChildInfo(False, 4124, '"e1"', 7)
    node = Node(5000, "d/f", stat.S_IFREG | 0o644, 0, 0, 0, 0)
    node.remote = listed
    node.metadata = {"m": "1"}
    node.version = "a reader's version"  # type: ignore[assignment]
    node.attrs_known = node.companion_read = True
    moved = node.version
    assert node.copied_to('"e2"') == moved
    assert node.remote is not listed and node.remote is not None
    assert (node.remote.etag, node.remote.body_size) == ('"e2"', 4124)
    assert node.metadata == {"m": "1"} and node.attrs_known and node.companion_read
    assert node.version is None
    node.remote = ChildInfo(False, 10, '"e3"')  # another version
    assert node.metadata is None and node.version is None
    assert not node.attrs_known and not node.companion_read
    assert node._extra is None  # nothing left aside
    assert not hasattr(listed, "metadata")  # (a slot object: nothing to carry over)
    again = Node(5001, "d/f", stat.S_IFREG | 0o644, 0, 0, 0, 0)
    again.remote = listed
    assert again.metadata is None and not again.attrs_known
