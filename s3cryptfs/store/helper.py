"""Uploads in a helper process, so that botocore's Python stops competing with the FUSE loop.

Writing many small files is bound by one lock, not by the machine: the FUSE loop and the
threads that upload run under one GIL, and botocore spends a few milliseconds of Python per PUT
(building, signing, parsing). While uploads run in the mount's process, a writer of many small
files spends much of its time waiting for the GIL behind them, although the cores are far from
busy. The helper is a child process with its own client that uploads journal bodies (it reads
them from the journal itself: only names, offsets and metadata cross the socket), so that work
runs on another core.

The helper is an optimisation, never a dependency: until it has started, and whenever it
cannot be used, uploads run in worker threads as before. A helper that dies fails the calls it
held with a transient error (the uploader retries them, from the journal) and is started
again; after repeated deaths the mount stops using it.

The wire: a socketpair; each message is a 4-byte length and a pickle. Both ends are this
program, and the socket is reachable from nowhere else.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import trio

from s3cryptfs import errors
from s3cryptfs.errors import StoreError, TransientStoreError
from s3cryptfs.store.base import ObjectStore, StoreSettings
from s3cryptfs.store.factory import open_store

log = logging.getLogger(__name__)

# Only these S3Store methods may be called through the helper.
METHODS = frozenset({"upload_file"})
MAX_RESTARTS = 3  # deaths within RESTART_WINDOW before the mount gives up on the helper
RESTART_WINDOW = 60.0


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


def _error_from(name: str, message: str) -> BaseException:
    """Rebuild an error raised in the helper: ours by class, anything else as a StoreError."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, StoreError):
        return cls(message)
    return StoreError(f"{name}: {message}")


# The helper needs what boto3 reads (AWS_*, proxies, CA bundles, HOME); never the secrets the
# mount itself was given: a password, a KMS token.
_SECRET_PREFIXES = ("S3CRYPTFS_", "VAULT_", "BAO_", "KMIP_", "CREDENTIALS_DIRECTORY")


def helper_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in environ.items()
        if not name.startswith(_SECRET_PREFIXES)
        and ("PASSWORD" not in name.upper() or name.startswith("AWS_"))
    }


class HelperUnavailable(Exception):
    """No helper to take the call: run it in this process."""


@dataclass(eq=False)
class _Call:
    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


class UploadHelper:
    """The mount's side: starts the helper on first use and routes calls to it."""

    def __init__(self, store: ObjectStore, threads: int) -> None:
        self._store = store  # its request counters also count the helper's requests
        self._threads = max(1, threads)
        self._stream: trio.SocketStream | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: dict[int, _Call] = {}
        self._next_id = 0
        self._send_lock = trio.Lock()
        self._wanted = trio.Event()
        self._deaths: list[float] = []
        self.disabled = False
        self.calls = 0
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._stream is not None else None

    async def run(self) -> None:
        """Start the helper when first wanted, serve its replies, start it again if it dies."""
        await self._wanted.wait()
        while not self.disabled:
            try:
                await self._serve()
            except Exception as exc:  # noqa: BLE001 - never takes the mount down
                log.warning("upload helper: %s", exc)
            finally:
                self._stream = None
                self._fail_pending("the upload helper exited")
                self._reap()
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
            if len(self._deaths) > MAX_RESTARTS:
                log.error("upload helper keeps exiting; uploading from the mount process instead")
                self.disabled = True
                return
            self.restarts += 1
            log.warning("upload helper exited; starting it again")
            await trio.sleep(0.5)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run store.<method>(*args, **kwargs) in the helper. HelperUnavailable: not now."""
        if self.disabled:
            raise HelperUnavailable
        self._wanted.set()
        stream = self._stream
        if stream is None:
            raise HelperUnavailable
        self._next_id += 1
        call_id = self._next_id
        call = _Call()
        self._pending[call_id] = call
        try:
            frame = _frame((call_id, method, args, kwargs))
            with trio.CancelScope(shield=True):  # half a frame would garble the stream
                async with self._send_lock:
                    try:
                        await stream.send_all(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise HelperUnavailable from None  # it just died: run() restarts it
            self.calls += 1
            await call.done.wait()
        finally:
            self._pending.pop(call_id, None)
        if call.error is not None:
            raise call.error
        return call.value

    async def _serve(self) -> None:
        parent, child = socket.socketpair()
        try:
            self._proc = await trio.to_thread.run_sync(self._spawn, child)
        finally:
            child.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
        try:
            await self._talk(stream)
        finally:
            stream.socket.close()  # the helper sees the end of its socket and exits

    async def _talk(self, stream: trio.SocketStream) -> None:
        settings = (self._store.settings, self._threads, logging.getLogger().getEffectiveLevel())
        await stream.send_all(_frame(settings))
        buf = bytearray()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("connection closed")
            buf += data
            while len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big")
                if len(buf) < 4 + size:
                    break
                message = pickle.loads(buf[4 : 4 + size])
                del buf[: 4 + size]
                if message[0] == "ready":
                    self._stream = stream
                    log.debug("upload helper ready")
                else:
                    self._receive(message)

    def _spawn(self, child: socket.socket) -> subprocess.Popen[bytes]:
        env = helper_environment(os.environ)
        # the helper imports this very package, wherever it was loaded from
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-m", "s3cryptfs.store.helper", str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a ^C at the terminal is the mount's to handle
        )

    def _receive(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "log":
            _, name, level, text = message
            logging.getLogger(name).log(level, "%s", text)
            return
        _, call_id, ok, value, requests, errs = message
        with self._store.stats_lock:
            for table, delta in ((self._store.requests, requests), (self._store.errors, errs)):
                for op, n in delta.items():
                    table[op] = table.get(op, 0) + n
        call = self._pending.get(call_id)
        if call is None:
            return
        if ok:
            call.value = value
        else:
            call.error = _error_from(*value)
        call.done.set()

    def _fail_pending(self, why: str) -> None:
        for call in self._pending.values():
            if not call.done.is_set():
                call.error = TransientStoreError(why)
                call.done.set()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the helper process ------------------------------------------------------------------------


class _Forward(logging.Handler):
    """Sends the helper's log records to the mount, which logs them where it logs its own."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(("log", record.name, record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - the mount is gone; nothing to tell
            pass


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError
        buf += data
    return bytes(buf)


def _read_message(sock: socket.socket) -> Any:
    size = int.from_bytes(_read_exact(sock, 4), "big")
    return pickle.loads(_read_exact(sock, size))


def serve(sock: socket.socket) -> None:
    """The helper's main loop: calls in, replies out, until the mount closes the socket."""
    settings, threads, level = _read_message(sock)
    assert isinstance(settings, StoreSettings)
    lock = threading.Lock()

    def send(message: Any) -> None:
        frame = _frame(message)
        with lock:
            sock.sendall(frame)

    root = logging.getLogger()
    root.handlers[:] = [_Forward(send)]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, level))
    store = open_store(settings)
    send(("ready",))

    def run(call_id: int, method: str, args: Any, kwargs: Any) -> None:
        try:
            if method not in METHODS:
                raise StoreError(f"the upload helper does not do {method}")
            reply: tuple[Any, ...] = (True, getattr(store, method)(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply = (False, (type(exc).__name__, str(exc)))
        with store.stats_lock:
            requests, errs = store.requests, store.errors
            store.requests, store.errors = {}, {}
        try:
            send(("reply", call_id, *reply, requests, errs))
        except OSError:
            os._exit(0)  # the mount is gone

    with ThreadPoolExecutor(threads) as pool:
        while True:
            try:
                call_id, method, args, kwargs = _read_message(sock)
            except (EOFError, OSError):
                os._exit(0)  # the mount closed the socket: nobody waits for replies
            pool.submit(run, call_id, method, args, kwargs)


def main() -> None:
    # The mount decides when to stop; a SIGTERM to the whole service (systemd's default)
    # must not kill uploads the mount is still waiting for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
