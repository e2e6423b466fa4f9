"""Hard links: refused by default (EPERM); with --hard-links copy, stored as copies so that the
tools that copy trees with hard links (cp -a, rsync -aH, tar x) bring every name across."""

from __future__ import annotations

import errno
import os
import subprocess
import tarfile

import pytest


def _tree_with_links(root) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"shared content\n")
    os.link(root / "a", root / "sub" / "b")
    (root / "plain").write_bytes(b"plain\n")
    os.chmod(root / "a", 0o640)


def _names(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_hard_links_are_refused_by_default_and_other_files_still_arrive(mounted, tmp_path):
    m = mounted.mountpoint
    (m / "orig").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        os.link(m / "orig", m / "hard")
    assert exc.value.errno == errno.EPERM
    assert not (m / "hard").exists()
    src = tmp_path / "src"
    _tree_with_links(src)
    done = subprocess.run(["cp", "-a", str(src), str(m / "copy")], capture_output=True)
    assert done.returncode == 1 and b"Operation not permitted" in done.stderr
    got = _names(m / "copy")
    # One of the two names of the link made it (which one depends on cp's walk), with its content.
    linked = [got[n] for n in ("a", "sub/b") if n in got]
    assert linked == [b"shared content\n"]
    assert got["plain"] == b"plain\n"
    assert len(got) == 2


def test_copy_mode_brings_every_name_across_as_separate_files(volume, tmp_path):
    volume.init()
    volume.mount("--hard-links", "copy")
    m = volume.mountpoint
    src = tmp_path / "src"
    _tree_with_links(src)
    subprocess.run(["cp", "-a", str(src), str(m / "cp")], check=True)
    subprocess.run(["rsync", "-aH", f"{src}/", str(m / "rsync")], check=True)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="t")
    subprocess.run(["tar", "xf", str(archive), "-C", str(m)], check=True)
    want = _names(src)
    for d in ("cp", "rsync", "t"):
        assert _names(m / d) == want, d
        assert os.stat(m / d / "sub" / "b").st_mode & 0o777 == 0o640
    # A link made while the file is open for writing carries what was written so far.
    with open(m / "cp" / "plain", "ab") as f:
        f.write(b"more\n")
        f.flush()
        os.link(m / "cp" / "plain", m / "cp" / "linked")
    assert (m / "cp" / "linked").read_bytes() == b"plain\nmore\n"
    # Separate files from then on: writing one name leaves the other as it was.
    (m / "cp" / "a").write_bytes(b"changed\n")
    assert (m / "cp" / "sub" / "b").read_bytes() == b"shared content\n"
    with pytest.raises(OSError) as exc:
        os.link(m / "cp", m / "dirlink")
    assert exc.value.errno == errno.EPERM
    with pytest.raises(FileExistsError):
        os.link(m / "cp" / "a", m / "cp" / "plain")
    volume.remount("--hard-links", "copy")
    assert _names(m / "rsync") == want
    assert (m / "cp" / "linked").read_bytes() == b"plain\nmore\n"
    assert (m / "cp" / "sub" / "b").read_bytes() == b"shared content\n"
