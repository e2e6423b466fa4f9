"""Key managers: wrap and unwrap per-object data keys. Pure: no FUSE, trio or boto3."""

from s3cryptfs.keys.base import KeyEnvelope, KeyManager
from s3cryptfs.keys.registry import load_key_manager, provider_names

__all__ = ["KeyEnvelope", "KeyManager", "load_key_manager", "provider_names"]
