"""Every key manager a volume needs: the active one and those of older objects.

A volume may hold objects of several providers and versions at once (after a rotate or a
migrate). The ring builds each manager lazily from the descriptor's settings merged with this
machine's options and secrets, and takes newer descriptors without a remount.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from s3cryptfs.errors import ConfigError, UnknownProvider
from s3cryptfs.format.descriptor import Descriptor, normalize_fingerprint
from s3cryptfs.keys.base import KeyManager
from s3cryptfs.keys.config import merge_settings
from s3cryptfs.keys.password import PROVIDER as PASSWORD_PROVIDER
from s3cryptfs.keys.registry import load_key_manager

log = logging.getLogger(__name__)


@dataclass
class LocalKeys:
    """What this machine brings: the password and per-provider options and secrets."""

    password: bytes | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The volume fingerprint this machine was told to expect (`fingerprint` in the
    # [key_manager] table): then even the first contact through a KMS is not taken on trust.
    fingerprint: str | None = None

    def add(self, provider: str, options: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        options = dict(options)
        pinned = options.pop("fingerprint", None)
        if pinned:
            self.fingerprint = normalize_fingerprint(str(pinned))
        self.options[provider] = options
        self.secrets[provider] = dict(secrets)

    def secrets_for(self, provider: str) -> dict[str, Any]:
        if provider == PASSWORD_PROVIDER:
            if self.password is None:
                raise ConfigError(
                    "this volume holds objects of the password key manager: a password is "
                    "needed (--password-file or $S3CRYPTFS_PASSWORD)"
                )
            return {"password": self.password}
        return dict(self.secrets.get(provider, {}))

    def settings_for(
        self, provider: str, descriptor_settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        return merge_settings(provider, descriptor_settings, self.options.get(provider, {}))


class KeyRing:
    def __init__(self, descriptor: Descriptor, local: LocalKeys) -> None:
        self.local = local
        self._lock = threading.Lock()
        self._managers: dict[str, KeyManager] = {}
        self._built_from: dict[str, dict[str, Any]] = {}
        self._stale: list[KeyManager] = []
        self.descriptor = descriptor

    def manager(self, provider: str) -> KeyManager:
        # A built one without the lock: another thread may hold it for seconds while it builds
        # a manager (a key derivation, a connection), and an unwrap on the event loop
        # (codec.opens_now) must not wait for that.
        found = self._managers.get(provider)
        if found is not None:
            return found
        with self._lock:
            found = self._managers.get(provider)
            if found is not None:
                return found
            settings = self.descriptor.providers().get(provider)
            if settings is None:
                raise UnknownProvider(
                    f"provider {provider!r} is not one of this volume's key managers "
                    f"({', '.join(self.descriptor.providers())})"
                )
            manager = load_key_manager(
                provider,
                self.local.settings_for(provider, settings),
                self.local.secrets_for(provider),
            )
            self._managers[provider] = manager
            self._built_from[provider] = dict(settings)
            return manager

    def active(self) -> KeyManager:
        return self.manager(self.descriptor.provider)

    def active_if_built(self) -> KeyManager | None:
        """The active manager if it is built already; never builds one (which may take a
        key derivation or a connection) and never waits for the lock of one being built."""
        return self.built(self.descriptor.provider)

    def built(self, provider: str) -> KeyManager | None:
        """*provider*'s manager if it is built already (as active_if_built)."""
        return self._managers.get(provider)

    def adopt(self, provider: str, manager: KeyManager, settings: Mapping[str, Any]) -> None:
        """Use *manager* (built by the caller, e.g. after a password change) for *provider*."""
        with self._lock:
            old = self._managers.get(provider)
            if old is not None and old is not manager:
                self._stale.append(old)
            self._managers[provider] = manager
            self._built_from[provider] = dict(settings)

    def open_all(self) -> None:
        """Build every manager now, so a wrong password or a missing token fails at mount."""
        for provider in self.descriptor.providers():
            self.manager(provider)

    def update(self, descriptor: Descriptor) -> None:
        """Take a newer descriptor: managers whose settings changed take the new ones."""
        with self._lock:
            self.descriptor = descriptor
            providers = descriptor.providers()
            for provider, manager in list(self._managers.items()):
                settings = providers.get(provider)
                if settings is None or settings == self._built_from.get(provider):
                    continue  # dropped providers stay usable for objects not yet seen
                reload = getattr(manager, "reload", None)
                if callable(reload):
                    try:
                        reload(self.local.settings_for(provider, settings))
                    except Exception as exc:  # noqa: BLE001 - keep the keys we have
                        log.warning("key manager %s keeps its current keys: %s", provider, exc)
                        continue
                else:
                    # Another thread may be inside it: close it with the ring, not now.
                    del self._managers[provider]
                    self._stale.append(manager)
                self._built_from[provider] = dict(settings)

    def close(self) -> None:
        with self._lock:
            managers = list(self._managers.values()) + self._stale
            self._managers.clear()
            self._stale = []
        for manager in managers:
            manager.close()
