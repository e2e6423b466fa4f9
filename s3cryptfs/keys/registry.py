"""Find key manager plugins through the ``s3cryptfs.key_managers`` entry-point group."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from s3cryptfs.errors import UnknownProvider
from s3cryptfs.format import gateway as gw
from s3cryptfs.keys.base import KeyManager

GROUP = "s3cryptfs.key_managers"

# Built-in managers, so a source checkout that was never pip-installed still works.
_BUILTIN = {
    "s3cryptfs-password": "s3cryptfs.keys.password:PasswordKeyManager",
    "kmip": "s3cryptfs.keys.kmip:KmipKeyManager",
    "cosmian-kmip": "s3cryptfs.keys.kmip:CosmianKmipKeyManager",
    "vault": "s3cryptfs.keys.vault:VaultKeyManager",
    "keystore": "s3cryptfs.keys.keystore:KeystoreKeyManager",
    "awskms": "s3cryptfs.keys.awskms:AwsKmsKeyManager",
}


# The S3 Encryption Gateway's own modes (keys/gateway.py): objects name them, the codec routes
# them to their managers, so a plugin of the same name could never be reached. Not taken.
RESERVED = (gw.PASSWORD, gw.MEMORY)


def _targets() -> dict[str, str]:
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        if ep.name not in RESERVED:
            found[ep.name] = ep.value
    return found


def provider_names() -> list[str]:
    return sorted(_targets())


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def descriptor_fields(provider: str) -> tuple[str, ...] | None:
    """The settings *provider* keeps in the shared descriptor (its module's
    ``DESCRIPTOR_FIELDS``); None when the plugin does not say, and then it gets them all.
    Everything else (addresses, certificates, TLS checks) comes from this machine only."""
    target = _targets().get(provider)
    if target is None:
        return None
    module = __import__(target.partition(":")[0], fromlist=["DESCRIPTOR_FIELDS"])
    fields = getattr(module, "DESCRIPTOR_FIELDS", None)
    return None if fields is None else tuple(fields)


def shared_settings(provider: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """*settings* cut down to what a descriptor may carry for *provider*."""
    fields = descriptor_fields(provider)
    if fields is None:
        return dict(settings)
    return {k: v for k, v in settings.items() if k in fields}


def load_key_manager(
    provider: str, settings: Mapping[str, Any], secrets: Mapping[str, Any]
) -> KeyManager:
    """Instantiate the manager registered as *provider*."""
    target = _targets().get(provider)
    if target is None:
        raise UnknownProvider(
            f"no key manager is registered for provider {provider!r} "
            f"(known: {', '.join(provider_names())})"
        )
    factory = _resolve(target)
    manager: KeyManager = factory(settings, secrets)
    return manager


def create_settings(
    provider: str, options: Mapping[str, Any], secrets: Mapping[str, Any]
) -> dict[str, Any]:
    """Descriptor settings for a new key of *provider*: its module's ``create_settings``."""
    target = _targets().get(provider)
    if target is None:
        raise UnknownProvider(
            f"no key manager is registered for provider {provider!r} "
            f"(known: {', '.join(provider_names())})"
        )
    module = __import__(target.partition(":")[0], fromlist=["create_settings"])
    hook = getattr(module, "create_settings", None)
    if hook is None:
        raise UnknownProvider(f"provider {provider!r} cannot create keys (no create_settings)")
    # What goes into the public descriptor: never this machine's connection settings.
    return shared_settings(provider, hook(options, secrets))
