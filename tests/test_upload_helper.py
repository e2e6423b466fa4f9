"""Uploads run in a helper process (store/helper.py): the mount uses it, survives its death
without losing a file, and takes it down when it ends; its calls behave like the store's own."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import trio

from s3cryptfs.errors import EndpointUnreachable, PreconditionFailed, StoreError
from s3cryptfs.store.helper import HelperUnavailable, UploadHelper
from s3cryptfs.store.s3 import S3Store, StoreSettings
from tests.conftest import lazy_unmount


def stats(vol) -> dict:
    return json.loads(os.getxattr(vol.mountpoint, "user.s3cryptfs.stats"))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def helper_pid(vol) -> int:
    """Write a file so that the mount starts its helper; the helper's pid once it is ready."""
    (vol.mountpoint / "starter").write_bytes(b"starts the helper\n")
    return wait_for(lambda: stats(vol)["upload_helper"]["pid"])


def idle(vol) -> bool:
    uploads = stats(vol)["uploads"]
    return uploads["queued"] == 0 and uploads["in_flight"] == 0


def test_small_files_are_uploaded_by_the_helper(mounted, s3client):
    m = mounted.mountpoint
    pid = helper_pid(mounted)
    assert pid not in mounted.pids() and alive(pid)  # a process of its own
    before = stats(mounted)["upload_helper"]["calls"]
    contents = {f"f{i:03d}": os.urandom(100 + i) for i in range(60)}
    for name, data in contents.items():
        (m / name).write_bytes(data)
    wait_for(lambda: idle(mounted))
    s = stats(mounted)
    assert s["upload_helper"]["calls"] - before >= len(contents)
    assert s["requests"]["put"] >= len(contents)  # the helper's requests count as the mount's
    keys = {
        o["Key"]
        for o in s3client.list_objects_v2(Bucket=mounted.bucket, Prefix="vol/f").get("Contents", [])
    }
    assert keys == {f"vol/{name}" for name in contents}

    mounted.umount()
    wait_for(lambda: not alive(pid), timeout=10)  # it ends with the mount
    mounted.mount()
    for name, data in contents.items():
        assert (m / name).read_bytes() == data


@pytest.mark.expect_log_errors(r"upload of \S+ failed \(attempt")
def test_a_killed_helper_loses_nothing(mounted):
    m = mounted.mountpoint
    pid = helper_pid(mounted)
    contents = {f"g{i:03d}": os.urandom(4096) for i in range(150)}
    for i, (name, data) in enumerate(contents.items()):
        (m / name).write_bytes(data)
        if i == 20:
            os.kill(pid, signal.SIGKILL)  # uploads in flight and queued

    def replaced() -> dict | None:
        helper = stats(mounted)["upload_helper"]
        return helper if helper["pid"] not in (None, pid) else None

    helper = wait_for(replaced)
    assert helper["restarts"] >= 1 and not helper["disabled"]
    mounted.umount()  # waits until every file is in S3
    mounted.mount()
    for name, data in contents.items():
        assert (m / name).read_bytes() == data


def test_the_helper_ends_when_the_mount_is_killed(mounted):
    pid = helper_pid(mounted)
    for mount_pid in mounted.pids():
        os.kill(mount_pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), timeout=10)  # its socket closed: it exits
    lazy_unmount(mounted.mountpoint)


def test_the_helper_gets_none_of_the_mounts_secrets(make_volume, bucket, s3env):
    secrets = {"S3CRYPTFS_PASSWORD": "not for the helper", "VAULT_TOKEN": "s.secret"}
    vol = make_volume(bucket=bucket, env={**s3env, **secrets})
    vol.init()
    vol.mount()
    pid = helper_pid(vol)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert "AWS_ACCESS_KEY_ID" in names and "AWS_SECRET_ACCESS_KEY" in names
    assert not names & set(secrets)
    for value in secrets.values():
        assert value.encode() not in b"\0".join(environ)


# --- the helper on its own ---------------------------------------------------------------------


@pytest.fixture
def aws_env(s3env, monkeypatch):
    for name, value in s3env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


def run_with_helper(store: S3Store, body) -> UploadHelper:
    """Run body(helper) with a started helper; returns the helper after it was shut down."""
    helper = UploadHelper(store, 4)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(helper.run)
            with pytest.raises(HelperUnavailable):  # not started yet: the caller uses a thread
                await helper.call("upload_file", "x", "/nonexistent", {})
            with trio.fail_after(30):
                # The helper signals its start only by having a pid: poll it.
                while helper.pid is None:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            await body(helper)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return helper


def test_helper_calls_return_what_the_store_returns(seaweed, bucket, s3client, tmp_path, aws_env):
    store = S3Store(StoreSettings(bucket=bucket, endpoint_url=seaweed.endpoint_url))
    body = tmp_path / "body"
    body.write_bytes(b"head" + os.urandom(1000) + b"tail")
    seen: dict[str, object] = {}

    async def calls(helper: UploadHelper) -> None:
        seen["pid"] = helper.pid
        seen["etag"] = await helper.call(
            "upload_file", "obj", str(body), {"k": "v"}, None, True, offset=4, size=1000
        )
        with pytest.raises(PreconditionFailed):  # the object exists now
            await helper.call("upload_file", "obj", str(body), {}, None, True)
        with pytest.raises(StoreError, match="does not do"):
            await helper.call("delete", "obj")

    helper = run_with_helper(store, calls)
    obj = s3client.get_object(Bucket=bucket, Key="obj")
    assert obj["Body"].read() == body.read_bytes()[4:1004]
    assert obj["Metadata"] == {"k": "v"}
    assert obj["ETag"] == seen["etag"]
    assert store.requests["put"] == 2 and store.errors["PreconditionFailed"] == 1
    assert helper.calls == 3
    wait_for(lambda: not alive(seen["pid"]), timeout=10)


def test_helper_errors_and_log_lines_reach_the_mount(bucket, tmp_path, aws_env, caplog):
    # nothing listens on port 9 here: every attempt fails to connect until the deadline
    settings = StoreSettings(
        bucket=bucket, endpoint_url="http://127.0.0.1:9", retry_deadline=0.5, connect_timeout=0.5
    )
    body = tmp_path / "body"
    body.write_bytes(b"data")

    async def calls(helper: UploadHelper) -> None:
        with pytest.raises(EndpointUnreachable):
            await helper.call("upload_file", "obj", str(body), {})

    with caplog.at_level(logging.WARNING):
        run_with_helper(S3Store(settings), calls)
    forwarded = [r for r in caplog.records if r.name == "s3cryptfs.store.s3"]
    assert any("giving up" in r.getMessage() for r in forwarded), caplog.text
