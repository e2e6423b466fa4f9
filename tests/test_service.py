"""Running as a service: the TOML configuration, `config check`, the mount.s3cryptfs helper as
mount(8) runs it, umount(8), the systemd notify protocol and the mount unit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT, is_mounted


def write_config(vol, tmp_path, extra: str = "", name: str = "vol.toml"):
    path = tmp_path / name
    path.write_text(
        f'url = "{vol.url}"\n'
        f'mountpoint = "{vol.mountpoint}"\n'
        f'endpoint_url = "{vol.endpoint_url}"\n'
        f'password_file = "{vol.password_file}"\n'
        f'cache_dir = "{vol.cache_dir}"\n'
        "dir_cache_ttl = 2\n" + extra
    )
    return path


def test_config_check_reports_effective_settings_and_errors(volume, tmp_path):
    cfg = write_config(volume, tmp_path, '[encryption]\npassword = "a secret that must not show"\n')
    cfg.chmod(0o600)
    plain_env = volume.env
    volume.env = {**plain_env, "S3CRYPTFS_DIR_CACHE_TTL": "7"}
    out = volume.run("config", "check", cfg).stdout
    volume.env = plain_env
    assert "valid" in out
    assert "dir_cache_ttl = 7.0  # environment" in out  # environment beats the file
    assert f"endpoint_url = '{volume.endpoint_url}'  # {cfg}" in out
    assert "a secret that must not show" not in out and "********" in out
    cfg.chmod(0o644)
    loose = volume.run("config", "check", cfg, check=False)
    assert loose.returncode != 0 and "chmod 600" in loose.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('url = "s3://b/p"\n\ncache_sise = "1G"\n')
    proc = volume.run("config", "check", bad, check=False)
    assert proc.returncode != 0 and f"{bad}:3: unknown key 'cache_sise'" in proc.stderr
    bad.write_text('url = "s3://b/p"\nread_only = "yes"\n')
    proc = volume.run("config", "check", bad, check=False)
    assert f"{bad}:2: read_only must be a bool" in proc.stderr
    bad.write_text("url = \n")
    proc = volume.run("config", "check", bad, check=False)
    assert "not valid TOML" in proc.stderr and "line 1" in proc.stderr
    proc = volume.run("config", "check", tmp_path / "missing.toml", check=False)
    assert "configuration file not found" in proc.stderr
    assert all("Traceback" not in p for p in (proc.stderr, loose.stderr))


def test_mount_from_config_file(volume, tmp_path):
    volume.init()
    cfg = write_config(volume, tmp_path)
    volume.run("mount", "--config", cfg, require_detached=True)
    assert volume.is_mounted()
    (volume.mountpoint / "f").write_bytes(b"from a config file")
    volume.umount()
    # a flag beats the file: mount read-only this time
    volume.run("mount", "--config", cfg, "--read-only", require_detached=True)
    assert (volume.mountpoint / "f").read_bytes() == b"from a config file"
    try:
        (volume.mountpoint / "g").write_bytes(b"x")
        raise AssertionError("a read-only mount accepted a write")
    except OSError:
        pass


def test_fstab_helper_as_mount_runs_it(volume, tmp_path):
    volume.init()
    cfg = write_config(volume, tmp_path)
    helper = [sys.executable, "-m", "s3cryptfs.mounthelper"]
    opts = "rw,_netdev,nofail,x-systemd.automount,noauto,config=" + str(cfg)
    # exactly what mount(8) passes: SOURCE MOUNTPOINT -o OPTIONS (and -n when told not to
    # write mtab); -f (fake) only prints what it would do
    fake = subprocess.run(
        [*helper, volume.url, str(volume.mountpoint), "-f", "-o", opts],
        env=volume.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fake.returncode == 0 and "--config" in fake.stderr and "_netdev" not in fake.stderr
    assert not volume.is_mounted()
    proc = subprocess.run(
        [*helper, volume.url, str(volume.mountpoint), "-n", "-o", opts],
        env=volume.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert volume.is_mounted()
    (volume.mountpoint / "f").write_bytes(b"via fstab")
    volume.umount()


def test_mount_and_umount_commands(volume, tmp_path):
    """mount(8) with type s3cryptfs finds /sbin/mount.s3cryptfs (.ci/run installs it); umount(8)
    unmounts at once and the mount process still uploads what was written, then exits."""
    volume.init()
    cfg = write_config(volume, tmp_path)
    proc = subprocess.run(
        [
            "mount",
            "-t",
            "s3cryptfs",
            "-o",
            f"_netdev,config={cfg}",
            volume.url,
            str(volume.mountpoint),
        ],
        env=volume.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(volume.mountpoint)
    pid = int(os.getxattr(volume.mountpoint, "user.s3cryptfs.pid"))
    data = os.urandom(3 * 1024 * 1024)
    (volume.mountpoint / "big").write_bytes(data)
    subprocess.run(["umount", str(volume.mountpoint)], check=True, timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}")
    volume.mount()
    assert (volume.mountpoint / "big").read_bytes() == data


def test_systemd_notify_protocol_and_drain_on_sigterm(volume, tmp_path):
    volume.init()
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    env = {**volume.env, "NOTIFY_SOCKET": sock_path}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s3cryptfs",
            "mount",
            volume.url,
            str(volume.mountpoint),
            *volume.common_args(),
            "--cache-dir",
            str(volume.cache_dir),
            "--foreground",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        messages = sock.recv(4096).decode()
        assert "READY=1" in messages
        assert volume.is_mounted()
        data = os.urandom(5 * 1024 * 1024)
        (volume.mountpoint / "f").write_bytes(data)
        proc.send_signal(signal.SIGTERM)
        stopping = sock.recv(4096).decode()
        assert "STOPPING=1" in stopping and "STATUS=" in stopping
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert not volume.is_mounted()
    journal = [p for p in volume.cache_dir.glob("*/journal/*") if p.is_file()]
    assert not journal  # nothing left dirty
    volume.mount()
    assert (volume.mountpoint / "f").read_bytes() == data


def test_mount_unit_verifies(tmp_path):
    text = (REPO_ROOT / "systemd" / "s3cryptfs@.service").read_text()
    unit = tmp_path / "s3cryptfs@demo.service"
    unit.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "Type=notify" in text and "LoadCredential=password:" in text
    from s3cryptfs.exitcodes import EXIT_INTEGRITY, EXIT_USAGE, EXIT_VOLUME, EXIT_WRONG_PASSWORD

    # a wrong password, a bad configuration or a tampered descriptor is not retried every 10 s
    prevented = {EXIT_USAGE, EXIT_WRONG_PASSWORD, EXIT_VOLUME, EXIT_INTEGRITY}
    line = next(x for x in text.splitlines() if x.startswith("RestartPreventExitStatus="))
    assert {int(v) for v in line.split("=", 1)[1].split()} == prevented
    for namespaced in ("PrivateTmp=", "ProtectSystem=", "ProtectHome="):
        assert f"\n{namespaced}" not in text  # the mount must stay visible to the system


def test_status_and_runtime_log_level(mounted, tmp_path):
    vol = mounted
    (vol.mountpoint / "a").write_bytes(b"x" * 100_000)
    assert (vol.mountpoint / "a").read_bytes() == b"x" * 100_000
    out = vol.run("status", vol.mountpoint).stdout
    assert "dirty files:" in out and "block cache:" in out
    assert "key manager:  s3cryptfs-password: ok" in out
    assert "inodes:       " in out and "(limit 200000), 0 dropped" in out
    raw = json.loads(vol.run("status", vol.mountpoint, "--json").stdout)
    assert raw["requests"].get("put", 0) >= 1 and raw["uploads"]["queued"] >= 0
    assert raw["kernel"]["requests"]["create"] >= 1 and raw["kernel"]["drop_stalls"] == 0
    not_mounted = vol.run("status", tmp_path, check=False)
    assert not_mounted.returncode != 0 and "not an s3cryptfs mount" in not_mounted.stderr
    # `status MNT | head -3` once the reader has gone: quiet, as other tools (no traceback)
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "wb") as closed:
        piped = subprocess.run(
            [sys.executable, "-m", "s3cryptfs", "status", str(vol.mountpoint)],
            stdout=closed,
            stderr=subprocess.PIPE,
            text=True,
            env=vol.env,
            timeout=60,
        )
    assert piped.stderr == "" and piped.returncode == 141, piped.stderr
    pid = int(os.getxattr(vol.mountpoint, "user.s3cryptfs.pid"))
    log = next(vol.cache_dir.glob("*/mount.log"))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "log level is now DEBUG" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "log level is now DEBUG" in log.read_text()
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while "log level is now INFO" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "log level is now INFO" in log.read_text()


def test_config_file_password_comes_after_the_environment(volume, tmp_path):
    """[encryption] password (the gateway's layout) is the last source: $S3CRYPTFS_PASSWORD wins."""
    from tests.conftest import PASSWORD

    volume.init()
    cfg = tmp_path / "pw-order.toml"
    cfg.write_text(
        f'url = "{volume.url}"\n'
        f'mountpoint = "{volume.mountpoint}"\n'
        f'endpoint_url = "{volume.endpoint_url}"\n'
        f'cache_dir = "{volume.cache_dir}"\n'
        '[encryption]\npassword = "not the volume password at all"\n'
    )
    cfg.chmod(0o600)
    plain_env = volume.env
    try:
        volume.env = {**plain_env, "S3CRYPTFS_PASSWORD": PASSWORD}
        volume.run("mount", "--config", cfg, require_detached=True)
        assert volume.is_mounted()
        volume.umount()
        volume.env = plain_env  # only the file's password is left: it is used, and wrong
        proc = volume.run("mount", "--config", cfg, check=False, require_detached=True)
        assert proc.returncode == 3 and not volume.is_mounted()
    finally:
        volume.env = plain_env
