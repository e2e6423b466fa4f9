"""The ListObjectsV2 reply parser (store/listxml.py): its fast path for the usual reply and the
XML parser for any other shape must read the same page."""

from __future__ import annotations

import urllib.parse
import xml.etree.ElementTree as ET

import pytest

from s3cryptfs.store.base import ObjectInfo
from s3cryptfs.store.listxml import iso_ns, parse_list

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
KEYS = ["vol/d/plain", "vol/d/with space", "vol/d/a+b", "vol/d/caf\u00e9", 'vol/d/q"<&>']
T0 = iso_ns("2026-12-03T18:40:00Z")


def contents(key: str, i: int, quote: str = "&#34;", tag: str = "Contents") -> str:
    return (
        f"<{tag}><Key>{urllib.parse.quote_plus(key, safe='/')}</Key>"
        f"<ETag>{quote}etag{i}{quote}</ETag><Size>{i * 100}</Size>"
        f"<Owner><ID>0</ID></Owner><StorageClass>STANDARD</StorageClass>"
        f"<LastModified>2026-12-03T18:40:0{i}Z</LastModified></{tag.split()[0]}>"
    )


def reply(body: str, url: bool = True, truncated: bool = True) -> bytes:
    encoding = "<EncodingType>url</EncodingType>" if url else ""
    more = "<IsTruncated>true</IsTruncated>" if truncated else "<IsTruncated>false</IsTruncated>"
    token = "<NextContinuationToken>tok/1</NextContinuationToken>" if truncated else ""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{NS}">'
        f"<Name>b</Name><Prefix>vol%2Fd%2F</Prefix>{more}{encoding}{body}{token}"
        f"</ListBucketResult>"
    ).encode()


def expected() -> list[ObjectInfo]:
    return [
        ObjectInfo(key=k, size=i * 100, etag=f'"etag{i}"', mtime_ns=T0 + i * 10**9)
        for i, k in enumerate(KEYS)
    ]


def test_the_usual_reply_is_read_whole(monkeypatch):
    parsed: list[bytes] = []
    fromstring = ET.fromstring
    monkeypatch.setattr(ET, "fromstring", lambda text: parsed.append(text) or fromstring(text))
    page = parse_list(reply("".join(contents(k, i) for i, k in enumerate(KEYS))))
    assert len(parsed) == 1 and b"<Contents>" not in parsed[0]  # the fast path
    assert page.objects == expected()
    assert page.token == "tok/1" and page.prefixes == []


@pytest.mark.parametrize(
    "shape",
    [
        "quot",  # ETags escaped by name, not by number
        "attribute",  # an attribute on <Contents>: the fast path does not see it
        "empty",  # an empty element: the fields no longer line up
        "prefixes-between",  # common prefixes among the objects
        "prefixed",  # elements in a namespace prefix
    ],
)
def test_every_other_shape_reads_the_same(shape):
    items = [contents(k, i) for i, k in enumerate(KEYS)]
    if shape == "quot":
        items = [contents(k, i, "&quot;") for i, k in enumerate(KEYS)]
    elif shape == "attribute":
        items[2] = contents(KEYS[2], 2, tag='Contents x="1"')
    elif shape == "prefixes-between":
        items.insert(2, "<CommonPrefixes><Prefix>vol%2Fd%2Fsub%2F</Prefix></CommonPrefixes>")
    body = reply("".join(items))
    want = expected()
    if shape == "empty":
        body = body.replace(b"<Size>100</Size>", b"<Size/>")
        want[1] = ObjectInfo(key=KEYS[1], size=0, etag='"etag1"', mtime_ns=T0 + 10**9)
    if shape == "prefixed":
        body = body.replace(f'xmlns="{NS}"'.encode(), f'xmlns:s3="{NS}"'.encode())
        body = body.replace(b"<", b"<s3:").replace(b"<s3:/", b"</s3:").replace(b"<s3:?", b"<?")
    page = parse_list(body)
    assert page.objects == want
    if shape == "prefixes-between":
        assert page.prefixes == ["vol/d/sub/"]


def test_a_reply_without_url_encoding_is_read_by_the_xml_parser():
    items = "".join(
        f"<Contents><Key>{k.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}"
        f"</Key><ETag>&#34;etag{i}&#34;</ETag><Size>{i * 100}</Size>"
        f"<LastModified>2026-12-03T18:40:0{i}Z</LastModified></Contents>"
        for i, k in enumerate(KEYS)
    )
    page = parse_list(reply(items, url=False, truncated=False).replace(b"vol%2Fd%2F", b"vol/d/"))
    assert page.objects == expected()
    assert page.token is None


def test_an_empty_page_and_a_broken_one():
    page = parse_list(reply("<CommonPrefixes><Prefix>vol%2Fd%2Fx%2F</Prefix></CommonPrefixes>"))
    assert page.objects == [] and page.prefixes == ["vol/d/x/"]
    with pytest.raises(ET.ParseError):
        parse_list(reply(contents("vol/d/a", 1))[:-30])
