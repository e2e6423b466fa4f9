"""Helpers for KMS-mode volumes driven through the command line (no password offered)."""

from __future__ import annotations

from s3cryptfs.format import metadata as md


def mount_kms(vol, cfg, *extra, check: bool = True):
    """s3cryptfs mount with only --kms-config: no password file, no $S3CRYPTFS_PASSWORD."""
    vol.env = {k: v for k, v in vol.env.items() if k != "S3CRYPTFS_PASSWORD"}
    proc = vol.run(
        "mount",
        vol.url,
        vol.mountpoint,
        "--endpoint-url",
        vol.endpoint_url,
        "--cache-dir",
        vol.cache_dir,
        "--kms-config",
        str(cfg),
        *map(str, extra),
        require_detached=True,
        check=check,
    )
    if check:
        assert vol.is_mounted()
    return proc


def envelopes(s3client, bucket: str, prefix: str) -> dict[str, tuple[str, str, str]]:
    """object key -> (provider, key id, version) of every file object."""
    out = {}
    for page in s3client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if "/.s3cryptfs/" in f"/{key}" or key.endswith("/"):
                continue
            meta = s3client.head_object(Bucket=bucket, Key=key)["Metadata"]
            out[key[len(prefix) :]] = (meta[md.KMS_PROVIDER], meta[md.KMS_ID], meta[md.KEY_VERSION])
    return out
