"""A throwaway PyKMIP server on 127.0.0.1 with its own certificate authority.

* :func:`make_pki` writes a CA, a server certificate (SAN IP 127.0.0.1, serverAuth) and client
  certificates (clientAuth EKU; the server takes the client identity from the subject CN).
* :class:`KmipServer` writes a ``server.conf`` (auth_suite TLS1.2, empty policy directory,
  SQLite database in its work directory, a free port), starts ``pykmip-server`` and stops it by PID.
* :class:`SilentListener` accepts TCP connections and never says a word (a KMIP server that
  hangs before the TLS handshake).

This module does not import pytest; the test module wraps it in fixtures.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from servers import LOOPBACK, _pdeathsig_prefix, _tail, free_port, stop_process

# PyKMIP waits for open sessions on SIGTERM (4-15 s); a throwaway instance is SIGKILLed sooner.
KMIP_STOP_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: CertPair
    clients: dict[str, CertPair]  # by common name


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class _Authority:
    def __init__(self, cn: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, cn: str, usage: x509.ObjectIdentifier, directory: Path, ip: str | None = None
    ) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if ip is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        pair = CertPair(directory / f"{cn}.crt", directory / f"{cn}.key")
        _write_cert(cert, pair.cert)
        _write_key(key, pair.key)
        return pair


def make_pki(directory: Path, clients: list[str], ca_name: str = "s3cryptfs test CA") -> Pki:
    """A fresh CA in *directory*, a server certificate for 127.0.0.1 and one client per CN."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = _Authority(ca_name)
    ca_path = directory / "ca.crt"
    _write_cert(authority.cert, ca_path)
    server = authority.issue("kmip-server", ExtendedKeyUsageOID.SERVER_AUTH, directory, LOOPBACK)
    issued = {cn: authority.issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, directory) for cn in clients}
    return Pki(ca_path, server, issued)


# --------------------------------------------------------------------------------------------
# The server


def find_pykmip_server() -> list[str]:
    """The command that runs PyKMIP's server with this interpreter."""
    script = shutil.which("pykmip-server", path=str(Path(sys.executable).parent))
    if script:
        return [script]
    return [sys.executable, "-c", "from kmip.services.server.server import main; main()"]


class KmipServer:
    """``pykmip-server`` on a free loopback port, configured for mutual TLS with *pki*."""

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        *,
        command: list[str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.command = command or find_pykmip_server()
        self.startup_timeout = startup_timeout
        self.log_path = workdir / "server.log"
        self.conf_path = workdir / "server.conf"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def _write_conf(self) -> None:
        policies = self.workdir / "policies"
        policies.mkdir(exist_ok=True)
        self.conf_path.write_text(
            "[server]\n"
            f"hostname={LOOPBACK}\n"
            f"port={self.port}\n"
            f"certificate_path={self.pki.server.cert}\n"
            f"key_path={self.pki.server.key}\n"
            f"ca_path={self.pki.ca}\n"
            "auth_suite=TLS1.2\n"
            f"policy_path={policies}\n"
            "enable_tls_client_auth=True\n"
            "logging_level=INFO\n"
            f"database_path={self.workdir / 'pykmip.db'}\n"
        )

    def start(self) -> KmipServer:
        last_error: Exception | None = None
        for _attempt in range(3):  # the port may be taken between our check and its bind
            self.port = free_port()
            self._write_conf()
            with open(self.workdir / "stdout.log", "ab") as out:
                self.proc = subprocess.Popen(
                    _pdeathsig_prefix()
                    + self.command
                    + ["-f", str(self.conf_path), "-l", str(self.log_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last_error = exc
                self.stop()
        raise RuntimeError(f"pykmip-server did not start: {last_error}")

    def _wait_ready(self) -> None:
        """Until a TLS handshake with a client certificate succeeds."""
        assert self.proc is not None
        client = next(iter(self.pki.clients.values()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(self.pki.ca))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        deadline = time.monotonic() + self.startup_timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"exited with {self.proc.returncode}; log {self.log_path}:\n"
                    + _tail(self.log_path)
                    + _tail(self.workdir / "stdout.log")
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=2) as raw:
                    with ctx.wrap_socket(raw, server_hostname=LOOPBACK):
                        return
            except OSError as exc:
                error = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"not ready after {self.startup_timeout:.0f} s (last error: {error!r}); "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a while. Idempotent."""
        if self.proc is not None:
            stop_process(self.proc, KMIP_STOP_TIMEOUT)

    def __enter__(self) -> KmipServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# A server that never answers


class SilentListener:
    """Accepts TCP connections on a loopback port and never sends a byte (nor closes them)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="SilentListener")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(5)
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.close()
