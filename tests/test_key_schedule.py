"""Scheduled rotation: the schedule lives in the volume descriptor, `keys rotate --due` acts only
when it is due, `keys status` shows when, and the systemd timer/service that run it verify."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import REPO_ROOT
from tests.descriptor_tools import rewrite_descriptor


def admin(vol, *words, check=True):
    return vol.run(*words, vol.url, *vol.common_args(), check=check)


def descriptor(s3client, vol) -> dict:
    key = f"{vol.prefix}.s3cryptfs/volume.json"
    return json.loads(s3client.get_object(Bucket=vol.bucket, Key=key)["Body"].read())


def age_descriptor(vol, seaweed, days: float) -> None:
    """Pretend the last rotation happened *days* ago (what a month of waiting would do): an
    administrator's signed write, since a bare PUT is refused as tampering."""

    def older(desc):
        desc.rotated_at -= int(days * 86400)
        return desc

    rewrite_descriptor(vol, seaweed, older)


def test_rotation_happens_only_when_due(mounted, s3client, seaweed):
    vol = mounted
    (vol.mountpoint / "before").write_bytes(b"v1")
    out = admin(vol, "keys", "rotate", "--due").stdout
    assert "no rotation due" in out and "not scheduled" in out
    out = admin(vol, "keys", "schedule", "30").stdout
    assert "every 30 days" in out
    assert descriptor(s3client, vol)["rotation"]["max_age_days"] == 30
    assert "no rotation due" in admin(vol, "keys", "rotate", "--due").stdout
    status = admin(vol, "keys", "status").stdout
    assert "rotation: every 30 days" in status and "next due" in status
    age_descriptor(vol, seaweed, 31)
    assert "next due now" in admin(vol, "keys", "status").stdout
    out = admin(vol, "keys", "rotate", "--due").stdout
    assert "new active key version 2" in out
    assert "no rotation due" in admin(vol, "keys", "rotate", "--due").stdout
    admin(vol, "rewrap")
    vol.remount()
    assert (vol.mountpoint / "before").read_bytes() == b"v1"
    admin(vol, "keys", "schedule", "0")
    assert "not scheduled" in admin(vol, "keys", "status").stdout


def test_rotation_units_verify(tmp_path):
    for name in ("s3cryptfs-rotate@.service", "s3cryptfs-rotate@.timer"):
        text = (REPO_ROOT / "systemd" / name).read_text()
        (tmp_path / name.replace("@.", "@demo.")).write_text(text)
    proc = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            str(tmp_path / "s3cryptfs-rotate@demo.service"),
            str(tmp_path / "s3cryptfs-rotate@demo.timer"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    service = (REPO_ROOT / "systemd" / "s3cryptfs-rotate@.service").read_text()
    assert "keys rotate --due" in service and "s3cryptfs rewrap" in service
