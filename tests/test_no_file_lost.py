"""No closed file is ever lost: the key manager or S3 away at close, at fsync, at unmount and
across a crash; the volume moved to another key manager under a running mount. Whatever
close() acknowledged reaches S3, or `s3cryptfs umount` says which files did not (and the mount
stays up, or --force leaves them to the next mount, which uploads them). issue 15."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import time

import pytest
from kms_volume import mount_kms
from test_key_vault import bao, vault_config  # noqa: F401 - bao is a fixture

from tests.conftest import lazy_unmount
from tests.servers import TcpProxy

POOL = 32  # keys/pool.py DEFAULT_SIZE: files beyond it need the key manager at close


def body(i: int) -> bytes:
    return f"file {i}: ".encode() + os.urandom(64).hex().encode()


def stats(vol) -> dict:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def object_body(s3client, vol, name: str) -> bytes | None:
    try:
        return s3client.get_object(Bucket=vol.bucket, Key=vol.prefix + name)["Body"].read()
    except s3client.exceptions.NoSuchKey:
        return None


@contextlib.contextmanager
def stopped(pid: int):
    """The process is frozen (SIGSTOP), as a hung server is: connections open, no answer."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def kill_mount(vol) -> None:
    for pid in vol.pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not vol.pids(), 10, "the mount to die")
    lazy_unmount(vol.mountpoint)


@pytest.fixture
def kms_volume(make_volume, request, tmp_path):
    server = request.getfixturevalue("bao")
    cfg = vault_config(tmp_path / "kms.toml", server, server.root_token)
    vol = make_volume()
    vol.init("--key-manager", "vault", "--kms-config", cfg)
    return vol, cfg, server


@pytest.mark.expect_log_errors(
    r"cannot be sealed for upload now",
    r"the key manager did not answer",
    r"cannot unwrap its data key",
)
def test_kms_frozen_while_files_are_written_closed_fsynced_and_unmounted(
    kms_volume, s3client
):
    vol, cfg, server = kms_volume
    mount_kms(vol, cfg, "--dek-cache-ttl", "0")
    m = vol.mountpoint
    (m / "before.txt").write_bytes(b"written while the KMS answered")
    wait_for(lambda: stats(vol)["uploads"]["queued"] + stats(vol)["uploads"]["in_flight"] == 0)
    wait_for(lambda: stats(vol).get("closed_not_sealed") == 0)
    files = {f"f{i:02d}.txt": body(i) for i in range(POOL + 8)}
    fsync_errors = 0
    with stopped(server.proc.pid):
        for name, data in files.items():
            (m / name).write_bytes(data)  # close() succeeds: content kept either way
        fd = os.open(m / "synced.txt", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"fsync'ed during the outage")
        try:
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.EIO
            fsync_errors += 1
        os.close(fd)
        files["synced.txt"] = b"fsync'ed during the outage"
        assert stats(vol)["closed_not_sealed"] >= 1  # beyond the pool of wrapped keys
        assert fsync_errors == 1  # the pool was used up by then: fsync cannot promise S3
        # Reads of what is only local work meanwhile.
        assert (m / "f39.txt").read_bytes() == files["f39.txt"]
        refused = vol.run("umount", m, "--timeout", "3", check=False)
        assert refused.returncode == 7, refused.stderr
        assert "f39.txt" in refused.stderr and "not in S3" in refused.stderr
        assert vol.is_mounted()
        kill_mount(vol)  # and then the machine crashes, the KMS still frozen
    # The next mount (the KMS back) seals and uploads everything that was closed.
    mount_kms(vol, cfg)
    for name, data in files.items():
        assert object_body(s3client, vol, name) is not None, name
        assert (m / name).read_bytes() == data, name
    vol.umount()
    leftovers = [p for p in vol.cache_dir.glob("*/staging/*")]
    assert not leftovers, leftovers


@pytest.mark.expect_log_errors(
    r"cannot be sealed for upload now",
    r"the key manager did not answer",
)
def test_closed_files_are_sealed_when_the_kms_comes_back(kms_volume, s3client):
    vol, cfg, server = kms_volume
    mount_kms(vol, cfg)
    m = vol.mountpoint
    (m / "warm.txt").write_bytes(b"x")
    files = {f"g{i:02d}.txt": body(i) for i in range(POOL + 4)}
    with stopped(server.proc.pid):
        for name, data in files.items():
            (m / name).write_bytes(data)
        assert stats(vol)["closed_not_sealed"] >= 1
        assert "closed, not sealed yet" in vol.run("status", m).stdout
        log = "".join(p.read_text() for p in vol.cache_dir.glob("*/mount.log"))
        assert "cannot be sealed for upload now" in log
    # No user action: the mount keeps trying, with a bounded backoff.
    wait_for(lambda: stats(vol)["closed_not_sealed"] == 0, 90, "the files to be sealed")
    wait_for(lambda: all(object_body(s3client, vol, n) for n in files), 60, "the uploads")
    assert vol.umount().returncode == 0
    mount_kms(vol, cfg)
    for name, data in files.items():
        assert (m / name).read_bytes() == data, name


@pytest.mark.expect_log_errors(
    r"closed file version\(s\) are not in S3",
    r"upload of \S+ failed \(attempt",
)
def test_umount_tells_the_truth_when_s3_hangs(make_volume, seaweed, s3client):
    proxy = TcpProxy("127.0.0.1", seaweed.s3_port)
    try:
        vol = make_volume(endpoint_url=proxy.endpoint_url)
        vol.init()
        # A long listing lifetime lets a new name be created while S3 is away.
        vol.mount("--s3-timeout", "5", "--dir-cache-ttl", "600")
        m = vol.mountpoint
        assert os.listdir(m) == []
        proxy.set_mode("blackhole")  # S3 stops answering right after the close
        (m / "late.txt").write_bytes(b"closed while S3 hangs")
        refused = vol.run("umount", m, "--timeout", "3", check=False)
        assert refused.returncode == 4, refused.stderr
        assert f"{vol.prefix}late.txt" in refused.stderr and vol.is_mounted()
        forced = vol.run("umount", m, "--timeout", "2", "--force", check=False)
        assert forced.returncode == 6, forced.stderr
        assert "kept in" in forced.stderr and not vol.is_mounted()
        proxy.set_mode("pass")
        vol.mount()  # uploads what was left before it serves
        assert object_body(s3client, vol, "late.txt")
        assert (m / "late.txt").read_bytes() == b"closed while S3 hangs"
        assert vol.umount().returncode == 0
    finally:
        proxy.stop()


@pytest.mark.expect_log_errors(
    r"cannot be sealed for upload now",
    r"closed file version\(s\) are not in S3",
)
def test_migration_under_a_running_mount_loses_nothing(mounted, request, s3client, tmp_path):
    """`migrate --to vault` from another shell: the password mount has no Vault configuration,
    so it cannot wrap new files any more; they are kept, named by umount, and sealed by the
    next mount, which has it."""
    vol = mounted
    server = request.getfixturevalue("bao")
    cfg = vault_config(tmp_path / "kms.toml", server, server.root_token)
    vol.remount("--descriptor-refresh", "1")
    (vol.mountpoint / "old.txt").write_bytes(b"before the migration")
    vol.run("migrate", vol.url, *vol.common_args(), "--to", "vault", "--kms-config", cfg)
    vol.wait_heartbeats(s3client)  # it has re-read the descriptor since
    (vol.mountpoint / "new.txt").write_bytes(b"after the migration")
    (vol.mountpoint / "new2.txt").write_bytes(b"after the migration, again")
    refused = vol.run("umount", vol.mountpoint, "--timeout", "3", check=False)
    assert refused.returncode in (5, 7), refused.stderr
    assert "new2.txt" in refused.stderr and vol.is_mounted()
    forced = vol.run("umount", vol.mountpoint, "--force", "--timeout", "1", check=False)
    assert forced.returncode == 6, forced.stderr
    vol.mount("--kms-config", cfg)
    assert (vol.mountpoint / "new.txt").read_bytes() == b"after the migration"
    assert (vol.mountpoint / "new2.txt").read_bytes() == b"after the migration, again"
    vol.umount()
    meta = s3client.head_object(Bucket=vol.bucket, Key=vol.prefix + "new2.txt")["Metadata"]
    assert meta["encryption-kms-provider"] == "vault"


def test_a_file_open_at_the_crash_is_discarded_with_a_warning(mounted):
    vol = mounted
    fd = os.open(vol.mountpoint / "open.txt", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"never closed")
    kill_mount(vol)
    with contextlib.suppress(OSError):
        os.close(fd)
    again = vol.mount()
    assert not (vol.mountpoint / "open.txt").exists()
    assert "still open when the mount stopped" in again.stderr


def test_rotate_rewrap_retire_in_a_loop_while_a_mount_writes(mounted, s3client):
    """Retire erases a key version: it must wait until the running mount has stopped using
    it (its record in .s3cryptfs/mounts/), and count what it uploaded meanwhile."""
    import threading

    vol = mounted
    vol.remount("--descriptor-refresh", "1")
    written: dict[str, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set():
                name = f"w{i:04d}.txt"
                data = body(i)
                (vol.mountpoint / name).write_bytes(data)
                written[name] = data
                i += 1
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for version in (1, 2, 3):
            vol.run("keys", "rotate", vol.url, *vol.common_args())
            for _ in range(5):
                vol.run("rewrap", vol.url, *vol.common_args(), check=False)
                retire = vol.run(
                    "keys", "retire", str(version), vol.url, *vol.common_args(), check=False
                )
                if retire.returncode == 0:
                    break
                # Refused (exit 6) while the mount still used it, or objects it uploaded
                # meanwhile still do: rewrap again, as the message says.
                assert retire.returncode == 6, retire.stderr
            else:
                raise AssertionError(f"version {version} never retired: {retire.stderr}")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert len(written) > 20
    vol.umount()
    status = vol.run("keys", "list", vol.url, *vol.common_args()).stdout
    assert "version 3  retired" in status and "version 4  active" in status, status
    vol.mount()
    for name, data in written.items():
        assert (vol.mountpoint / name).read_bytes() == data, name


def test_retire_waits_for_a_running_mount(mounted, s3client):
    """The issue's case: rotate, rewrap and retire within seconds; the running mount has not
    re-read the descriptor yet. Retire waits (here: refuses after --wait) instead of erasing
    the version the mount still wraps new files under."""
    vol = mounted
    vol.remount("--descriptor-refresh", "600")  # a heartbeat of 30 s: slower than --wait
    (vol.mountpoint / "a.txt").write_bytes(b"before")
    vol.run("keys", "rotate", vol.url, *vol.common_args())
    vol.run("rewrap", vol.url, *vol.common_args())
    refused = vol.run(
        "keys", "retire", "1", vol.url, *vol.common_args(), "--wait", "2", check=False
    )
    assert refused.returncode == 6, refused.stderr
    assert "still uses it" in refused.stderr
    (vol.mountpoint / "b.txt").write_bytes(b"after the rotation")
    vol.umount()  # a clean unmount withdraws its record: nothing holds version 1 any more
    vol.run("rewrap", vol.url, *vol.common_args())
    vol.run("keys", "retire", "1", vol.url, *vol.common_args())
    vol.mount()
    assert (vol.mountpoint / "a.txt").read_bytes() == b"before"
    assert (vol.mountpoint / "b.txt").read_bytes() == b"after the rotation"


@pytest.mark.expect_log_errors(
    r"closed file version\(s\) are not in S3",
    r"upload of \S+ failed \(attempt",
)
def test_sigterm_with_s3_away_gives_up_and_says_what_it_left(make_volume, seaweed):
    """What systemd's stop does: SIGTERM. With S3 hanging the mount cannot upload; it waits
    --stop-timeout without progress, logs the files it leaves for the next mount, and exits."""
    proxy = TcpProxy("127.0.0.1", seaweed.s3_port)
    try:
        vol = make_volume(endpoint_url=proxy.endpoint_url)
        vol.init()
        vol.mount("--s3-timeout", "5", "--dir-cache-ttl", "600", "--stop-timeout", "2")
        m = vol.mountpoint
        assert os.listdir(m) == []
        proxy.set_mode("blackhole")
        (m / "left.txt").write_bytes(b"closed, then the stop")
        pids = vol.pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not vol.pids() and not vol.is_mounted(), 60, "the mount to stop")
        log = "".join(p.read_text() for p in vol.cache_dir.glob("*/mount.log"))
        assert "closed file version(s) are not in S3" in log and "left.txt" in log
        proxy.set_mode("pass")
        vol.mount()
        assert (m / "left.txt").read_bytes() == b"closed, then the stop"
        vol.umount()
    finally:
        proxy.stop()


def test_a_remount_after_a_crash_withdraws_the_crashed_mounts_record(mounted, s3client):
    """A mount killed with -9 leaves its record (what its journal held). The next mount of
    the same cache directory takes that journal over and then withdraws the record, or a
    `keys retire` would wait for a mount that never comes back, and then refuse."""
    vol = mounted
    vol.remount("--descriptor-refresh", "1")
    prefix = f"{vol.prefix}.s3cryptfs/mounts/"

    def records() -> set[str]:
        listed = s3client.list_objects_v2(Bucket=vol.bucket, Prefix=prefix)
        return {o["Key"] for o in listed.get("Contents", [])}

    (vol.mountpoint / "before.txt").write_bytes(b"closed before the crash")
    vol.wait_heartbeats(s3client, 1)
    crashed = records()
    assert len(crashed) == 1
    kill_mount(vol)
    vol.mount("--descriptor-refresh", "1")
    wait_for(lambda: len(records()) == 1 and records() != crashed, 30, "the old record to go")
    assert (vol.mountpoint / "before.txt").read_bytes() == b"closed before the crash"
    # And so the version the crashed mount was using can be retired once re-wrapped.
    vol.run("keys", "rotate", vol.url, *vol.common_args())
    vol.wait_heartbeats(s3client)
    vol.run("rewrap", vol.url, *vol.common_args())
    retire = vol.run(
        "keys", "retire", "1", vol.url, *vol.common_args(), "--wait", "20", check=False
    )
    assert retire.returncode == 0, retire.stderr
    vol.umount()
