"""Upper bounds on what an object from the bucket can make us download whole: single-AEAD
gateway bodies, symlink bodies, and the wording of a refusal. Pure: no servers."""

from __future__ import annotations

import pytest

from s3cryptfs import limits
from s3cryptfs.errors import ObjectTooLarge
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import v1
from tests.test_gateway_format import BODY_C, PW, md_c


def test_single_aead_body_beyond_max_is_refused_before_it_is_fetched():
    unbounded = gw.body_cipher(md_c(), password=PW)
    size = unbounded.plain_size_of(len(BODY_C))
    assert unbounded.open_range(0, BODY_C, 1)[0]  # the vector still decrypts
    bounded = gw.body_cipher(md_c(), password=PW, max_body=len(BODY_C), name="k")
    assert bounded.plain_size_of(len(BODY_C)) == size
    small = gw.body_cipher(md_c(), password=PW, max_body=len(BODY_C) - 1, name="vol/c.bin")
    with pytest.raises(ObjectTooLarge):
        small.span(0, 0, len(BODY_C))  # what a reader fetches: the whole body
    with pytest.raises(ObjectTooLarge) as info:
        small.plain_size_of(len(BODY_C))
    assert str(info.value) == (
        f"gateway single-AEAD object vol/c.bin is {len(BODY_C)} bytes, more than the "
        f"{len(BODY_C) - 1} bytes allowed: not read"
    )


def test_symlink_body_bound_fits_every_format_we_read():
    most = limits.SYMLINK_BODY_MAX
    assert v1.cipher_size(limits.PATH_MAX, v1.MIN_CHUNK) == most  # ours, smallest chunks
    assert max(v1.cipher_size(limits.PATH_MAX, c) for c in (v1.MIN_CHUNK, v1.MAX_CHUNK)) == most
    assert most >= limits.PATH_MAX + gw.TAG  # the gateway's: one chunk or one AEAD, no header


def test_too_large_message_and_sizes():
    limits.check_size("directory index", "k", limits.DIR_INDEX_MAX, limits.DIR_INDEX_MAX)
    with pytest.raises(ObjectTooLarge) as info:
        limits.check_size("volume descriptor", "v/.s3cryptfs/volume.json", 5 * 2**20, 2**20)
    assert str(info.value) == (
        "volume descriptor v/.s3cryptfs/volume.json is 5242880 bytes, more than the 1 MiB "
        "allowed: not read"
    )
    assert limits.human(256 * 2**20) == "256 MiB" and limits.human(4140) == "4140 bytes"
