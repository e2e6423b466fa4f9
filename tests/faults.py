"""A store that fails on purpose: the real S3Store (real SeaweedFS behind it), with faults
injected into chosen operations, as mountpoint-s3's FailureClient does. Failures are raised
inside the store's retry loop, so transient ones are retried and classified exactly as S3's
own would be. The upload helper process has a client of its own: file systems under test use
`upload_helper=False` so that every upload goes through this store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from s3cryptfs.errors import StoreError, TransientStoreError
from s3cryptfs.store.s3 import S3Store

T = TypeVar("T")


@dataclass
class Fault:
    op: str  # "put", "get", "head", "list", "copy", "delete", "upload" ... ("" = any)
    key_part: str = ""  # only operations whose key contains this
    times: int | None = 1  # how many calls fail; None = until healed
    error: Callable[[str], BaseException] = field(
        default=lambda what: TransientStoreError(f"{what}: injected S3 failure")
    )
    hang: float = 0.0  # seconds each failing call waits first (a server that does not answer)
    hits: int = 0


@dataclass
class _Hold:
    op: str
    key_part: str
    gate: threading.Event
    times: int | None  # calls still to be held; None = every one


class FaultyStore(S3Store):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._faults: list[Fault] = []
        self._holds: list[_Hold] = []
        self._fault_lock = threading.Lock()
        self.calls: list[str] = []  # every operation attempted ("put vol/a.txt", ...)
        self.record = True  # (off for tests that measure memory)
        self.arrived: list[str] = []  # operations that met a hold(), as they began to wait

    def fail(self, op: str = "", key_part: str = "", times: int | None = 1, **kw: Any) -> Fault:
        fault = Fault(op, key_part, times, **kw)
        with self._fault_lock:
            self._faults.append(fault)
        return fault

    def conflict_on(self, key_part: str) -> Fault:
        """The next conditional write of that key loses, as if another writer got in first."""
        from s3cryptfs.errors import PreconditionFailed

        return self.fail("put", key_part, 1, error=lambda w: PreconditionFailed(f"{w}: injected"))

    def hold(self, op: str, key_part: str = "", times: int | None = None) -> threading.Event:
        """Calls of *op* on keys with *key_part* wait until the returned event is set (an upload
        held back in flight, neither failed nor done); only the next *times* such calls, if
        given. Each call that met the gate is in `arrived`, before it waits."""
        gate = threading.Event()
        with self._fault_lock:
            self._holds.append(_Hold(op, key_part, gate, times))
        return gate

    def heal(self) -> None:
        with self._fault_lock:
            self._faults.clear()

    def _pick(self, what: str) -> Fault | None:
        op, _, key = what.partition(" ")
        with self._fault_lock:
            if self.record:
                self.calls.append(what)
            for fault in self._faults:
                if fault.op and fault.op != op:
                    continue
                if fault.key_part and fault.key_part not in key:
                    continue
                if fault.times is not None and fault.hits >= fault.times:
                    continue
                fault.hits += 1
                return fault
        return None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def faulty() -> T:
            op, _, key = what.partition(" ")
            gates = []
            with self._fault_lock:
                for h in self._holds:
                    if h.op != op or h.key_part not in key or h.times == 0:
                        continue
                    if h.times is not None:
                        h.times -= 1
                    gates.append(h.gate)
                if gates:
                    self.arrived.append(what)
            for gate in gates:
                gate.wait()
            fault = self._pick(what)
            if fault is not None:
                if fault.hang:
                    time.sleep(fault.hang)
                error = fault.error(what)
                if not isinstance(error, StoreError):
                    raise TypeError("a fault must raise a StoreError kind")
                raise error
            return fn()

        return super()._call(what, faulty)


# A stand-in for a server that keeps a backslash in keys (AWS S3 does; SeaweedFS, the test
# server, stores it as "/"): the client sends every "\" as U+29F5 (REVERSE SOLIDUS OPERATOR)
# and turns it back in what LISTs return, so the keys round-trip as such a server keeps them.
_STORED_BACKSLASH = "\u29f5"
_KEY_PARAMS = ("Key", "Prefix", "StartAfter")


def keep_backslashes(client: Any) -> Any:
    """Make a boto3 client of the test server behave as a server that keeps backslashes."""

    def outgoing(params: dict[str, Any], **_: Any) -> None:
        for name in _KEY_PARAMS:
            if isinstance(params.get(name), str):
                params[name] = params[name].replace("\\", _STORED_BACKSLASH)
        source = params.get("CopySource")  # "bucket/key", URL-quoted by botocore by now
        if isinstance(source, str):
            params["CopySource"] = source.replace("%5C", quote(_STORED_BACKSLASH))

    def listed(parsed: dict[str, Any], **_: Any) -> None:
        def back(text: str) -> str:
            return text.replace(_STORED_BACKSLASH, "\\")

        for obj in parsed.get("Contents", []):
            obj["Key"] = back(obj["Key"])
        for common in parsed.get("CommonPrefixes", []):
            common["Prefix"] = back(common["Prefix"])
        if isinstance(parsed.get("Prefix"), str):
            parsed["Prefix"] = back(parsed["Prefix"])

    client.meta.events.register("before-parameter-build.s3", outgoing)
    client.meta.events.register("after-call.s3.ListObjectsV2", listed)
    return client
