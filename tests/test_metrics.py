"""--metrics: a Prometheus endpoint of the running mount, scraped with a real HTTP GET."""

from __future__ import annotations

import os
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_bytes_uploads_and_key_manager_calls(volume):
    volume.init()
    port = _free_port()
    volume.mount("--metrics", f"127.0.0.1:{port}")
    m = volume.mountpoint
    data = os.urandom(300_000)
    for i in range(5):
        (m / f"f{i}").write_bytes(data)
        os.sync()
    with open(m / "f0", "rb") as f:
        os.fsync(f.fileno())  # f0 is in S3 now
    volume.remount("--metrics", f"127.0.0.1:{port}")  # everything uploaded; reads are cold
    for i in range(5):
        assert (m / f"f{i}").read_bytes() == data
    got = _scrape(port)
    assert got[("s3cryptfs_s3_requests_total", (("operation", "get"),))] >= 5
    assert got[("s3cryptfs_s3_received_bytes_total", ())] >= 5 * len(data)
    unwraps = [v for (n, labels), v in got.items() if n == "s3cryptfs_kms_request_seconds_count"
               and ("operation", "unwrap") in labels]
    assert sum(unwraps) >= 1
    assert got[("s3cryptfs_dirty_files", ())] == 0
    assert got[("s3cryptfs_upload_queue_files", (("state", "queued"),))] == 0
    (m / "new").write_bytes(b"x" * 1000)
    after = _scrape(port)
    assert after[("s3cryptfs_s3_requests_total", (("operation", "get"),))] >= got[
        ("s3cryptfs_s3_requests_total", (("operation", "get"),))
    ]
    assert "s3cryptfs_block_cache_lookups_total" in {n for n, _ in after}
    # No key, path or file name in any label.
    assert not any("f0" in value or value == "new" for _, labels in after for _, value in labels)


def test_a_bad_metrics_address_is_refused_before_mounting(volume):
    volume.init()
    proc = volume.mount("--metrics", "127.0.0.1:http", check=False)
    assert proc.returncode == 2, proc
    assert "--metrics" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = volume.mount("--metrics", f"127.0.0.1:{port}", check=False)
    assert proc.returncode == 2, proc
    assert "cannot listen" in proc.stderr and "Traceback" not in proc.stderr
    assert not volume.is_mounted()
