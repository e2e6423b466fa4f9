"""cat, get, put and fsck: reading and checking a volume without a mount (disaster recovery),
on objects written through the mount."""

from __future__ import annotations

import os
import stat

from tests.test_robustness import get_body

BIG = os.urandom(3 * 1024 * 1024 + 4321)


def fill(vol) -> None:
    m = vol.mountpoint
    (m / "docs").mkdir()
    (m / "docs" / "note.txt").write_bytes(b"hello offline world\n")
    os.chmod(m / "docs" / "note.txt", 0o640)
    os.utime(m / "docs" / "note.txt", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    (m / "big.bin").write_bytes(BIG)
    (m / "empty").write_bytes(b"")
    vol.umount()


def obj(vol, name: str) -> str:
    return f"s3://{vol.bucket}/{vol.prefix}{name}"


def test_cat_and_get(mounted, tmp_path):
    vol = mounted
    fill(vol)
    common = vol.common_args()
    out = vol.run("cat", obj(vol, "docs/note.txt"), *common).stdout
    assert out == "hello offline world\n"
    # the volume is found above the key, or given
    vol.run("get", obj(vol, "big.bin"), tmp_path / "big.out", *common, "--volume", vol.url)
    assert (tmp_path / "big.out").read_bytes() == BIG
    vol.run("get", obj(vol, "docs/note.txt"), tmp_path, *common)
    st = os.stat(tmp_path / "note.txt")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 1_700_000_000_000_000_000
    assert vol.run("cat", obj(vol, "empty"), *common).stdout == ""
    missing = vol.run("cat", obj(vol, "nope"), *common, check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def test_put_then_read_through_the_mount(mounted, tmp_path):
    vol = mounted
    fill(vol)
    local = tmp_path / "local.dat"
    local.write_bytes(b"put without a mount\n" * 1000)
    common = vol.common_args()
    vol.run("put", local, obj(vol, "docs/put.dat"), *common)
    refused = vol.run("put", local, obj(vol, "docs/put.dat"), *common, check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr
    local.write_bytes(b"second version\n")
    vol.run("put", local, obj(vol, "docs/put.dat"), *common, "--force")
    vol.mount()
    assert (vol.mountpoint / "docs" / "put.dat").read_bytes() == b"second version\n"
    assert (vol.mountpoint / "big.bin").read_bytes() == BIG


def test_fsck_finds_tampering(mounted, s3client):
    vol = mounted
    fill(vol)
    ok = vol.run("fsck", vol.url, *vol.common_args(), "--full")
    assert "0 bad object(s)" in ok.stdout
    assert "s3cryptfs-password version 1: 3 ok" in ok.stdout, ok.stdout
    # flip a byte in the middle of big.bin's body: only --full can see it
    key = f"{vol.prefix}big.bin"
    head = s3client.head_object(Bucket=vol.bucket, Key=key)
    body = bytearray(get_body(s3client, vol.bucket, key))
    body[len(body) // 2] ^= 1
    s3client.put_object(Bucket=vol.bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])
    quick = vol.run("fsck", vol.url, *vol.common_args())
    assert quick.returncode == 0
    full = vol.run("fsck", vol.url, *vol.common_args(), "--full", check=False)
    assert full.returncode == 1
    assert f"BAD {key}" in full.stdout and "1 bad object(s)" in full.stdout
    # a damaged envelope is found without downloading data
    key2 = f"{vol.prefix}docs/note.txt"
    meta = dict(s3client.head_object(Bucket=vol.bucket, Key=key2)["Metadata"])
    meta["encryption-key-version"] = "7"
    s3client.copy_object(
        Bucket=vol.bucket,
        Key=key2,
        CopySource={"Bucket": vol.bucket, "Key": key2},
        Metadata=meta,
        MetadataDirective="REPLACE",
    )
    quick = vol.run("fsck", vol.url, *vol.common_args(), check=False)
    assert quick.returncode == 1 and f"BAD {key2}" in quick.stdout
    cat = vol.run("cat", obj(vol, "big.bin"), *vol.common_args(), check=False)
    assert cat.returncode == 8 and "Traceback" not in cat.stderr  # an integrity error
    envelope = vol.run("cat", obj(vol, "docs/note.txt"), *vol.common_args(), check=False)
    assert envelope.returncode == 7, envelope.stderr  # version 7 of the key: unknown


def test_a_put_holds_its_key_version_until_the_object_is_in_s3(
    volume, s3client, tmp_path, monkeypatch
):
    """`put` seals under the active key version, then uploads: a `keys retire` run meanwhile
    from another shell must wait for it as for a mount (its record under .s3cryptfs/mounts/,
    withdrawn once the object is in S3)."""
    from s3cryptfs import cli, registry
    from s3cryptfs.store import native, s3

    volume.init()
    local = tmp_path / "local.dat"
    local.write_bytes(b"put while a retire may run\n" * 100)
    seen: list[list[registry.MountRecord]] = []

    def recording(real):  # type: ignore[no-untyped-def]
        def upload_file(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(registry.read_all(self, volume.prefix))
            return real(self, *args, **kwargs)

        return upload_file

    for cls in (native.NativeStore, s3.S3Store):
        monkeypatch.setattr(cls, "upload_file", recording(cls.upload_file))
    for name, value in volume.env.items():
        monkeypatch.setenv(name, value)
    args = ["put", str(local), obj(volume, "put.dat"), *volume.common_args()]
    assert cli.main(args) == 0
    assert len(seen) == 1 and len(seen[0]) == 1
    during = seen[0][0]
    assert during.holds == [("s3cryptfs-password", 1)]
    waiting, _ = registry.blockers(seen[0], "s3cryptfs-password", 1, during.generation)
    assert waiting, "a retire of that version would have waited"
    records = f"{volume.prefix}.s3cryptfs/mounts/"
    left = s3client.list_objects_v2(Bucket=volume.bucket, Prefix=records)
    assert left.get("KeyCount", 0) == 0
