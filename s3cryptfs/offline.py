"""Tools that work without a mount: ``cat``, ``get``, ``put`` and ``fsck``.

They are the disaster-recovery path: with the bucket, the volume password (or KMS access) and
nothing else, they read and check every object. They reuse the mount's store, codec and key
managers and never write plaintext anywhere but where they are told to.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from s3cryptfs import config, registry
from s3cryptfs.codec import OWN, PLAIN, ObjectCodec, object_kind
from s3cryptfs.errors import (
    ConfigError,
    IntegrityError,
    ObjectNotFound,
    PreconditionFailed,
    S3CryptFSError,
    UploadConflict,
    VolumeError,
    strip_subject,
)
from s3cryptfs.format import gateway as gw
from s3cryptfs.format import metadata as md
from s3cryptfs.format.descriptor import descriptor_key
from s3cryptfs.mount import check_bucket, make_store
from s3cryptfs.ops.commands import Admin, open_admin
from s3cryptfs.ops.progress import Progress
from s3cryptfs.ops.walk import walk_heads
from s3cryptfs.store.base import ObjectInfo, ObjectStore

STEP = 8 * 1024 * 1024  # plaintext bytes decrypted per range request


def _split_object_url(text: str) -> tuple[str, str]:
    if not text.startswith("s3://"):
        raise ConfigError(f"{text!r} is not an s3://BUCKET/KEY address")
    bucket, _, key = text[5:].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ConfigError(f"{text!r}: give the object's full key, s3://BUCKET/KEY")
    return bucket, key


def find_volume(store: ObjectStore, bucket: str, key: str) -> str:
    """The volume holding *key*: the one prefix above it with a volume descriptor.

    More than one is refused: anyone who can write to the bucket can plant a descriptor in
    a sub-folder, and the nearest one would then decide how a `put` wraps its key."""
    parts = key.split("/")[:-1]
    found = []
    for n in range(len(parts), -1, -1):
        prefix = "".join(p + "/" for p in parts[:n])
        try:
            store.head(descriptor_key(prefix))
        except ObjectNotFound:
            continue
        found.append(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
    if len(found) > 1:
        raise ConfigError(
            f"s3://{bucket}/{key} lies in more than one volume ({', '.join(found)}): "
            "say which with --volume"
        )
    if found:
        return found[0]
    raise VolumeError(f"no s3cryptfs volume above s3://{bucket}/{key} (no .s3cryptfs/volume.json)")


def _open(args: argparse.Namespace, object_url: str) -> tuple[Admin, ObjectCodec, str]:
    bucket, key = _split_object_url(object_url)
    if args.volume:
        args.url = args.volume
    else:
        probe = make_store(config.VolumeURL(bucket, ""), args.endpoint_url, args.region, 30)
        check_bucket(probe)
        args.url = find_volume(probe, bucket, key)
    admin, desc = open_admin(args)
    if admin.url.bucket != bucket or not key.startswith(admin.url.prefix):
        raise ConfigError(f"{object_url} is not inside the volume {admin.url}")
    codec = admin.codec()
    return admin, codec, key


def decrypt_object(store: ObjectStore, codec: ObjectCodec, info: ObjectInfo) -> Iterator[bytes]:
    """The plaintext of an object, in pieces, every chunk authenticated; IntegrityError if not."""
    meta = info.metadata or {}
    reason = codec.refusal(meta)
    if reason:
        raise IntegrityError(f"{info.key}: {reason}")
    hlen = codec.header_len(meta)
    header = store.get(info.key, 0, hlen - 1, if_match=info.etag) if hlen else b""
    cipher = codec.cipher(meta, header, info.key)
    size = cipher.plain_size_of(info.size)
    total = cipher.chunk_count(size)
    per = max(1, STEP // cipher.chunk_size)
    for first in range(0, total, per):
        last = min(first + per, total) - 1
        start, end = cipher.span(first, last, info.size)
        data = store.get(info.key, start, end, if_match=info.etag)
        if len(data) != end - start + 1:
            raise IntegrityError(f"{info.key}: object is shorter than its length says")
        yield b"".join(cipher.open_range(first, data, total))


def cmd_cat(args: argparse.Namespace) -> int:
    admin, codec, key = _open(args, args.object)
    info = admin.store.head(key)
    out = sys.stdout.buffer
    for piece in decrypt_object(admin.store, codec, info):
        out.write(piece)
    out.flush()
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    admin, codec, key = _open(args, args.object)
    info = admin.store.head(key)
    target = os.path.abspath(args.local)
    if os.path.isdir(target):
        target = os.path.join(target, key.rsplit("/", 1)[-1])
    attrs = md.PosixAttrs.decode(info.metadata or {})
    # Decrypt next to the target and rename at the end: a failed check leaves no partial file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".s3cryptfs-get-")
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in decrypt_object(admin.store, codec, info):
                f.write(piece)
        if attrs.mode is not None and stat.S_ISREG(attrs.mode):
            # Permission bits only: setuid, setgid and sticky bits (and the owner) come from
            # whoever could write to the bucket, and `get` may well run as root.
            os.chmod(tmp, attrs.mode & 0o777)
        if attrs.mtime_ns is not None:
            os.utime(tmp, ns=(attrs.mtime_ns, attrs.mtime_ns))
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"{args.object} -> {target}", file=sys.stderr)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    admin, codec, key = _open(args, args.object)
    st = os.stat(args.local)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{args.local} is not a regular file")
    try:
        current = admin.store.head(key).etag
    except ObjectNotFound:
        current = None
    if current is not None and not args.force:
        raise VolumeError(f"{args.object} exists; use --force to replace it")
    attrs = md.PosixAttrs(st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    # Like a mount, it says which key version it seals under until the object is in S3, so a
    # `keys retire` or `migrate` from another shell waits for it (registry.py).
    active = codec.ring.active()
    record = registry.MountRecord(
        registry.new_mount_id(),
        registry.this_host(),
        os.getpid(),
        codec.descriptor.generation,
        heartbeat=30.0,
        holds=[(active.provider, active.active_key_version())],
    )
    registry.publish(admin.store, admin.url.prefix, record)
    try:
        with tempfile.TemporaryFile() as body, open(args.local, "rb") as src:
            sealed = codec.seal_stream(src, body, attrs, key)
            body.flush()
            path = f"/proc/self/fd/{body.fileno()}"
            try:
                admin.store.upload_file(
                    key, path, sealed.metadata, if_match=current, if_none_match=current is None
                )
            except PreconditionFailed:
                msg = f"{args.object} changed while uploading: nothing replaced"
                raise UploadConflict(msg) from None
    finally:
        registry.withdraw(admin.store, admin.url.prefix, record.mount_id)
    print(f"{args.local} -> {args.object} ({sealed.plain_size} bytes, encrypted)", file=sys.stderr)
    return 0


# --- fsck ----------------------------------------------------------------------------------------


@dataclass
class FsckReport:
    checked: int = 0
    bad: dict[str, str] = field(default_factory=dict)
    versions: Counter[tuple[str, int]] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _check(store: ObjectStore, codec: ObjectCodec, info: ObjectInfo, full: bool) -> tuple[str, int]:
    meta = info.metadata or {}
    reason = codec.refusal(meta)
    if reason:
        raise IntegrityError(reason)
    if full:
        for _ in decrypt_object(store, codec, info):
            pass
    else:
        hlen = codec.header_len(meta)
        header = store.get(info.key, 0, hlen - 1, if_match=info.etag) if hlen else b""
        cipher = codec.cipher(meta, header, info.key)  # unwraps the data key
        cipher.plain_size_of(info.size)
    kind = object_kind(meta)
    if kind == OWN:
        envelope = md.decode_envelope(meta)
        return envelope.provider, envelope.key_version
    if kind == PLAIN:
        return "plaintext", 0
    norm = gw.normalize_metadata(meta)
    if gw.is_mpu_object(norm):
        return "gateway multipart", 0  # its key is in its manifest, checked on its own
    provider = norm.get("encryption-kms-provider") or "pbkdf2"
    try:
        version = int(norm.get("encryption-key-version") or 0)
    except ValueError:
        version = 0
    return f"gateway {provider}", version


def cmd_fsck(args: argparse.Namespace) -> int:
    admin, desc = open_admin(args)
    codec = admin.codec()
    report = FsckReport()
    started = time.monotonic()
    progress = Progress("fsck", args.progress, describe=lambda: f"{len(report.bad)} bad")

    def one(info: ObjectInfo) -> None:
        try:
            version = _check(admin.store, codec, info, args.full)
        except S3CryptFSError as exc:
            with report.lock:
                report.bad[info.key] = strip_subject(exc, info.key)
        else:
            with report.lock:
                report.versions[version] += 1
        with report.lock:
            report.checked += 1

    try:
        walk_heads(admin.store, admin.url.prefix, admin.jobs, one, progress=progress)
    finally:
        progress.close()
    mode = "full authentication" if args.full else "headers and keys"
    print(
        f"fsck {admin.url} ({mode}): {report.checked} objects in {time.monotonic() - started:.1f}s"
    )
    for (provider, version), n in sorted(report.versions.items()):
        print(f"  {provider} version {version}: {n} ok")
    for key, why in sorted(report.bad.items()):
        print(f"  BAD {key}: {why}")
    print(f"{len(report.bad)} bad object(s)")
    return 1 if report.bad else 0
