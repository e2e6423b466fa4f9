"""keys/pool.py: keys wrapped ahead of time are used once, never after MAX_AGE, and the
versions a mount says it holds (its record) are those it may still hand out."""

from __future__ import annotations

from s3cryptfs.keys import pool as pool_module
from s3cryptfs.keys.base import KeyEnvelope
from s3cryptfs.keys.pool import KeyPool


def envelope(version: int) -> KeyEnvelope:
    return KeyEnvelope(key_id="k", key_version=version, provider="vault", ciphertext=b"w")


def test_aged_keys_are_neither_handed_out_nor_held(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(pool_module.time, "monotonic", lambda: now[0])
    pool = KeyPool(size=2, max_age=600.0)
    assert pool.refill(lambda dek: envelope(1)) == 2
    assert pool.versions() == {("vault", 1)}
    # The key server rotates on its own schedule (no descriptor change empties the pool):
    # an idle mount must stop naming version 1 once its keys are too old to be used.
    now[0] += 601
    assert pool.versions() == set()
    assert pool.take() is None
    assert pool.refill(lambda dek: envelope(2)) == 2
    taken = pool.take()
    assert taken is not None and taken[1].key_version == 2
    assert pool.versions() == {("vault", 2)}
