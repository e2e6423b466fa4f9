"""Key operations through the real CLI, a real mount and SeaweedFS: rotate, rewrap, retire,
bad envelopes, concurrent changes during a rewrap, and the audit log."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from s3cryptfs.format import metadata as md

FILES = {f"dir/f{i}.txt": (f"file {i} ".encode() * (i * 700 + 1)) for i in range(4)}
MORE = {f"more/g{i}.bin": os.urandom(i * 3000 + 5) for i in range(3)}


def write_files(root, files) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def assert_files(root, files) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name


def index_versions(s3client, vol) -> dict[str, str]:
    """directory index key -> its key version."""
    listed = s3client.list_objects_v2(Bucket=vol.bucket, Prefix=f"{vol.prefix}.s3cryptfs/dirs/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    return {
        k: s3client.head_object(Bucket=vol.bucket, Key=k)["Metadata"][md.KEY_VERSION]
        for k in keys
    }


def envelope_versions(s3client, bucket: str, prefix: str) -> dict[str, tuple[str, str]]:
    """object key -> (provider, version) of every file object."""
    out = {}
    for page in s3client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if "/.s3cryptfs/" in f"/{key}" or key.endswith("/"):
                continue
            meta = s3client.head_object(Bucket=bucket, Key=key)["Metadata"]
            out[key] = (meta[md.KMS_PROVIDER], meta[md.KEY_VERSION])
    return out


def admin(volume, *args, check=True):
    """s3cryptfs WORDS... URL OPTIONS...: the URL goes after the leading words."""
    args = [str(a) for a in args]
    n = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    extra = ["--cache-dir", str(volume.cache_dir)] if args[0] in ("rewrap", "migrate") else []
    return volume.run(*args[:n], volume.url, *volume.common_args(), *extra, *args[n:], check=check)


def test_rotate_rewrap_retire_through_the_mount(mounted, s3client, tmp_path) -> None:
    vol = mounted
    write_files(vol.mountpoint, FILES)
    vol.remount()  # every file in S3 under version 1
    audit = tmp_path / "admin-audit.jsonl"
    out = admin(vol, "keys", "rotate", "--audit-log", audit).stdout
    assert "new active key version 2" in out
    # The running mount reads what it wrote and picks up the rotation for new files later.
    assert_files(vol.mountpoint, FILES)
    write_files(vol.mountpoint, MORE)
    vol.remount()  # a fresh mount wraps new files under version 2
    (vol.mountpoint / "after-remount.txt").write_bytes(b"v2 file")
    vol.umount()
    vol.mount()
    assert_files(vol.mountpoint, {**FILES, **MORE, "after-remount.txt": b"v2 file"})
    versions = envelope_versions(s3client, vol.bucket, vol.prefix)
    assert versions[f"{vol.prefix}dir/f0.txt"] == ("s3cryptfs-password", "1")
    assert versions[f"{vol.prefix}after-remount.txt"] == ("s3cryptfs-password", "2")
    v1_count = sum(1 for v in versions.values() if v[1] == "1")
    assert v1_count >= len(FILES)

    status = admin(vol, "keys", "status", "--count").stdout
    assert "active: s3cryptfs-password version 2" in status
    assert "version 1  decrypt-only  key " in status and f"objects: {v1_count}" in status

    dry = admin(vol, "rewrap", "--dry-run").stdout
    assert f"s3cryptfs-password version 1: {v1_count}" in dry
    assert envelope_versions(s3client, vol.bucket, vol.prefix) == versions  # nothing written

    # The documented word order: options may stand between VERSION and the URL.
    refused = vol.run(
        "keys", "retire", "1", "--audit-log", audit, vol.url, *vol.common_args(), check=False
    )
    assert refused.returncode == 6, refused.stderr
    v1_indexes = [k for k, v in index_versions(s3client, vol).items() if v == "1"]
    assert v1_indexes  # "dir" and "more" were written before the mount saw the rotation
    assert (
        f"{v1_count + len(v1_indexes)} object(s) still use it ({len(v1_indexes)} of them "
        "directory indexes)" in refused.stderr
    )

    etags_before = {k: s3client.head_object(Bucket=vol.bucket, Key=k)["ETag"] for k in versions}
    rewrap = admin(vol, "rewrap", "--jobs", "3", "--audit-log", audit)
    assert f"{v1_count} re-wrapped" in rewrap.stdout, rewrap.stdout
    # The summary counts versions as the run left them (it printed the counts from before).
    assert f"s3cryptfs-password version 2: {len(versions)}" in rewrap.stdout, rewrap.stdout
    assert "version 1:" not in rewrap.stdout
    after = envelope_versions(s3client, vol.bucket, vol.prefix)
    assert set(after.values()) == {("s3cryptfs-password", "2")}
    # Only metadata changed: every body is byte-identical (SeaweedFS even keeps the ETag).
    for key, etag in etags_before.items():
        assert s3client.head_object(Bucket=vol.bucket, Key=key)["ETag"] == etag, key
    again = admin(vol, "rewrap")
    assert "0 re-wrapped" in again.stdout and f"{len(versions)} already" in again.stdout

    admin(vol, "keys", "retire", "1", "--audit-log", audit)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "unwrap"] == ["rotate", "retire"] + [
        "rewrap"
    ] * (v1_count + len(v1_indexes)) + ["retire"]
    assert [e["outcome"] for e in events if e["event"] == "retire"] == ["refused", "ok"]
    assert {e["object"] for e in events if e["event"] == "rewrap"} == {
        k for k, v in versions.items() if v[1] == "1"
    } | set(v1_indexes)
    listing = admin(vol, "keys", "list").stdout
    assert "version 1  retired" in listing and "version 2  active" in listing
    # The live mount (its cached envelopes still say version 1) reads everything...
    assert_files(vol.mountpoint, {**FILES, **MORE})
    # ...and so does a fresh one, which has no DEK cached at all.
    vol.remount()
    assert_files(vol.mountpoint, {**FILES, **MORE, "after-remount.txt": b"v2 file"})


def test_rotation_keeps_directory_indexes_and_the_mtime_of_streamed_files(mounted, s3client):
    """Issue 15 item 5: rewrap and retire skipped the directory indexes, so after the documented
    procedure (rotate, rewrap, retire) an index under the old version was ignored: directories
    lost their attributes, and a streamed file (no mtime in its metadata, the exact one is in
    the index) showed the rewrap time. Now they are counted and re-wrapped like files, and a
    file re-wrapped without an mtime gets the one the volume showed."""
    from tests.test_crash import wait_state
    from tests.test_stream import MIB, PART, write_in_steps

    vol, m = mounted, mounted.mountpoint
    (m / "sub" / "inner").mkdir(parents=True)
    os.chmod(m / "sub" / "inner", 0o701)
    os.utime(m / "sub" / "inner", ns=(1_500_000_000_000_000_000,) * 2)
    data = os.urandom(PART + MIB)  # more than one part, written in order: streamed
    fd = os.open(m / "sub" / "big", os.O_WRONLY | os.O_CREAT, 0o640)
    write_in_steps(fd, data)
    os.close(fd)
    assert wait_state(m / "sub" / "big", {"clean"}) == "clean"
    (m / "sub" / "small.txt").write_bytes(b"small")
    vol.remount()
    big = f"{vol.prefix}sub/big"
    before = s3client.head_object(Bucket=vol.bucket, Key=big)
    assert before["ETag"].strip('"').endswith("-2") and md.MTIME not in before["Metadata"]
    mtime = os.stat(m / "sub" / "big").st_mtime_ns
    vol.umount()  # no mount rewrites an index under version 1 meanwhile
    indexes = index_versions(s3client, vol)
    assert len(indexes) >= 2 and set(indexes.values()) == {"1"}, indexes  # "" and "sub"

    admin(vol, "keys", "rotate")
    status = admin(vol, "keys", "status", "--count").stdout
    assert f"objects: 2, directory indexes: {len(indexes)}" in status, status
    refused = admin(vol, "keys", "retire", "1", check=False)
    assert refused.returncode == 6, refused.stderr
    assert f"{len(indexes) + 2} object(s) still use it ({len(indexes)} of them" in refused.stderr
    dry = admin(vol, "rewrap", "--dry-run").stdout
    assert f"s3cryptfs-password version 1: 2 (+{len(indexes)} directory index(es))" in dry, dry
    out = admin(vol, "rewrap").stdout
    assert "2 re-wrapped" in out, out
    assert f"and {len(indexes)} directory index(es): 0 already under the active key, " in out
    assert index_versions(s3client, vol) == {k: "2" for k in indexes}
    after = s3client.head_object(Bucket=vol.bucket, Key=big)
    assert after["Metadata"][md.MTIME] == str(mtime)  # what the volume showed, now kept
    assert after["Metadata"][md.KEY_VERSION] == "2" and after["ETag"] == before["ETag"]
    again = admin(vol, "rewrap").stdout
    assert f"and {len(indexes)} directory index(es): {len(indexes)} already under" in again
    assert "version 1" not in again
    admin(vol, "keys", "retire", "1")

    vol.mount()
    assert os.stat(m / "sub" / "big").st_mtime_ns == mtime
    inner = os.stat(m / "sub" / "inner")  # directory attributes live only in the index
    assert (inner.st_mode & 0o7777, inner.st_mtime_ns) == (0o701, 1_500_000_000_000_000_000)
    assert (m / "sub" / "big").read_bytes() == data


def test_rewrap_skips_an_object_changed_concurrently(volume, seaweed, s3client, s3env) -> None:
    from s3cryptfs.codec import ObjectCodec
    from s3cryptfs.config import parse_url
    from s3cryptfs.errors import PreconditionFailed
    from s3cryptfs.ops.rewrap import rewrap_volume
    from s3cryptfs.store.s3 import S3Store, StoreSettings
    from tests.descriptor_tools import open_authority

    volume.init()
    volume.mount()
    write_files(volume.mountpoint, FILES)
    volume.umount()
    admin(volume, "keys", "rotate")
    victim = f"{volume.prefix}dir/f1.txt"
    indexes = sorted(index_versions(s3client, volume))
    rewritten = []

    class OtherWriterFirst(S3Store):
        """The real store; another client overwrites the victim between HEAD and copy, and a
        mount rewrites a directory index there (which it does all the time)."""

        def copy(self, src, dst, metadata=None, src_etag=None, **kw):
            if src in indexes and not rewritten:
                rewritten.append(src)
                head = s3client.head_object(Bucket=self.bucket, Key=src)
                body = s3client.get_object(Bucket=self.bucket, Key=src)["Body"].read()
                s3client.put_object(
                    Bucket=self.bucket, Key=src, Body=body + b"!", Metadata=head["Metadata"]
                )
            if src == victim:
                head = s3client.head_object(Bucket=self.bucket, Key=src)
                body = s3client.get_object(Bucket=self.bucket, Key=src)["Body"].read()
                # Same bytes give the same ETag on S3: change the body to change the ETag.
                s3client.put_object(
                    Bucket=self.bucket, Key=src, Body=body[:-1], Metadata=head["Metadata"]
                )
            return super().copy(src, dst, metadata, src_etag, **kw)

    store = OtherWriterFirst(
        StoreSettings(bucket=volume.bucket, endpoint_url=seaweed.endpoint_url),
        client=seaweed.client(),
    )
    url = parse_url(volume.url)
    authority = open_authority(volume, seaweed, store)
    ring = authority.ring
    report = rewrap_volume(
        store, url.prefix, ObjectCodec(authority.descriptor, ring), jobs=2, progress=None
    )
    ring.close()
    assert report.changed == [victim]
    assert report.rewrapped == len(FILES) - 1 and not report.complete
    # The index rewritten meanwhile was HEADed again and re-wrapped, not reported as changed.
    assert rewritten and report.indexes_rewrapped == len(indexes)
    assert index_versions(s3client, volume) == {k: "2" for k in indexes}
    meta = s3client.head_object(Bucket=volume.bucket, Key=victim)["Metadata"]
    assert meta[md.KEY_VERSION] == "1"  # the other writer's object was not clobbered
    with pytest.raises(PreconditionFailed):
        store.copy(victim, victim, meta, src_etag='"0123456789abcdef0123456789abcdef"')
    # Through the CLI a rerun finishes the job (exit 0).
    rerun = admin(volume, "rewrap")
    assert "1 re-wrapped" in rerun.stdout


@pytest.mark.expect_log_errors(
    r"cannot unwrap its data key",
    r"wrapped key is not valid base64",
    r"read failed: ",
)
def test_bad_envelopes_give_eio_and_name_the_object(volume, s3client, tmp_path) -> None:
    volume.init()
    volume.mount()
    write_files(volume.mountpoint, {"a.txt": b"alpha", "b.txt": b"beta", "c.txt": b"gamma"})
    (volume.mountpoint / "ok.txt").write_bytes(b"fine")
    volume.umount()

    def patch(name, **changes):
        key = f"{volume.prefix}{name}"
        meta = s3client.head_object(Bucket=volume.bucket, Key=key)["Metadata"]
        meta.update({k: v for k, v in changes.items() if v is not None})
        for k in [k for k, v in changes.items() if v is None]:
            meta.pop(k)
        s3client.copy_object(
            Bucket=volume.bucket,
            Key=key,
            CopySource={"Bucket": volume.bucket, "Key": key},
            Metadata=meta,
            MetadataDirective="REPLACE",
        )

    patch("a.txt", **{md.KMS_PROVIDER: "no-such-kms"})
    patch("b.txt", **{md.WRAPPED_KEY: "not base64 !!"})
    patch("c.txt", **{md.KEY_VERSION: "9"})
    log = tmp_path / "mount.log"
    audit = tmp_path / "audit.jsonl"
    volume.mount("--log-file", log, "--audit-log", audit)
    for name in ("a.txt", "b.txt", "c.txt"):
        with pytest.raises(OSError) as info:
            (volume.mountpoint / name).read_bytes()
        assert info.value.errno == errno.EIO, name
    assert (volume.mountpoint / "ok.txt").read_bytes() == b"fine"  # the mount survives
    text = log.read_text()
    bad = {"a.txt": "no-such-kms", "b.txt": "base64", "c.txt": "key version 9"}
    for name, why in bad.items():
        key = f"{volume.prefix}{name}"
        lines = [line for line in text.splitlines() if key in line]
        assert any(why in line for line in lines), (name, text)
        # named once: the codec's "KEY: " was repeated by the mount ("KEY: ...: KEY: ...")
        assert all(line.count(key) == 1 for line in lines), lines
    volume.umount()
    # The same objects in rewrap's and fsck's reports, each named once as well.
    rewrap = admin(volume, "rewrap", check=False)
    assert rewrap.returncode == 6, rewrap.stderr
    fsck = volume.run("fsck", volume.url, *volume.common_args(), check=False)
    assert fsck.returncode == 1, fsck.stderr
    for name, why in bad.items():
        key = f"{volume.prefix}{name}"
        reports = [(rewrap.stdout, "FAILED"), (fsck.stdout, "BAD")]
        if name != "b.txt":  # a malformed envelope is not logged, only listed
            reports.append((rewrap.stderr, "not re-wrapped"))
        for out, head in reports:
            lines = [line for line in out.splitlines() if key in line]
            assert lines and all(line.count(key) == 1 for line in lines), (name, out)
            assert any(head in line and why in line for line in lines), (name, out)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    outcomes = {(r["object"], r["outcome"]) for r in records if r["event"] == "unwrap"}
    assert (f"{volume.prefix}ok.txt", "ok") in outcomes
    assert (f"{volume.prefix}a.txt", "UnknownProvider") in outcomes
    assert (f"{volume.prefix}c.txt", "KeyNotFound") in outcomes
    wrapped = s3client.head_object(Bucket=volume.bucket, Key=f"{volume.prefix}ok.txt")["Metadata"][
        md.WRAPPED_KEY
    ]
    assert wrapped not in audit.read_text()  # never key material


def test_init_refuses_a_short_password(volume, tmp_path) -> None:
    short = tmp_path / "short"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"tooshort")
    os.close(fd)
    volume.password_file = short
    result = volume.init(check=False)
    assert result.returncode == 2 and "at least 12 characters" in result.stderr


def test_unknown_providers_are_refused_without_writing(volume, s3client, tmp_path) -> None:
    refused = volume.init("--key-manager", "no-such-kms", check=False)
    assert refused.returncode == 2 and "no-such-kms" in refused.stderr
    assert "Contents" not in s3client.list_objects_v2(Bucket=volume.bucket)
    volume.init()
    key = f"{volume.prefix}.s3cryptfs/volume.json"
    before = s3client.get_object(Bucket=volume.bucket, Key=key)["Body"].read()
    moved = admin(volume, "migrate", "--to", "no-such-kms", check=False)
    assert moved.returncode == 2 and "no key manager is registered" in moved.stderr
    assert s3client.get_object(Bucket=volume.bucket, Key=key)["Body"].read() == before


def test_kms_mode_mount_of_a_password_volume_needs_the_password(volume, tmp_path) -> None:
    volume.init()
    cfg = tmp_path / "kms.toml"
    cfg.write_text('[key_manager]\nprovider = "vault"\naddress = "http://127.0.0.1:1"\n')
    volume.env = {k: v for k, v in volume.env.items() if k != "S3CRYPTFS_PASSWORD"}
    result = volume.run(
        "mount",
        volume.url,
        volume.mountpoint,
        "--endpoint-url",
        volume.endpoint_url,
        "--cache-dir",
        volume.cache_dir,
        "--kms-config",
        cfg,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "a password is needed" in result.stderr
    assert not volume.is_mounted()


def test_a_rotation_reaches_running_mounts(mounted, make_volume, s3client) -> None:
    a = mounted
    b = make_volume(bucket=a.bucket)  # a second machine with its own cache, mounted throughout
    b.mount()
    (a.mountpoint / "before.txt").write_bytes(b"written under version 1")
    admin(a, "keys", "rotate")
    a.remount()
    (a.mountpoint / "by-a.txt").write_bytes(b"written under version 2")
    a.umount()
    key = f"{a.prefix}by-a.txt"
    assert s3client.head_object(Bucket=a.bucket, Key=key)["Metadata"][md.KEY_VERSION] == "2"
    # b never saw version 2: it re-reads the descriptor when an object names it.
    assert (b.mountpoint / "by-a.txt").read_bytes() == b"written under version 2"
    assert (b.mountpoint / "before.txt").read_bytes() == b"written under version 1"
    # Having seen it, b wraps new files under version 2 too.
    (b.mountpoint / "by-b.txt").write_bytes(b"b after the rotation")
    b.umount()
    key = f"{a.prefix}by-b.txt"
    assert s3client.head_object(Bucket=a.bucket, Key=key)["Metadata"][md.KEY_VERSION] == "2"
    # A mount with a short descriptor refresh picks a rotation up for writes by itself.
    a.mount("--descriptor-refresh", "1")
    (a.mountpoint / "warm.txt").write_bytes(b"x")
    admin(a, "keys", "rotate")
    a.wait_heartbeats(s3client)  # it has re-read the descriptor since
    (a.mountpoint / "after.txt").write_bytes(b"written under version 3")
    a.umount()
    key = f"{a.prefix}after.txt"
    assert s3client.head_object(Bucket=a.bucket, Key=key)["Metadata"][md.KEY_VERSION] == "3"


@pytest.mark.expect_log_errors(r"key version \d+ is retired")
def test_a_retire_stops_a_running_mount_within_the_dek_cache_ttl(mounted) -> None:
    """Issue 15 item 4: a mount re-read the descriptor only before a wrap (every 60 s) or for
    an unknown version, so 8 s after `keys retire --force 1` with --dek-cache-ttl 5, files
    under version 1 it had never opened still read. Now an unwrap re-reads it once the mount's
    view is older than min(--descriptor-refresh, --dek-cache-ttl): here 5 s."""
    vol = mounted
    never = {f"never/n{i:02d}.txt": f"never opened {i}".encode() for i in range(30)}
    write_files(vol.mountpoint, never)
    vol.remount("--dek-cache-ttl", "5")  # every file under version 1, no data key cached
    admin(vol, "keys", "rotate")
    admin(vol, "keys", "retire", "1", "--force")
    retired = time.monotonic()
    names = sorted(never)
    refused_after = None
    while names and time.monotonic() < retired + 15:
        name = names.pop(0)
        try:
            data = (vol.mountpoint / name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            refused_after = time.monotonic() - retired
            break
        assert data == never[name]  # the mount may not have re-read the descriptor yet
        time.sleep(0.5)  # a read every half second: when the refusal comes is what is measured
    # The bound is 5 s after the mount's last read of the descriptor, which came before the
    # retire; 1 s more for the GET and the test's own steps.
    assert refused_after is not None and refused_after <= 6, refused_after
    for name in names[:3]:  # and it stays refused
        with pytest.raises(OSError) as info:
            (vol.mountpoint / name).read_bytes()
        assert info.value.errno == errno.EIO


def test_two_admins_updating_the_descriptor_do_not_clobber(volume, seaweed) -> None:
    from s3cryptfs.keys.password import PasswordKeyManager
    from tests.conftest import PASSWORD
    from tests.descriptor_tools import open_authority

    volume.init()
    first, second = open_authority(volume, seaweed), open_authority(volume, seaweed)
    calls = []

    def rotate(desc):
        manager = PasswordKeyManager(desc.key_settings, {"password": PASSWORD.encode()})
        desc.key_settings = manager.rotate()
        manager.close()
        return desc

    def first_admin(desc):
        calls.append(desc.key_settings["active_version"])
        if len(calls) == 1:
            # The second admin reads, rotates and writes between our read and our write.
            second.update(rotate)
        return rotate(desc)

    final = first.update(first_admin)
    assert calls == [1, 2]  # our first write lost the If-Match race; we re-read and re-applied
    assert [k["version"] for k in final.key_settings["keys"]] == [1, 2, 3]
    assert final.key_settings["active_version"] == 3
    status = admin(volume, "keys", "list").stdout
    assert "version 2  decrypt-only" in status and "version 3  active" in status


def test_password_change(mounted, tmp_path, s3client) -> None:
    vol = mounted
    write_files(vol.mountpoint, FILES)
    vol.remount("--descriptor-refresh", "1")
    new = tmp_path / "new-password"
    new.write_text("short")
    new.chmod(0o600)
    refused = admin(vol, "keys", "passwd", "--new-password-file", new, check=False)
    assert refused.returncode == 2 and "at least 12 characters" in refused.stderr
    new.write_text("a brand new long password")
    assert "password changed" in admin(vol, "keys", "passwd", "--new-password-file", new).stdout
    vol.wait_heartbeats(s3client)  # it has re-read the descriptor since
    (vol.mountpoint / "later.txt").write_bytes(b"the running mount goes on")
    assert_files(vol.mountpoint, FILES)
    vol.umount()
    old = vol.mount(check=False)
    assert old.returncode == 3, old.stderr
    vol.password_file = new
    vol.mount()
    assert_files(vol.mountpoint, {**FILES, "later.txt": b"the running mount goes on"})


def test_rewrap_resumes_after_its_checkpoint(mounted, s3client) -> None:
    from s3cryptfs.config import parse_url, volume_cache_dir

    vol = mounted
    write_files(vol.mountpoint, FILES)
    vol.umount()
    admin(vol, "keys", "rotate")
    keys = sorted(f"{vol.prefix}{name}" for name in FILES)
    # As if an earlier run had been interrupted after the first two objects.
    path = os.path.join(
        volume_cache_dir(str(vol.cache_dir), vol.endpoint_url, parse_url(vol.url)),
        "rewrap.checkpoint",
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"target": ["s3cryptfs-password", 2], "after": keys[1]}, f)
    out = admin(vol, "rewrap").stdout
    assert f"resumed after {keys[1]}" in out and f"{len(keys) - 2} re-wrapped" in out
    versions = envelope_versions(s3client, vol.bucket, vol.prefix)
    assert [versions[k][1] for k in keys] == ["1", "1"] + ["2"] * (len(keys) - 2)
    assert not os.path.exists(path)  # a complete run removes it
    out = admin(vol, "rewrap").stdout
    assert "resumed" not in out and "2 re-wrapped" in out
    # A checkpoint made for another active key is ignored.
    with open(path, "w") as f:
        json.dump({"target": ["s3cryptfs-password", 1], "after": keys[-1]}, f)
    assert "resumed" not in admin(vol, "rewrap").stdout


def test_a_sigterm_d_rewrap_resumes_where_it_stopped(volume, s3client, tmp_path) -> None:
    """SIGTERM (systemctl stop, kill) used to end rewrap without saving its checkpoint (it was
    written every 100 objects only): the next run started over."""
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from s3cryptfs.config import parse_url, volume_cache_dir

    volume.init()
    seed = tmp_path / "seed.txt"
    seed.write_bytes(b"one object, many copies")
    volume.run("put", seed, f"{volume.url}seed.txt", *volume.common_args())
    source = {"Bucket": volume.bucket, "Key": f"{volume.prefix}seed.txt"}
    copies = [f"{volume.prefix}many/{i:04d}" for i in range(300)]

    def copy(key: str) -> None:  # the same body and envelope: rewrap reads no body
        s3client.copy_object(Bucket=volume.bucket, Key=key, CopySource=source)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(copy, copies))
    keys = sorted([*copies, source["Key"]])
    admin(volume, "keys", "rotate")

    audit = tmp_path / "audit.jsonl"
    audit.touch()
    out, err = tmp_path / "out", tmp_path / "err"
    cmd = [sys.executable, "-m", "s3cryptfs", "rewrap", volume.url, *volume.common_args()]
    cmd += ["--cache-dir", str(volume.cache_dir), "--jobs", "1", "--audit-log", str(audit)]

    def rewrapped() -> int:
        lines = audit.read_text().splitlines()
        return sum(1 for line in lines if json.loads(line)["event"] == "rewrap")

    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=volume.env)
        try:
            deadline = time.monotonic() + 60
            while rewrapped() < 20 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, "rewrap ended before it could be stopped"
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    done = rewrapped()
    assert 20 <= done < len(keys)
    assert code == 143, err.read_text()
    assert "Traceback" not in err.read_text()
    assert f"resumes after {keys[done - 1]}" in err.read_text(), err.read_text()
    checkpoint = os.path.join(
        volume_cache_dir(str(volume.cache_dir), volume.endpoint_url, parse_url(volume.url)),
        "rewrap.checkpoint",
    )
    with open(checkpoint) as f:
        assert json.load(f)["after"] == keys[done - 1]

    rest = admin(volume, "rewrap").stdout
    assert f"resumed after {keys[done - 1]}" in rest, rest
    left = len(keys) - done
    assert f"examined {left} object(s): 0 already under the active key, {left} re-wrapped" in rest
    versions = envelope_versions(s3client, volume.bucket, volume.prefix)
    assert sorted(versions) == keys and set(versions.values()) == {("s3cryptfs-password", "2")}
