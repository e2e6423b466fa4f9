"""Data-key unwraps per second for each available key manager, cold and warm DEK cache.

    python3 bench/unwrap.py [--count 2000] [--kms-config FILE]

"cold" calls the manager for every envelope (what the first open of each file costs); "warm"
goes through the codec's DEK cache (what re-opening a file costs). The password manager is
always measured; a KMS provider is measured when --kms-config names one whose server is up.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from s3cryptfs.codec import ObjectCodec  # noqa: E402
from s3cryptfs.format.descriptor import Descriptor  # noqa: E402
from s3cryptfs.keys import password as pw  # noqa: E402
from s3cryptfs.keys.config import load_kms_config  # noqa: E402
from s3cryptfs.keys.registry import create_settings  # noqa: E402
from s3cryptfs.keys.ring import KeyRing, LocalKeys  # noqa: E402

PASSWORD = b"benchmark password, not secret"


def measure(provider: str, settings: dict, local: LocalKeys, volume_id: str, count: int) -> None:
    desc = Descriptor(volume_id=volume_id, provider=provider, key_settings=settings)
    ring = KeyRing(desc, local)
    codec = ObjectCodec(desc, ring)
    manager = ring.active()
    context = {"volume_id": volume_id}
    envelopes = [manager.wrap_key(os.urandom(32), context) for _ in range(count)]
    codec.dek_cache.clear()
    start = time.perf_counter()
    for env in envelopes:
        codec.unwrap_envelope(env)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for env in envelopes:
        codec.unwrap_envelope(env)
    warm = time.perf_counter() - start
    ring.close()
    print(
        f"{provider:24s} cold {count / cold:12,.0f} unwraps/s   warm {count / warm:12,.0f}/s"
        f"   (hit rate {codec.dek_cache.hits}/{codec.dek_cache.hits + codec.dek_cache.misses})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--kms-config", help="TOML [key_manager] file of a running KMS")
    args = parser.parse_args()
    volume_id = Descriptor.new_volume_id()
    local = LocalKeys(password=PASSWORD)
    settings = pw.new_settings(PASSWORD, volume_id, {"n": 2**14, "r": 8, "p": 1})
    measure(pw.PROVIDER, settings, local, volume_id, args.count)
    if args.kms_config:
        provider, options, secrets = load_kms_config(args.kms_config, os.environ)
        assert provider is not None
        local.add(provider, options, secrets)
        kms = create_settings(provider, {**options, "volume_id": volume_id}, secrets)
        measure(provider, kms, local, volume_id, args.count)


if __name__ == "__main__":
    main()
