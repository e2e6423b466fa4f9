"""Key custody: export and import of a volume's keys, the password policy, and the Go gateway's
configuration names (ENCRYPTION_PASSWORD, KEY_MANAGER_ENABLED)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.conftest import PASSWORD

FILES = {"a.txt": b"alpha\n", "dir/b.bin": os.urandom(200_000), "dir/sub/c": b"gamma"}


def secret_file(tmp_path, name: str, text: str):
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def write_files(root) -> None:
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_export_then_import_restores_a_destroyed_descriptor(mounted, s3client, tmp_path):
    vol = mounted
    write_files(vol.mountpoint)
    vol.umount()
    export_pw = secret_file(tmp_path, "export-pw", "a long export passphrase, kept offline")
    out = tmp_path / "keys.export"
    common = vol.common_args()
    vol.run(
        "keys", "export", vol.url, *common, "--output", out, "--export-password-file", export_pw
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    descriptor_key = f"{vol.prefix}.s3cryptfs/volume.json"
    descriptor = s3client.get_object(Bucket=vol.bucket, Key=descriptor_key)["Body"].read()
    blob = out.read_bytes()
    assert b"volume_id" not in blob and b"sealed" not in blob  # the export is sealed too

    s3client.delete_object(Bucket=vol.bucket, Key=descriptor_key)  # the disaster
    lost = vol.mount(check=False)
    assert lost.returncode != 0 and "not an s3cryptfs volume" in lost.stderr

    wrong = secret_file(tmp_path, "wrong-pw", "not the export passphrase at all")
    refused = vol.run(
        "keys", "import", out, vol.url, *common, "--export-password-file", wrong, check=False
    )
    assert refused.returncode == 3, refused.stderr
    assert "wrong export passphrase" in refused.stderr
    vol.run("keys", "import", out, vol.url, *common, "--export-password-file", export_pw)
    restored = json.loads(
        s3client.get_object(Bucket=vol.bucket, Key=descriptor_key)["Body"].read()
    )
    original = json.loads(descriptor)
    # The same keys, signed again as a later generation: machines that saw the descriptor
    # before the disaster take it as newer, not as a rollback.
    assert restored["key_manager"] == original["key_manager"]
    assert restored["volume_id"] == original["volume_id"]
    assert restored["generation"] > original["generation"]
    assert restored["auth"]["mac"] != original["auth"]["mac"]
    vol.mount()
    for name, data in FILES.items():
        assert (vol.mountpoint / name).read_bytes() == data, name


@pytest.mark.expect_log_errors(r"getattr failed: get \S*/\.s3cryptfs/dirs/")
def test_import_does_not_overwrite_another_volume(mounted, tmp_path):
    vol = mounted
    export_pw = secret_file(tmp_path, "export-pw", "a long export passphrase, kept offline")
    out = tmp_path / "keys.export"
    common = vol.common_args()
    vol.run(
        "keys", "export", vol.url, *common, "--output", out, "--export-password-file", export_pw
    )
    same = vol.run("keys", "import", out, vol.url, *common, "--export-password-file", export_pw)
    assert "nothing to do" in same.stdout
    other = f"s3://{vol.bucket}/other/"
    vol.run("init", other, *common)
    refused = vol.run(
        "keys", "import", out, other, *common, "--export-password-file", export_pw, check=False
    )
    assert refused.returncode != 0 and "--force" in refused.stderr


def one_line_error(proc, code: int, *words: str) -> None:
    """A refusal as the docs promise it: the documented exit code, one line, no traceback."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3cryptfs: "), proc.stderr
    assert all(w in lines[0] for w in words), proc.stderr


def test_bad_local_paths_are_one_line_errors(volume, tmp_path):
    """keys export over an existing file, keys import of a missing one, and any other command
    given a local path it cannot use: exit 2 and one line (they printed tracebacks)."""
    volume.init()
    common = volume.common_args()
    export_pw = secret_file(tmp_path, "export-pw", "a long export passphrase, kept offline")
    existing = tmp_path / "existing.export"
    existing.write_bytes(b"an earlier export")
    proc = volume.run(
        "keys", "export", volume.url, *common, "--output", existing,
        "--export-password-file", export_pw, check=False,
    )  # fmt: skip
    one_line_error(proc, 2, str(existing), "already exists")
    assert existing.read_bytes() == b"an earlier export"
    nowhere = tmp_path / "no-such-dir" / "keys.export"
    proc = volume.run(
        "keys", "export", volume.url, *common, "--output", nowhere,
        "--export-password-file", export_pw, check=False,
    )  # fmt: skip
    one_line_error(proc, 2, str(nowhere), "directory does not exist")
    missing = tmp_path / "missing.export"
    proc = volume.run(
        "keys", "import", missing, volume.url, *common, "--export-password-file", export_pw,
        check=False,
    )  # fmt: skip
    one_line_error(proc, 2, f"cannot read {missing}", "No such file")
    # No command has a message for every path: the last resort names it in one line too.
    proc = volume.run("put", missing, f"{volume.url}x", *common, check=False)
    one_line_error(proc, 2, f"cannot use {missing}", "No such file")
    local = tmp_path / "local.txt"
    local.write_bytes(b"local")
    volume.run("put", local, f"{volume.url}x", *common)
    proc = volume.run("get", f"{volume.url}x", nowhere, *common, check=False)
    one_line_error(proc, 2, f"cannot use {nowhere.parent}/", "No such file")
    # ...in the background mount process too (its log file is opened after the fork)
    proc = volume.run(
        "mount", volume.url, volume.mountpoint, *common, "--cache-dir", volume.cache_dir,
        "--log-file", nowhere, check=False, require_detached=True,
    )  # fmt: skip
    one_line_error(proc, 2, f"cannot open the log file {nowhere}", "No such file")
    assert not volume.is_mounted()


def test_short_passwords_are_refused(volume, s3client, tmp_path):
    short = secret_file(tmp_path, "short", "tooshort")
    proc = volume.run(
        "init",
        volume.url,
        "--endpoint-url",
        volume.endpoint_url,
        "--password-file",
        short,
        check=False,
    )
    assert proc.returncode != 0
    assert "at least 12 characters" in proc.stderr
    listed = s3client.list_objects_v2(Bucket=volume.bucket).get("Contents", [])
    assert listed == []  # nothing written
    volume.init()
    out = tmp_path / "keys.export"
    proc = volume.run(
        "keys",
        "export",
        volume.url,
        *volume.common_args(),
        "--output",
        out,
        "--export-password-file",
        short,
        check=False,
    )
    assert proc.returncode != 0 and "at least 12 characters" in proc.stderr
    assert not out.exists()


def test_gateway_password_variable(volume):
    env = {**volume.env, "ENCRYPTION_PASSWORD": PASSWORD}
    volume.env = env
    args = ["--endpoint-url", volume.endpoint_url]
    volume.run("init", volume.url, *args)
    volume.run(
        "mount",
        volume.url,
        volume.mountpoint,
        *args,
        "--cache-dir",
        volume.cache_dir,
        require_detached=True,
    )
    assert volume.is_mounted()
    (volume.mountpoint / "f").write_bytes(b"x")
    volume.umount()
    # and it is the same password as the file holds: a normal mount opens the volume
    volume.env = {k: v for k, v in env.items() if k != "ENCRYPTION_PASSWORD"}
    volume.mount()
    assert (volume.mountpoint / "f").read_bytes() == b"x"


@pytest.mark.parametrize("value", ["true", "maybe"])
def test_gateway_key_manager_switch_is_never_ignored(volume, value):
    volume.env = {**volume.env, "KEY_MANAGER_ENABLED": value}
    proc = volume.init(check=False)
    assert proc.returncode != 0
    assert "KEY_MANAGER_ENABLED" in proc.stderr and "Traceback" not in proc.stderr


def test_export_checks_the_password_it_claims_to_seal_under(volume, tmp_path):
    """An export says it holds keys sealed under the volume password: it is made only once the
    password given has opened them (and the descriptor has authenticated)."""
    volume.init()
    export_pw = secret_file(tmp_path, "export-pw", "a long export passphrase, kept offline")
    wrong = secret_file(tmp_path, "wrong", "not the volume password at all")
    out = tmp_path / "keys.export"
    refused = volume.run(
        "keys", "export", volume.url, "--endpoint-url", volume.endpoint_url,
        "--password-file", wrong, "--output", out, "--export-password-file", export_pw,
        check=False,
    )  # fmt: skip
    assert refused.returncode == 3, refused.stderr
    assert "wrong password" in refused.stderr and not out.exists()
