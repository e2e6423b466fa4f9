"""S3's XML replies: a ListObjectsV2 reply read into a ListPage, and the result document of
the other requests that answer with one (result_text).

The reply of a ListObjectsV2 request:

A page holds up to 1,000 objects, and a wide directory is listed page after page while the
mount answers the kernel under the same interpreter lock: building an element tree of the
whole page (eight elements per object) was the largest part of the mount's CPU in such a
listing. So for a URL-encoded reply (the mount always asks for one) the four fields of each
``<Contents>`` are taken from the bytes with one pattern each, and only the rest of the
document (a few elements) goes through the XML parser. That path is taken only when it
accounts for every object exactly: one of each field per ``<Contents>``, and no
``<Contents>`` left for the parser. Any other shape (namespace prefixes, attributes, empty
elements, a reply that is not URL-encoded) is read by the XML parser whole.
"""

from __future__ import annotations

import datetime
import html
import re
import urllib.parse
import xml.etree.ElementTree as ET

from s3cryptfs.store import retry
from s3cryptfs.store.base import ListPage, ObjectInfo, etag_of

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_FIELDS = ("Key", "Size", "ETag", "LastModified")
_CONTENTS = re.compile(rb"<Contents>.*?</Contents>", re.S)
_FIELD = [re.compile(rb"<%s>([^<]*)</%s>" % (n.encode(), n.encode())) for n in _FIELDS]

Columns = tuple[list[str], list[str], list[str], list[str]]  # keys, sizes, ETags, times


def parse_list(body: bytes) -> ListPage:
    """The objects, common prefixes and continuation token of one page (ET.ParseError for a
    reply that is not XML, ValueError for a size that is not a number)."""
    first, last = body.find(b"<Contents>"), body.rfind(b"</Contents>")
    if first >= 0 and last > first and body.find(b"<CommonPrefixes>", first, last) < 0:
        # (the objects come before the common prefixes, as S3 lists them)
        count = body.count(b"<Contents>", first, last)
        found = [pattern.findall(body, first, last) for pattern in _FIELD]
        if all(len(column) == count for column in found):
            root = ET.fromstring(body[:first] + body[last + len(b"</Contents>") :])
            if _url_encoded(root) and root.find(f"{_NS}Contents") is None:
                keys, sizes, etags, times = ([_text(raw) for raw in col] for col in found)
                return _page(root, (keys, sizes, etags, times))
    root = ET.fromstring(body)
    return _page(root, _tree_columns(root))


def _text(raw: bytes) -> str:
    text = raw.decode()
    if "&" not in text:
        return text
    # Every ETag has two quotes, escaped one way or the other.
    text = text.replace("&#34;", '"').replace("&quot;", '"')
    return html.unescape(text) if "&" in text else text


def _url_encoded(root: ET.Element) -> bool:
    return (root.findtext(f"{_NS}EncodingType") or "").lower() == "url"


def _tree_columns(root: ET.Element) -> Columns:
    columns: Columns = ([], [], [], [])
    for o in root.iter(f"{_NS}Contents"):
        for column, name in zip(columns, _FIELDS, strict=True):
            column.append(o.findtext(f"{_NS}{name}") or "")
    return columns


def _page(root: ET.Element, columns: Columns) -> ListPage:
    url = _url_encoded(root)
    unquote = urllib.parse.unquote_plus
    listed = root.findtext(f"{_NS}Prefix") or ""
    listed_name = unquote(listed) if url else listed

    def name(text: str) -> str:
        if not url:
            return text
        # Keys of one listing share its prefix: decoded once, not once per key.
        if listed and text.startswith(listed):
            rest = text[len(listed) :]
            return listed_name + (unquote(rest) if "%" in rest or "+" in rest else rest)
        return unquote(text)

    times: dict[str, int] = {}  # copies and batch uploads share their second
    page = ListPage()
    for key, size, etag, modified in zip(*columns, strict=True):
        mtime_ns = times.get(modified)
        if mtime_ns is None:
            mtime_ns = times[modified] = iso_ns(modified)
        page.objects.append(
            ObjectInfo(key=name(key), size=int(size or 0), etag=etag_of(etag), mtime_ns=mtime_ns)
        )
    page.prefixes = [
        name(p.findtext(f"{_NS}Prefix") or "") for p in root.iter(f"{_NS}CommonPrefixes")
    ]
    truncated = (root.findtext(f"{_NS}IsTruncated") or "").lower() == "true"
    page.token = root.findtext(f"{_NS}NextContinuationToken") if truncated else None
    return page


def iso_ns(value: str) -> int:
    """An ISO 8601 time (LIST's LastModified) in ns since the epoch; 0 if unreadable."""
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return 0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return int(parsed.timestamp() * 1e9)


def result_text(body: bytes | bytearray, what: str, name: str) -> str:
    """The text of element *name* in the XML document of a 2xx reply. S3 may answer a copy
    or a complete with 200 and an error document (the request failed after the status was
    sent), or the reply may be cut off: both are taken as botocore takes them, as a 500 with
    the document's code (a cut-off reply is retried; an error's code decides its kind)."""
    try:
        root = ET.fromstring(bytes(body).strip())
    except ET.ParseError:
        err = retry.classify_reply("", 500, "incomplete reply", what)
        raise err from None
    if root.tag.rpartition("}")[2] == "Error":
        code = root.findtext("Code") or ""
        err = retry.classify_reply(code, 500, root.findtext("Message") or code, what)
        raise err
    # whether or not the server puts its elements in S3's namespace
    found = root.findtext(f"{_NS}{name}")
    return found if found is not None else root.findtext(name) or ""


def error_code(body: bytes) -> tuple[str, str]:
    """The code and message of an error document ("" when the body is none)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""
