"""keys/pool.py: keys wrapped ahead of time are used once, never after MAX_AGE, and the
versions a mount says it holds (its record) are those it may still hand out. A small file is
sealed on the event loop only when that cannot wait on a server (codec.seal_small_now)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from s3cryptfs.codec import ObjectCodec, WouldWait
from s3cryptfs.format import metadata as md
from s3cryptfs.format.descriptor import Descriptor
from s3cryptfs.keys import pool as pool_module
from s3cryptfs.keys.base import KeyEnvelope
from s3cryptfs.keys.password import PasswordKeyManager, new_settings
from s3cryptfs.keys.pool import KeyPool
from s3cryptfs.keys.ring import KeyRing, LocalKeys


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


# --- sealing a small file on the event loop (codec.seal_small_now) ------------------------

FAST = {"n": 2**14, "r": 8, "p": 1}
PASSWORD = b"a password for the pool tests"
VOLUME = "00112233445566778899aabbccddeeff"
SETTINGS = new_settings(PASSWORD, VOLUME, FAST)  # one volume's keys for every codec here


class CountingRemote:
    """The password manager as a remote one would look: it does not say it wraps locally,
    and its wraps are counted (each would be a round trip to a server)."""

    def __init__(self, inner: PasswordKeyManager) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.wraps = 0

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        self.wraps += 1
        return self.inner.wrap_key(dek, context)

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        return self.inner.unwrap_key(envelope, context)

    def active_key_version(self) -> int:
        return self.inner.active_key_version()

    def health_check(self) -> None:
        self.inner.health_check()

    def close(self) -> None:
        self.inner.close()


def small_codec(
    remote: bool = False, refresh_interval: float = 60.0, pool: KeyPool | None = None
) -> tuple[ObjectCodec, CountingRemote | None, list[int]]:
    settings = SETTINGS
    desc = Descriptor(VOLUME, key_settings=settings)
    ring = KeyRing(desc, LocalKeys(password=PASSWORD))
    counted = None
    if remote:
        counted = CountingRemote(PasswordKeyManager(settings, {"password": PASSWORD}))
        ring.adopt(desc.provider, counted, settings)
    refreshes: list[int] = []

    def refresh() -> Descriptor:
        refreshes.append(1)
        return desc

    codec = ObjectCodec(desc, ring, refresh=refresh, refresh_interval=refresh_interval, pool=pool)
    return codec, counted, refreshes


def test_a_local_manager_seals_a_small_file_at_once() -> None:
    codec, _, _ = small_codec()
    assert codec.seal_small_now(b"x", md.PosixAttrs()) is None  # the manager is not built yet
    codec.ring.active()  # (the mount builds it at start, to fail a wrong password there)
    done = codec.seal_small_now(b"small file", md.PosixAttrs(mode=0o100640), "vol/a")
    assert done is not None
    sealed, body = done
    assert (sealed.plain_size, sealed.body_size) == (10, len(body))
    assert codec.decrypt_whole(sealed.metadata, body, "vol/a") == b"small file"
    assert md.PosixAttrs.decode(sealed.metadata).mode == 0o100640


def test_a_remote_manager_seals_at_once_only_with_a_key_from_the_pool() -> None:
    pool = KeyPool(size=1)
    codec, counted, _ = small_codec(remote=True, pool=pool)
    assert counted is not None
    assert codec.seal_small_now(b"x", md.PosixAttrs()) is None  # it would wait for a wrap
    assert counted.wraps == 0
    assert codec.refill_pool() == 1 and counted.wraps == 1
    done = codec.seal_small_now(b"from the pool", md.PosixAttrs(), "vol/b")
    assert done is not None and counted.wraps == 1  # no wrap at the close
    assert codec.decrypt_whole(done[0].metadata, done[1], "vol/b") == b"from the pool"
    assert codec.seal_small_now(b"x", md.PosixAttrs()) is None  # the pool is empty again


def test_a_due_descriptor_refresh_is_not_made_on_the_event_loop() -> None:
    codec, _, refreshes = small_codec(refresh_interval=0.0)
    codec.ring.active()
    assert codec.seal_small_now(b"x", md.PosixAttrs()) is None
    assert refreshes == []  # left to the worker thread's seal, which may wait for S3


# --- opening a small file on the event loop (codec.opens_now, without_waiting) -------------


def test_a_small_file_opens_on_the_event_loop_only_when_nothing_waits() -> None:
    codec, _, _ = small_codec()
    codec.ring.active()
    body, meta = codec.seal_bytes(b"content", md.PosixAttrs(), content=True)
    codec.dek_cache.forget_provider(codec.descriptor.provider)
    assert codec.opens_now(meta)  # the password manager unwraps locally
    assert not codec.opens_now({}) and not codec.opens_now({"s3cryptfs-format": "9"})
    remote_codec, counted, _ = small_codec(remote=True)
    assert counted is not None
    assert not remote_codec.opens_now(meta)  # its key server would be asked
    with remote_codec.without_waiting(), pytest.raises(WouldWait):
        remote_codec.decrypt_whole(meta, body, "vol/a")
    assert remote_codec.decrypt_whole(meta, body, "vol/a") == b"content"  # (in a thread)
    assert remote_codec.opens_now(meta)  # its data key is cached now
    with remote_codec.without_waiting():
        assert remote_codec.decrypt_whole(meta, body, "vol/a") == b"content"
    due, _, refreshes = small_codec(refresh_interval=0.0)
    due.ring.active()
    assert due.opens_now(meta)  # its view of the descriptor is young enough to unwrap with
    due._refreshed_at -= 3600  # (an hour later)
    assert not due.opens_now(meta) and refreshes == []


def test_without_waiting_a_key_version_unknown_here_is_not_looked_up() -> None:
    """A version rotated in by another machine needs a re-read of the descriptor (a GET):
    not on the event loop."""
    codec, _, refreshes = small_codec()
    codec.ring.active()
    admin = PasswordKeyManager(codec.descriptor.key_settings, {"password": PASSWORD})
    admin.rotate()
    newer = {**md.encode_envelope(admin.wrap_key(b"k" * 32, {"volume_id": VOLUME}))}
    admin.close()
    envelope = md.decode_envelope({"s3cryptfs-format": "1", **newer})
    with codec.without_waiting(), pytest.raises(WouldWait):
        codec.unwrap_envelope(envelope, "vol/new")
    assert refreshes == []
