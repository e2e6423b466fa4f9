"""An attacker who can write to the bucket (boto3 here), and nothing else: planted privileges
(setuid, setgid and sticky bits in object metadata and in directory indexes) and planted huge
objects that would be read whole (descriptor, directory index, multipart manifest, symlink,
gateway single-AEAD body). Each is refused or masked, and nothing oversized is downloaded:
checked by the peak memory of the process and by its S3 request counters."""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
import subprocess
import sys

import pytest

from s3cryptfs.format import v1
from s3cryptfs.vfs.attrindex import index_key

MIB = 1024 * 1024
PLANTED = 48 * MIB  # several times every limit under test (the largest is 32 MiB)
GROWTH = 16 * MIB  # how much more memory than usual a refused read may take


def mode_of(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def set_metadata(s3client, bucket: str, key: str, to: str | None = None, **changes: str) -> None:
    """Rewrite an object's metadata in place, or on a copy at *to* (what a bucket writer can
    do to any object)."""
    head = s3client.head_object(Bucket=bucket, Key=key)
    meta = {**head["Metadata"], **changes}
    s3client.copy_object(
        Bucket=bucket,
        Key=to or key,
        CopySource={"Bucket": bucket, "Key": key},
        Metadata=meta,
        MetadataDirective="REPLACE",
    )


# --- planted privileges ------------------------------------------------------------------------


def test_setuid_setgid_and_sticky_bits_from_s3_are_masked(make_volume, s3client):
    vol = make_volume()
    vol.init()
    vol.mount()
    m = vol.mountpoint
    (m / "own").write_bytes(b"chmod u+s through the mount")
    os.chmod(m / "own", 0o4755)
    (m / "shared").mkdir()
    os.chmod(m / "shared", 0o3777)
    os.chmod(m, 0o1777)
    (m / "planted").write_bytes(b"the attacker sets its mode")
    # what this session chose itself, it shows
    assert (mode_of(m / "own"), mode_of(m / "shared"), mode_of(m)) == (0o4755, 0o3777, 0o1777)
    vol.umount()
    planted = {"s3cryptfs-mode": "107777"}
    set_metadata(s3client, vol.bucket, vol.prefix + "planted", **planted)
    # and on a copy in a directory no mount wrote: no index there, so a lookup asks S3 for
    # the name itself (a HEAD), and the mode comes from the planted metadata
    set_metadata(s3client, vol.bucket, vol.prefix + "planted", vol.prefix + "loose/x", **planted)

    vol.mount()
    assert mode_of(m / "loose" / "x") == 0o777
    # in place, the copy kept the ETag: the directory index, which the attacker cannot
    # forge, still describes it
    assert mode_of(m / "planted") == 0o644
    os.listdir(m)  # "own" and "shared" from the directory index
    assert mode_of(m / "own") == 0o755
    # a directory's sticky and setgid bits come from its sealed index: kept (a /tmp stays one)
    assert mode_of(m / "shared") == 0o3777
    assert mode_of(m) == 0o1777
    assert os.stat(m / "loose" / "x").st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0
    # masked on the way to the kernel only: what is stored stays as it was
    own = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + "own")["Metadata"]
    assert own["s3cryptfs-mode"] == "104755"
    vol.umount()

    vol.mount("--trust-attributes")
    assert mode_of(m / "loose" / "x") == 0o7777
    assert mode_of(m / "own") == 0o4755
    assert mode_of(m / "shared") == 0o3777
    assert mode_of(m) == 0o1777


def test_get_applies_permission_bits_only(volume, s3client, tmp_path):
    volume.init()
    local = tmp_path / "tool"
    local.write_bytes(b"#!/bin/sh\necho planted\n")
    obj = f"s3://{volume.bucket}/{volume.prefix}tool"
    volume.run("put", local, obj, *volume.common_args())
    set_metadata(
        s3client,
        volume.bucket,
        volume.prefix + "tool",
        **{"s3cryptfs-mode": "106777", "s3cryptfs-uid": "4242", "s3cryptfs-gid": "4242"},
    )
    volume.run("get", obj, tmp_path / "out", *volume.common_args())  # as root
    st = os.stat(tmp_path / "out")
    assert stat.S_IMODE(st.st_mode) == 0o777
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_suid_and_dev_mount_options_are_refused(volume, tmp_path):
    """From -o, from the configuration file's options and from an fstab line (mount.s3cryptfs);
    refused before anything is read from S3 (the volume does not even exist)."""

    def mount(*extra: str):
        return volume.run(
            "mount", volume.url, volume.mountpoint, *volume.common_args(), *extra, check=False
        )

    config = tmp_path / "m.toml"
    config.write_text(f'url = "{volume.url}"\noptions = ["noatime", "dev"]\n')
    helper = [
        sys.executable,
        "-c",
        "import sys; from s3cryptfs.mounthelper import main; sys.exit(main(sys.argv[1:]))",
        volume.url,
        str(volume.mountpoint),
        "-o",
        f"_netdev,suid,password_file={volume.password_file}",
    ]
    runs = [
        ("suid", mount("-o", "suid")),
        ("dev", mount("-o", "nosuid,dev")),
        ("dev", volume.run("mount", "--config", config, volume.mountpoint, check=False)),
        ("suid", subprocess.run(helper, env=volume.env, capture_output=True, text=True)),
    ]
    for option, proc in runs:
        assert proc.returncode == 2, proc
        assert proc.stderr.strip().splitlines() == [
            f"s3cryptfs: mount option {option} is refused: anyone who can write to the bucket "
            "could plant setuid programs or device nodes (s3cryptfs mounts are nosuid,nodev)"
        ]
        assert not volume.is_mounted()


# --- planted huge objects ---------------------------------------------------------------------


# Forks and execs ARGV, then writes the child's peak resident memory (KiB) to RSS_FILE. The
# child is forked from this small interpreter: a child forked from pytest would count pytest's
# own memory as its peak (the peak survives exec).
LAUNCHER = """
import os, sys
rss_file, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(rss_file, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_of(args: list, env: dict, tmp_path) -> tuple[subprocess.CompletedProcess, int]:
    """Run `python -m s3cryptfs ARGS`; its result and its peak resident memory in bytes."""
    rss = tmp_path / "rss"
    cmd = [sys.executable, "-c", LAUNCHER, rss, sys.executable, "-m", "s3cryptfs", *args]
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True)
    return proc, int(rss.read_text()) * 1024


def test_oversized_descriptor_is_refused_without_downloading_it(volume, s3client, tmp_path):
    """Compared with a run that fails at the same point on a small damaged descriptor."""
    key = volume.prefix + ".s3cryptfs/volume.json"
    obj = f"s3://{volume.bucket}/{volume.prefix}file"
    args = ["cat", obj, *volume.common_args(), "--volume", volume.url]
    s3client.put_object(Bucket=volume.bucket, Key=key, Body=b"{ damaged")
    damaged, usual = peak_rss_of(args, volume.env, tmp_path)
    assert damaged.returncode == 5 and "not valid JSON" in damaged.stderr, damaged
    s3client.put_object(Bucket=volume.bucket, Key=key, Body=b" " * PLANTED)

    refused, peak = peak_rss_of(args, volume.env, tmp_path)
    assert refused.returncode == 8, refused
    assert refused.stderr.strip() == (
        f"s3cryptfs: volume descriptor {key} is {PLANTED} bytes, more than the 1 MiB allowed: "
        "not read"
    )
    assert peak < usual + GROWTH, (peak, usual)


def gateway_single(body_size: int) -> dict[str, str]:
    """Metadata of a gateway single-AEAD, password-direct object (the body is the attacker's)."""
    return {
        "encrypted": "true",
        "encryption-algorithm": "AES256-GCM",
        "encryption-key-salt": base64.b64encode(os.urandom(32)).decode(),
        "encryption-iv": base64.b64encode(os.urandom(12)).decode(),
        "encryption-kdf-params": "pbkdf2-sha256:100000",
        "original-content-length": str(body_size - 16),
    }


def mount_pid(vol) -> int:
    return int(os.getxattr(vol.mountpoint, "user.s3cryptfs.pid"))


def requests(vol) -> dict[str, int]:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))["requests"]


class PeakMemory:
    """The growth of a process's peak resident memory over a block (VmHWM, reset on entry)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def _kib(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def __enter__(self) -> PeakMemory:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # peak := current
        self.start = self._kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = (self._kib("VmHWM") - self.start) * 1024


def read_errno(path, size: int = 10) -> int:
    with pytest.raises(OSError) as info, open(path, "rb") as f:
        f.read(size)
    return info.value.errno


def mount_log(vol) -> str:
    return next(vol.cache_dir.glob("*/mount.log")).read_text()


@pytest.mark.expect_log_errors(r"multipart manifest \S+ is \d+ b", r"is \d+ bytes, more than the")
def test_oversized_index_manifest_and_symlink_are_not_downloaded(volume, s3client):
    """Through a mount: a directory index (on ls), a gateway multipart manifest (on stat) and a
    symlink body (on readlink)."""
    vol = volume
    vol.init()
    vol.mount()
    m = vol.mountpoint
    (m / "sub").mkdir()
    (m / "sub" / "file").write_bytes(b"listed")
    os.symlink("file", m / "sub" / "link")
    vol.umount()
    put = s3client.put_object
    big = os.urandom(PLANTED)
    index = index_key(vol.prefix, "sub")
    sealed = s3client.head_object(Bucket=vol.bucket, Key=index)["Metadata"]
    put(Bucket=vol.bucket, Key=index, Body=big, Metadata=sealed)
    mpu_key = vol.prefix + "mpu.bin"
    ptr = {"encrypted-mpu": "true", "encryption-fallback": "mpu"}
    put(Bucket=vol.bucket, Key=mpu_key, Body=b"x" * 100, Metadata=ptr)
    put(
        Bucket=vol.bucket, Key=mpu_key + ".mpu-manifest", Body=big, Metadata=gateway_single(PLANTED)
    )
    link_key = vol.prefix + "sub/link"
    meta = s3client.head_object(Bucket=vol.bucket, Key=link_key)["Metadata"]
    body = os.urandom(v1.cipher_size(8 * MIB, 65536))  # a valid length for our format
    put(Bucket=vol.bucket, Key=link_key, Body=body, Metadata=meta)

    vol.mount()
    pid = mount_pid(vol)
    with PeakMemory(pid) as ls:
        assert sorted(os.listdir(m / "sub")) == ["file", "link"]  # the index is only a cache
    with PeakMemory(pid) as manifest:
        os.stat(m / "mpu.bin")
        assert read_errno(m / "mpu.bin") == errno.EIO
    gets = requests(vol).get("get", 0)
    with pytest.raises(OSError) as info:
        os.readlink(m / "sub" / "link")
    assert info.value.errno == errno.EIO
    assert requests(vol).get("get", 0) == gets  # not even its header
    assert ls.growth < GROWTH and manifest.growth < GROWTH, (ls.growth, manifest.growth)
    vol.umount()
    log = mount_log(vol)
    for line in (
        f"{index}: directory index ignored: directory index {index} is {PLANTED} bytes, "
        "more than the 32 MiB allowed: not read",
        f"multipart manifest {mpu_key}.mpu-manifest is {PLANTED} bytes, more than the 16 MiB "
        "allowed: not read",
        f"symlink {link_key} is {len(body)} bytes, more than the 4140 bytes allowed: not read",
    ):
        assert line in log, line


@pytest.mark.expect_log_errors(r"gateway single-AEAD object \S+ is \d+")
def test_gateway_single_aead_object_beyond_max_whole_object_is_not_downloaded(volume, s3client):
    """`head -c 10` of a single-AEAD gateway object (one tag over the whole body: it can only be
    checked whole) larger than --max-whole-object."""
    vol = volume
    vol.init()
    key = vol.prefix + "single.bin"
    s3client.put_object(
        Bucket=vol.bucket, Key=key, Body=os.urandom(PLANTED), Metadata=gateway_single(PLANTED)
    )
    vol.mount("--max-whole-object", "8M")
    with PeakMemory(mount_pid(vol)) as single:
        assert read_errno(vol.mountpoint / "single.bin") == errno.EIO
        assert read_errno(vol.mountpoint / "single.bin") == errno.EIO  # nothing kept ready
    assert single.growth < GROWTH, single.growth
    vol.umount()
    assert (
        f"gateway single-AEAD object {key} is {PLANTED} bytes, more than the 8 MiB allowed: "
        "not read"
    ) in mount_log(vol)
