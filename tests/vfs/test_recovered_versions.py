"""What the next mount does with versions a crashed one had already sent, or was sending: it
recognises its own writes in S3 (the wrapped data key is unique per version) and makes no
conflict copy of them. Kernel-free, on the real server."""

from __future__ import annotations

import time

from s3cryptfs.upload.journal import Upload
from tests.vfs.harness import CoreDriver
from tests.vfs.test_queued_renames import fsynced
from tests.vfs.test_write_states import keys_in_s3, wait_for


def test_a_version_sent_at_the_crash_is_replaced_by_the_one_queued_after_it(
    driver: CoreDriver,
) -> None:
    """v2's PUT is under way at the crash and lands after it; v3 was queued behind it. The
    next mount sends v3 conditional on what it knew (v1): S3 has v2, which is ours, so v3
    replaces it. It used to go to a conflict copy, and the name showed v2."""
    driver.core.stop()
    driver.core.start(upload_delay=0.0)
    store = driver.core.store
    fsynced(driver, "f", b"v1")
    v1_size = store._client.head_object(Bucket=driver.core.url.bucket, Key="vol/f")[
        "ContentLength"
    ]
    gate = store.hold("put", "vol/f")
    driver.write_file("f", b"v2, being sent at the crash")
    sending = driver._lookup("f").w.local
    assert sending is not None
    wait_for(lambda: sending.state is Upload.UPLOADING, what="v2's upload to wait at the gate")
    driver.write_file("f", b"v3, queued behind it")
    driver.core.stop(drain=False)  # the crash
    gate.set()  # v2's PUT reaches the server after all
    client = store._client
    bucket = driver.core.url.bucket

    def v2_landed() -> bool:
        size = client.head_object(Bucket=bucket, Key="vol/f")["ContentLength"]
        return bool(size == v1_size + len(b"v2, being sent at the crash") - len(b"v1"))

    wait_for(v2_landed, what="v2 to land")
    store._holds.clear()
    driver.core.start()
    deadline = time.monotonic() + 30
    while driver.fs.uploader.queue or driver.fs.uploader.in_flight:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert keys_in_s3(driver) == ["vol/f"]
    driver.remount()
    assert driver.read_file("f") == b"v3, queued behind it"
