"""Shared fixtures: real SeaweedFS servers, buckets, credentials, and a CLI-driven volume helper.

Servers start once per session (lazily, on first use) and are stopped by PID at the end.
The `Volume` helper drives the `s3cryptfs` command line exactly as a user would, in subprocesses.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from servers import SeaweedFS

AUTH_ACCESS_KEY = "s3cryptfs-test"
AUTH_SECRET_KEY = "s3cryptfs-secret-key"
PASSWORD = "correct horse battery staple"
CLI_TIMEOUT = 120.0
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Servers and S3


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory):
    """Pins (docs/SECURITY.md) go to a directory of the test session, never to /var/lib; every
    CLI subprocess inherits it."""
    path = tmp_path_factory.mktemp("state")
    old = os.environ.get("S3CRYPTFS_STATE_DIR")
    os.environ["S3CRYPTFS_STATE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("S3CRYPTFS_STATE_DIR", None)
    else:
        os.environ["S3CRYPTFS_STATE_DIR"] = old


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A `weed mini` that accepts any credentials."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweed_auth(tmp_path_factory):
    """A `weed mini` that only accepts AUTH_ACCESS_KEY / AUTH_SECRET_KEY (others get 403)."""
    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweed-auth"), identities={AUTH_ACCESS_KEY: AUTH_SECRET_KEY}
    )
    try:
        yield server
    finally:
        server.stop()


def unique_bucket_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def bucket(seaweed):
    """A fresh, empty bucket in `seaweed` (emptied and deleted afterwards)."""
    name = seaweed.make_bucket(unique_bucket_name())
    yield name
    seaweed.drop_bucket(name)


@pytest.fixture(scope="session")
def s3client(seaweed):
    """A boto3 S3 client for `seaweed`."""
    return seaweed.client()


def s3_environment(server: SeaweedFS) -> dict[str, str]:
    """os.environ plus credentials for `server`, isolated from the user's AWS configuration."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN")
        and not k.startswith("AWS_ENDPOINT_URL")
    }
    env.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    # `python -m s3cryptfs` must find the package under test even if it is not installed.
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@pytest.fixture
def s3env(seaweed) -> dict[str, str]:
    """Environment for subprocesses talking to `seaweed` (a fresh dict per test)."""
    return s3_environment(seaweed)


@pytest.fixture
def password_file(tmp_path) -> Path:
    """A 0600 file holding PASSWORD (no trailing newline)."""
    path = tmp_path / "password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(PASSWORD)
    return path


# --------------------------------------------------------------------------------------------
# Command line


def wait_until(predicate, timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll *predicate* until it is true; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class CliError(AssertionError):
    """An `s3cryptfs` command failed (or succeeded when it should not have)."""


def _describe(proc: subprocess.CompletedProcess) -> str:
    return (
        f"$ {' '.join(map(str, proc.args))}\n-> exit {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    )


def run_cli(
    *args,
    env: dict[str, str] | None = None,
    input: str | None = None,
    check: bool = False,
    timeout: float = CLI_TIMEOUT,
    require_detached: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python -m s3cryptfs ARGS` and return the CompletedProcess (text output).

    Output goes to temporary files, not pipes, so a daemon that forgets to detach from our
    stdout cannot make this call hang; with require_detached=True such a daemon is reported as a
    CliError instead (`$(s3cryptfs mount ...)`, mount(8) and systemd would wait for it forever).
    The command runs in its own process group, like a shell job; on timeout the group is killed.
    """
    cmd = [sys.executable, "-m", "s3cryptfs", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="s3cryptfs-cli-") as tmp:
        paths = [os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")]
        Path(paths[0]).write_text(input or "")
        with (
            open(paths[0], "rb") as stdin,
            open(paths[1], "wb+") as out,
            open(paths[2], "wb+") as err,
        ):
            proc = subprocess.Popen(
                cmd,
                stdin=stdin if input is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                process_group=0,
            )
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
            result = subprocess.CompletedProcess(cmd, rc, _read_back(out), _read_back(err))
        holders = _holders_of(paths) if require_detached else []
    if rc is None:
        raise CliError(f"timed out after {timeout} s\n" + _describe(result))
    if check and result.returncode != 0:
        raise CliError(_describe(result))
    if holders:
        raise CliError(
            f"processes kept the command's stdin/stdout/stderr open: {holders}\n"
            + _describe(result)
        )
    return result


def _read_back(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def _holders_of(paths: list[str]) -> list[tuple[int, int]]:
    """(pid, fd) of other processes that have one of `paths` open. Only readlink() is used:
    stat() on another process's fd could block forever on a hung FUSE mount."""
    wanted = set(paths)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(entry / "fd" / fd)
            except OSError:
                continue
            if target in wanted:
                found.append((int(entry.name), int(fd)))
    return found


@pytest.fixture
def cli(s3env):
    """run_cli with env defaulting to `s3env`."""

    def run(*args, env=None, input=None, check=False, timeout=CLI_TIMEOUT):
        return run_cli(
            *args, env=s3env if env is None else env, input=input, check=check, timeout=timeout
        )

    return run


# --------------------------------------------------------------------------------------------
# Mounts and processes


def _unescape_mount_field(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fuse_mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every FUSE mount in /proc/mounts."""
    mounts = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and (
                fields[2] in ("fuse", "fuseblk") or fields[2].startswith("fuse.")
            ):
                mounts.append((_unescape_mount_field(fields[1]), fields[2]))
    return mounts


def _resolve_without_touching(path: str | os.PathLike) -> str:
    """Canonical path without stat()ing the last component: on a mountpoint whose daemon hangs,
    even lstat() blocks forever."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mounted(path: str | os.PathLike) -> bool:
    """True if `path` is a mountpoint (of any filesystem) according to /proc/mounts."""
    target = _resolve_without_touching(path)
    with open("/proc/mounts") as f:
        return any(
            len(fields) >= 2 and _unescape_mount_field(fields[1]) == target
            for fields in (line.split() for line in f)
        )


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def processes_mentioning(text: str, *, also: str | None = None) -> list[int]:
    """PIDs whose command line has an argument containing `text` (and `also` somewhere), except
    this process and its ancestors (a wrapper may well mention the test directories)."""
    skip = _ancestors()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(text.encode() in arg for arg in argv) and (
            also is None or also.encode() in b" ".join(argv)
        ):
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_processes_mentioning(
    text: str, *, also: str | None = None, grace: float = 5.0
) -> list[int]:
    """Wait up to `grace` s for processes mentioning `text` to exit, then SIGKILL the rest."""
    deadline = time.monotonic() + grace
    while (pids := [p for p in processes_mentioning(text, also=also) if _alive(p)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def lazy_unmount(path: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["fusermount3", "-u", "-z", str(path)], capture_output=True, text=True, timeout=30
    )


# A line of the mount's log (cli/logs.py: "%(asctime)s %(levelname)s %(name)s: %(message)s")
# at a level that says something went wrong.
LOG_ERROR = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) ")


class Volume:
    """An s3cryptfs volume driven through its command line, as a user would.

    init():     s3cryptfs init URL --endpoint-url E --password-file F
    mount():    s3cryptfs mount URL MOUNTPOINT --endpoint-url E --password-file F --cache-dir C
    umount():   s3cryptfs umount MOUNTPOINT
    Every method returns the CompletedProcess; with check=True (default) a failure raises CliError.
    cleanup() (run at fixture teardown) unmounts whatever is left and kills leftover processes.

    At teardown its mounts' logs are checked: an ERROR (or CRITICAL) line fails the test unless
    the test declared it, with vol.expect_log_errors(PATTERN...) or the marker
    @pytest.mark.expect_log_errors(PATTERN...) (regular expressions searched in the line).
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str,
        password_file: str | os.PathLike,
        env: dict[str, str],
        workdir: str | os.PathLike,
    ):
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.password_file = Path(password_file)
        self.env = env
        self.workdir = Path(workdir)
        self.mountpoint = self.workdir / "mnt"
        self.cache_dir = self.workdir / "cache"
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.mount_args: tuple[str, ...] = ()
        self.last: subprocess.CompletedProcess | None = None
        self.expected_errors: list[re.Pattern[str]] = []
        self.log_files: set[Path] = set()  # --log-file of its mounts (besides the cache dir's)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"<Volume {self.url} at {self.mountpoint}>"

    def run(self, *args, check: bool = True, input: str | None = None, **kwargs):
        """Run any s3cryptfs subcommand with this volume's environment (see run_cli)."""
        words = [str(a) for a in args]
        if words[:1] == ["mount"] and "--log-file" in words[:-1]:
            self.log_files.add(Path(words[words.index("--log-file") + 1]))
        self.last = run_cli(*args, env=self.env, input=input, check=check, **kwargs)
        return self.last

    def expect_log_errors(self, *patterns: str) -> None:
        """ERROR lines this test provokes on purpose (an outage, tampering, a conflict): the
        teardown check lets lines matching one of *patterns* (regular expressions) through."""
        self.expected_errors += [re.compile(p) for p in patterns]

    def unexpected_log_errors(self, also_expected: list[re.Pattern[str]]) -> list[str]:
        """ERROR and CRITICAL lines of this volume's mount logs that nobody declared."""
        expected = self.expected_errors + also_expected
        paths = sorted(self.cache_dir.glob("*/mount.log")) + sorted(self.log_files)
        found = []
        for path in paths:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue  # a log file the mount could not create
            found += [
                f"{path.name}: {line}"
                for line in lines
                if LOG_ERROR.match(line) and not any(p.search(line) for p in expected)
            ]
        return found

    def common_args(self) -> list[str]:
        return ["--endpoint-url", self.endpoint_url, "--password-file", str(self.password_file)]

    def init(self, *extra, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("init", self.url, *self.common_args(), *extra, check=check)

    def mount(self, *extra, check: bool = True) -> subprocess.CompletedProcess:
        """Mount (the CLI daemonizes and returns once the mount is ready)."""
        self.mount_args = tuple(map(str, extra))
        proc = self.run(
            "mount",
            self.url,
            self.mountpoint,
            *self.common_args(),
            "--cache-dir",
            self.cache_dir,
            *self.mount_args,
            check=check,
            require_detached=True,
        )
        if check and not self.is_mounted():
            raise CliError("mount exited 0 but the mountpoint is not mounted\n" + _describe(proc))
        return proc

    def umount(self, check: bool = True) -> subprocess.CompletedProcess:
        """Unmount (the CLI waits until dirty files are uploaded)."""
        proc = self.run("umount", self.mountpoint, check=check)
        if check and self.is_mounted():
            raise CliError(
                "umount exited 0 but the mountpoint is still mounted\n" + _describe(proc)
            )
        return proc

    def remount(self, *extra) -> subprocess.CompletedProcess:
        """umount, then mount again (with the previous mount's extra arguments unless given)."""
        self.umount()
        return self.mount(*(extra or self.mount_args))

    def is_mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def wait_heartbeats(self, s3client, count: int = 2, timeout: float = 60.0) -> None:
        """Until the running mount has rewritten its record (.s3cryptfs/mounts/) *count* times.
        Each rewrite follows a re-read of the descriptor (mount.py, _heartbeat), so after two a
        whole re-read has happened since the call: what a test that changed the descriptor
        waits for (with --descriptor-refresh 1, a rewrite a second)."""
        prefix = f"{self.prefix}.s3cryptfs/mounts/"

        def stamps() -> dict[str, object]:
            listed = s3client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
            return {o["Key"]: o["LastModified"] for o in listed.get("Contents", [])}

        # LastModified has whole seconds, and rewrites are more than a second apart: each one
        # shows as a new value.
        last, seen = stamps(), 0
        deadline = time.monotonic() + timeout
        while seen < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the mount rewrote its record {seen} times in {timeout} s")
            time.sleep(0.1)
            now = stamps()
            if any(key in last and stamp != last[key] for key, stamp in now.items()):
                seen += 1
            last = now

    def pids(self) -> list[int]:
        """Live processes whose command line mentions this mountpoint (the mount daemon)."""
        return [p for p in processes_mentioning(str(self.mountpoint)) if _alive(p)]

    def cleanup(self) -> list[str]:
        """Unmount if still mounted (CLI, then `fusermount3 -u -z`), kill leftover processes.
        Returns notes on what had to be forced."""
        notes = []
        if self.is_mounted():
            try:
                proc = self.run("umount", self.mountpoint, check=False, timeout=60)
                if proc.returncode != 0:
                    notes.append(f"umount failed: {proc.stderr.strip()}")
            except CliError as exc:
                notes.append(str(exc))
            if self.is_mounted():
                lazy_unmount(self.mountpoint)
                notes.append("lazily unmounted")
        killed = kill_processes_mentioning(str(self.mountpoint))
        if killed:
            notes.append(f"killed leftover processes {killed}")
        return notes


@pytest.fixture
def make_volume(seaweed, s3env, password_file, tmp_path, request, bucket):
    """Factory: make_volume(bucket=None, prefix="vol/", password_file=None, env=None,
    endpoint_url=None) -> Volume (not initialized). Each volume gets its own mountpoint and cache
    dir; all are cleaned up at teardown, then their mount logs are checked (see Volume).
    bucket=None creates a fresh bucket. (The `bucket` fixture is set up first so that it is
    dropped last: a mount's unmount still uploads what waited for its upload delay.)"""
    volumes: list[Volume] = []

    def make(bucket=None, prefix="vol/", password_file=password_file, env=None, endpoint_url=None):
        vol = Volume(
            bucket=bucket or seaweed.make_bucket(unique_bucket_name()),
            prefix=prefix,
            endpoint_url=endpoint_url or seaweed.endpoint_url,
            password_file=password_file,
            env=s3env if env is None else env,
            workdir=tmp_path / f"volume{len(volumes)}",
        )
        volumes.append(vol)
        return vol

    yield make
    for vol in reversed(volumes):
        vol.cleanup()
    declared = [
        re.compile(pattern)
        for marker in request.node.iter_markers("expect_log_errors")
        for pattern in marker.args
    ]
    unexpected = [line for vol in volumes for line in vol.unexpected_log_errors(declared)]
    if unexpected:
        pytest.fail(
            "the mount logged errors the test did not declare (vol.expect_log_errors or "
            "@pytest.mark.expect_log_errors):\n" + "\n".join(unexpected[:20]),
            pytrace=False,
        )


@pytest.fixture
def volume(make_volume, bucket) -> Volume:
    """A Volume at s3://<fresh bucket>/vol/, neither initialized nor mounted."""
    return make_volume(bucket=bucket)


@pytest.fixture
def mounted(volume):
    """An initialized and mounted Volume (fresh bucket, prefix "vol/")."""
    volume.init()
    volume.mount()
    yield volume


# --------------------------------------------------------------------------------------------
# Session-wide safety net


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_mounts(tmp_path_factory, request):
    """At the end of the session no FUSE mount may remain under the test tmp dirs: unmount
    lazily and kill leftover processes, with a warning."""
    yield
    base = str(tmp_path_factory.getbasetemp().resolve())
    leftovers = [m for m, _ in fuse_mounts() if m == base or m.startswith(base.rstrip("/") + "/")]
    messages = []
    for mountpoint in leftovers:
        lazy_unmount(mountpoint)
        messages.append(f"WARNING: FUSE mount left behind, lazily unmounted: {mountpoint}")
    for pid in kill_processes_mentioning(base, also="s3cryptfs", grace=2.0 if leftovers else 0):
        messages.append(f"WARNING: process {pid} still used {base}; killed")
    if messages:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        for message in messages:
            if reporter is not None:
                reporter.write_line(message, yellow=True, bold=True)
            else:
                print(message, file=sys.stderr)
