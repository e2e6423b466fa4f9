"""The mount's settings, declared once in s3cryptfs/options.py, and everything made from them:
the flags, the TOML keys, the S3CRYPTFS_* variables, the fstab options, FsOptions, and the
option tables of docs/CONFIGURATION.md and docs/CLI.md. Pure but for the last test, which
mounts (SeaweedFS, FUSE)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
from pathlib import Path

import pytest

from s3cryptfs import config, mounthelper, options, options_doc, settings
from s3cryptfs.cli import build_parser
from s3cryptfs.cli.mount import mount_spec, resolve_mount_settings
from s3cryptfs.errors import ConfigError
from s3cryptfs.keys import config as kms_config
from s3cryptfs.vfs.core import FsOptions

# The surface as it was documented before the table existed: (flag, TOML key, read from the
# environment, default). Renaming any of these breaks fstab lines, units and files in the field.
STABLE = [
    ("--endpoint-url", "endpoint_url", True, None),
    ("--region", "region", True, None),
    ("--password-file", "password_file", True, None),
    ("--kms-config", "kms_config", True, None),
    ("--audit-log", "audit_log", True, None),
    ("--gateway-master-key-file", "gateway_master_key_file", True, None),
    ("--cache-dir", "cache_dir", True, None),
    ("--cache-size", "cache_size", True, "2G"),
    ("--memory-cache", "memory_cache", True, "64M"),
    ("--disk-cache", "disk_cache", True, "0"),
    ("--read-only", "read_only", True, False),
    ("--allow-other", "allow_other", True, False),
    ("--uid", "uid", True, None),
    ("--gid", "gid", True, None),
    ("--sync-close", "sync_close", True, False),
    ("--trust-attributes", "trust_attributes", True, False),
    ("--max-whole-object", "max_whole_object", True, "256M"),
    ("--dir-cache-ttl", "dir_cache_ttl", True, 5.0),
    ("--s3-timeout", "s3_timeout", True, 45.0),
    ("--stop-timeout", "stop_timeout", True, 120.0),
    ("--log-level", "log_level", True, "info"),
    ("--log-file", "log_file", True, None),
    ("-o", "options", False, []),
    # flags only until the table: now keys and variables too
    ("--dek-cache-ttl", "dek_cache_ttl", True, 300.0),
    ("--descriptor-refresh", "descriptor_refresh", True, 60.0),
]


def _mount_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["mount"]


def _mount_args(*argv: str, env: dict[str, str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(["mount", *argv])
    args.config_origin = settings.apply(args, None, env or {})
    return args


def test_the_documented_names_and_defaults_stay():
    flags = {s: a for a in _mount_parser()._actions for s in a.option_strings}
    for flag, key, from_env, default in STABLE:
        option = options.IN_FILE[key]
        assert flag in option.option_strings
        assert option.env is from_env, key
        assert flags[flag].default == default, flag
    assert {"url", "mountpoint"} <= set(options.IN_FILE)
    assert not options.BY_NAME["config"].in_file and not options.BY_NAME["foreground"].in_file


def test_the_mount_parser_is_the_table():
    actions = {a.dest: a for a in _mount_parser()._actions if a.dest != "help"}
    assert set(actions) == {o.attr for o in options.OPTIONS}
    for option in options.OPTIONS:
        action = actions[option.attr]
        assert tuple(action.option_strings) == option.option_strings
        if option.kind is not options.Kind.LIST:
            assert action.default == option.default, option.name
        assert "`" not in (action.help or "")


def test_the_option_tables_of_the_docs_are_current():
    stale = [str(p) for p, (text, wanted) in options_doc.documents().items() if text != wanted]
    assert not stale, f"run python3 -m s3cryptfs.options_doc to rewrite: {stale}"


def test_every_documented_key_is_a_key():
    """Outside the generated table too: no key of CONFIGURATION.md's example is unknown."""
    text = (options_doc.DOCS / "CONFIGURATION.md").read_text()
    example = text.split("## Example", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    keys = [line.split("=")[0].strip() for line in example.splitlines() if "=" in line]
    assert keys and set(keys) <= set(options.IN_FILE)


def test_every_option_missing_from_a_surface_says_why():
    for option in options.OPTIONS:
        assert (option.in_file and option.env) or option.not_everywhere, option.name
        assert option.help and not option.help.endswith("."), option.name


def test_every_fs_options_field_is_set_by_an_option_or_explained():
    fields = {f.name for f in dataclasses.fields(FsOptions)}
    filled = [o.field for o in options.OPTIONS if o.layer is options.Layer.FS]
    assert None not in filled and len(filled) == len(set(filled))
    assert set(filled) <= fields
    assert set(options.FS_INTERNAL) <= fields
    unset = fields - set(filled) - set(options.FS_INTERNAL)
    assert not unset, f"FsOptions fields no option sets: {sorted(unset)} (options.FS_INTERNAL)"
    assert not set(filled) & set(options.FS_INTERNAL)


def test_no_setting_variable_is_a_secret_variable():
    names = {o.env_name for o in options.OPTIONS if o.env}
    secrets = set(kms_config.SECRET_ENV) | {config.PASSWORD_ENV, "S3CRYPTFS_EXPORT_PASSWORD"}
    assert not names & secrets
    assert not any(n.startswith(kms_config.GENERIC_PREFIX) for n in names)


@pytest.mark.parametrize(
    "option", [o for o in mounthelper._FLAGS.values()], ids=lambda o: o.name
)
def test_every_fstab_option_becomes_a_flag_mount_takes(option):
    value = {"bool": "", "int": "=7", "float": "=7", "mode": "=0640"}.get(
        option.kind.value, f"={option.choices[-1]}" if option.choices else "=x"
    )
    argv = mounthelper.translate("s3://b/p", "/mnt", [option.name + value, "noatime"])
    args = build_parser().parse_args(argv)
    assert args.fuse_opts == ["noatime"]
    if option.kind is options.Kind.BOOL:
        assert getattr(args, option.attr) is True
    else:
        assert str(getattr(args, option.attr)).removesuffix(".0") == value[1:]


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mount.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "line, value",
    [
        ('file_mode = "0640"', "0640"),
        ("file_mode = 0o640", "0640"),
        ("dek_cache_ttl = 10", 10.0),
        ('log_level = "DEBUG"', "debug"),
        ("cache_size = 1024", "1024"),
        ("upload_concurrency = 2", 2),
    ],
)
def test_file_values(tmp_path, line, value):
    cfg = settings.load_file(_file(tmp_path, line + "\n"))
    key = line.split(" ")[0]
    assert cfg.values[key] == value


@pytest.mark.parametrize(
    "line, error",
    [
        ("file_mode = 644", "file_mode = 644 is not a mode"),
        ("file_mode = true", "file_mode must be a str or int"),
        ('log_level = "loud"', "log_level must be one of debug, info, warning, error"),
        ('upload_concurrency = "2"', "upload_concurrency must be a int"),
        ("foreground = true", "unknown key 'foreground'"),
    ],
)
def test_file_errors(tmp_path, line, error):
    with pytest.raises(ConfigError, match=error):
        settings.load_file(_file(tmp_path, line + "\n"))


def test_environment_and_precedence(tmp_path):
    cfg = settings.load_file(_file(tmp_path, "descriptor_refresh = 5\ndir_mode = 0o700\n"))
    args = build_parser().parse_args(["mount", "--dir-mode", "0750"])
    env = {"S3CRYPTFS_DESCRIPTOR_REFRESH": "9", "S3CRYPTFS_URL": "s3://elsewhere"}
    origin = settings.apply(args, cfg, env)
    assert (args.descriptor_refresh, origin["descriptor_refresh"]) == (9.0, "environment")
    assert (args.dir_mode, origin["dir_mode"]) == ("0750", "flag")
    assert args.url is None  # never from the environment
    with pytest.raises(ConfigError, match="S3CRYPTFS_LOG_LEVEL='loud': expected one of"):
        settings.apply(args, None, {"S3CRYPTFS_LOG_LEVEL": "loud"})


def test_the_layers_get_the_values(tmp_path):
    args = _mount_args(
        "s3://bucket/p",
        str(tmp_path),
        "--file-mode=600",
        "--upload-concurrency=3",
        "--cache-size=1M",
        "--dek-cache-ttl=0",
        "-o",
        "noatime,ro",
        env={"S3CRYPTFS_DIR_MODE": "0o711", "S3CRYPTFS_UID": "7"},
    )
    spec = mount_spec(args, None)
    fs = spec.fs_options
    assert (fs.file_mode, fs.dir_mode, fs.upload_concurrency) == (0o600, 0o711, 3)
    assert (fs.uid, fs.gid, fs.journal_limit) == (7, os.getgid(), 2**20)
    assert (fs.io_threads, fs.stream_uploads, fs.upload_helper) == (16, True, True)
    assert spec.fuse_options == ["noatime", "ro"]
    assert (spec.dek_cache_ttl, spec.dek_cache_entries) == (0.0, 0)


@pytest.mark.parametrize(
    "argv, env, error",
    [
        (["--file-mode", "4755"], {}, "--file-mode: '4755' is not a permission mode"),
        (["--dir-mode", "9"], {}, "--dir-mode: '9' is not a permission mode"),
        ([], {"S3CRYPTFS_UPLOAD_CONCURRENCY": "0"}, "S3CRYPTFS_UPLOAD_CONCURRENCY: must be at"),
        (["--memory-cache", "lots"], {}, "--memory-cache: 'lots' is not a size"),
    ],
)
def test_bad_values_are_refused_before_the_password(monkeypatch, argv, env, error):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["mount", "s3://bucket/p", "/mnt", *argv])
    with pytest.raises(ConfigError, match=error):
        resolve_mount_settings(args)


# --- through a mount ------------------------------------------------------------------------


def test_modes_and_upload_concurrency_reach_the_mount(volume, s3client):
    """Objects that carry no mode (here plaintext ones, which the volume allows) and the root
    get --file-mode and --dir-mode; one upload at a time still uploads everything."""
    s3client.put_object(Bucket=volume.bucket, Key=volume.prefix + "plain.txt", Body=b"plain\n")
    volume.init("--allow-plaintext")
    volume.mount("--file-mode", "0600", "--dir-mode", "0750", "--upload-concurrency", "1")
    m = volume.mountpoint
    assert stat.S_IMODE(os.stat(m).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(m / "plain.txt").st_mode) == 0o600
    want = {f"f{i}": os.urandom(1000 + i) for i in range(6)}
    for name, data in want.items():
        (m / name).write_bytes(data)
    volume.umount()  # waits until all six are in S3
    volume.mount()
    assert stat.S_IMODE(os.stat(m).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(m / "plain.txt").st_mode) == 0o644
    for name, data in want.items():
        assert (m / name).read_bytes() == data
