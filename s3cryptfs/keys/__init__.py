"""Key managers: wrap and unwrap per-object data keys. Pure: no FUSE, trio or boto3.

Dependency rule: keys/ may import s3cryptfs.format (the descriptor, the key envelope, the
gateway's key-wrap primitives), s3cryptfs.errors and s3cryptfs.limits; format/ never imports
keys/ (one way). Nothing here imports the codec, cache, vfs, ops, mount or cli.
"""

from s3cryptfs.keys.base import KeyEnvelope, KeyManager
from s3cryptfs.keys.registry import load_key_manager, provider_names

__all__ = ["KeyEnvelope", "KeyManager", "load_key_manager", "provider_names"]
