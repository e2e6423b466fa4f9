"""Prometheus metrics of a running mount (`--metrics ADDR:PORT`), served by prometheus_client.

Nothing is counted twice: a scrape asks the filesystem for the same numbers as
`s3cryptfs status` (vfs/status.py), taken inside the mount's event loop so that they are
consistent, and turns them into metric families. Counters only ever grow for the life of the
mount process; Prometheus handles the reset at a remount. No key, path or file name is ever
a label: the metrics tell how much, never what.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from s3cryptfs.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "s3cryptfs"


def parse_address(text: str) -> tuple[str, int]:
    """ "PORT", "HOST:PORT" or "[IPv6]:PORT"; a bare port listens on 127.0.0.1 only (the
    metrics are for this machine's scraper unless an address says otherwise)."""
    host, port_text = "127.0.0.1", text.strip()
    if port_text.startswith("["):
        host, sep, rest = port_text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"--metrics {text!r}: write [ADDRESS]:PORT for IPv6")
        port_text = rest
    elif ":" in port_text:
        host, _, port_text = port_text.rpartition(":")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--metrics {text!r}: the port must be a number from 1 to 65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"--metrics {text!r}: {host!r} is not an IP address (or localhost)"
            ) from None
    return host, int(port_text)


class MountCollector(Collector):
    """Metric families from a status snapshot; *snapshot* returns None once the mount is
    gone (the scrape then has nothing)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot()
        if status is None:
            return
        yield from _families(status)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, value: float | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _families(status: dict[str, Any]) -> Iterator[Metric]:
    requests = _counter("s3_requests", "S3 requests sent, by operation", ["operation"])
    for op, n in sorted(status.get("requests", {}).items()):
        requests.add_metric([op], n)
    yield requests
    errors = _counter("s3_errors", "S3 request failures, by kind (retried ones too)", ["kind"])
    for kind, n in sorted(status.get("errors", {}).items()):
        errors.add_metric([kind], n)
    yield errors
    moved = status.get("bytes", {})
    yield _counter_value("s3_sent_bytes", "bytes of object bodies uploaded", moved.get("sent", 0))
    yield _counter_value(
        "s3_received_bytes", "bytes of object bodies downloaded", moved.get("received", 0)
    )
    yield _gauge("dirty_files", "files with content not in S3 yet", status.get("dirty_files", 0))
    yield _gauge(
        "dirty_bytes", "plaintext bytes of the files not in S3 yet", status.get("dirty_bytes", 0)
    )
    yield _gauge(
        "closed_not_sealed_files",
        "closed files kept on local disk until their key manager answers",
        status.get("closed_not_sealed", 0),
    )
    uploads = status.get("uploads", {})
    queue = GaugeMetricFamily(
        f"{PREFIX}_upload_queue_files",
        "file versions waiting to upload or uploading",
        labels=["state"],
    )
    queue.add_metric(["queued"], uploads.get("queued", 0))
    queue.add_metric(["in_flight"], uploads.get("in_flight", 0))
    yield queue
    yield _gauge("upload_queue_bytes", "bytes waiting to upload", uploads.get("queued_bytes", 0))
    yield _counter_value(
        "conflicts",
        "versions that lost a race with another writer (kept as conflict copies)",
        status.get("conflicts", {}).get("count", 0),
    )
    yield _counter_value("index_writes", "directory index writes", status.get("index_writes", 0))
    inodes = status.get("inodes", {})
    yield _gauge("inodes", "files and directories the mount knows", inodes.get("known", 0))
    yield _counter_value(
        "inodes_dropped",
        "files the kernel was asked to drop to keep within --max-inodes",
        inodes.get("dropped", 0),
    )
    for cache in ("block_cache", "disk_cache"):
        numbers = status.get(cache)
        if numbers is None:
            continue
        lookups = _counter(f"{cache}_lookups", f"{cache} lookups, by result", ["result"])
        lookups.add_metric(["hit"], numbers.get("hits", 0))
        lookups.add_metric(["miss"], numbers.get("misses", 0))
        yield lookups
        what = cache.replace("_", " ")
        yield _gauge(f"{cache}_bytes", f"bytes held by the {what}", numbers.get("bytes", 0))
    calls = SummaryMetricFamily(
        f"{PREFIX}_kms_request_seconds",
        "key manager requests (wrap, unwrap) and the time they took",
        labels=["provider", "operation"],
    )
    failures = _counter("kms_errors", "key manager requests that failed", ["provider", "operation"])
    for provider, ops in sorted(status.get("kms_calls", {}).items()):
        for op, numbers in sorted(ops.items()):
            calls.add_metric([provider, op], numbers["calls"], numbers["seconds"])
            failures.add_metric([provider, op], numbers["errors"])
    yield calls
    yield failures


def _counter_value(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class MetricsServer:
    """The HTTP endpoint; started in the mount process, stopped with it."""

    def __init__(self, address: tuple[str, int], snapshot: Callable[[], dict[str, Any] | None]):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MountCollector(snapshot))
        host, port = address
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.port = self._server.server_port
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
