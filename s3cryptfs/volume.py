"""Opening a volume: the descriptor is read from an untrusted bucket and used only once it
authenticates.

The descriptor authentication key (DAK) opens through an anchor: the password (whoever holds it
is trusted), or a KMS (trusted when the DAK's fingerprint is the one this machine pinned, or
was configured with; the first contact pins it). Every later read of the descriptor (a mount's
periodic re-read, an admin command's read-modify-write) is checked against the DAK already
open, and its generation may only grow. Writers sign what they write. docs/SECURITY.md tells
the model; docs/FORMAT.md section 4 the bytes.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from s3cryptfs import limits
from s3cryptfs.config import VolumeURL
from s3cryptfs.errors import (
    ConfigError,
    DescriptorAuthError,
    InvalidEnvelope,
    ObjectNotFound,
    PreconditionFailed,
    ProviderUnavailable,
    UnwrapFailed,
    VolumeError,
)
from s3cryptfs.format.descriptor import (
    DESCRIPTOR_VERSION,
    PASSWORD_PROVIDER,
    Descriptor,
    DescriptorAuth,
    KmsSeal,
    descriptor_key,
    fingerprint,
    new_auth_key,
)
from s3cryptfs.keys.base import KeyEnvelope
from s3cryptfs.keys.password import PasswordKeyManager
from s3cryptfs.keys.registry import shared_settings
from s3cryptfs.keys.ring import KeyRing, LocalKeys
from s3cryptfs.store.base import ObjectStore
from s3cryptfs.trust import Pin, TrustStore

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 5


def read_raw(store: ObjectStore, url: VolumeURL) -> tuple[bytes, str]:
    """The descriptor's bytes and ETag (to make a conditional write of it against)."""
    key = descriptor_key(url.prefix)
    try:
        raw, info = store.get_bounded(key, limits.DESCRIPTOR_MAX, "volume descriptor")
        return raw, info.etag
    except ObjectNotFound:
        raise VolumeError(
            f"{url} is not an s3cryptfs volume (no descriptor at {key}); create one with: "
            f"s3cryptfs init {url}"
        ) from None


@dataclass
class Opened:
    """How the DAK was opened, for the trust decision."""

    dak: bytes
    by_password: bool


class VolumeAuthority:
    """The one place that reads, checks and writes a volume's descriptor.

    Holds the DAK of the volume once opened (never logged, never written anywhere), the
    highest generation seen, and the key ring built from the descriptor in force.
    Thread safe: a mount re-reads from worker threads.
    """

    def __init__(
        self,
        store: ObjectStore,
        url: VolumeURL,
        endpoint: str | None,
        local: LocalKeys,
        trust: TrustStore | None = None,
    ) -> None:
        self.store = store
        self.url = url
        self.endpoint = endpoint or "aws"
        self.local = local
        self.trust = trust or TrustStore()
        self._lock = threading.Lock()
        self.dak: bytes | None = None
        self.descriptor: Descriptor | None = None
        self.etag: str | None = None
        self.ring: KeyRing | None = None
        self._raw: bytes | None = None
        self._pin: Pin | None = None
        self._refused: bytes | None = None  # the last refused version, logged once
        self.warnings: list[str] = []  # for whoever opened the volume (the mount prints them)

    # --- opening -----------------------------------------------------------------------------

    def open(self, retrust: bool = False) -> Descriptor:
        """Read and authenticate the descriptor, pin it, and build the key ring from it.

        A KMS that does not answer does not stop a machine that has opened the volume before:
        it goes on with the last descriptor that authenticated here (the DAK is opened later).
        *retrust*: this machine's pin is set aside (``keys trust``)."""
        raw, etag = read_raw(self.store, self.url)
        desc = Descriptor.decode(raw)
        self._pin = None if retrust else self.trust.load(self.endpoint, str(self.url))
        self.ring = KeyRing(desc, self.local)
        if self._pin is not None and self._pin.descriptor.encode() == raw:
            # Byte for byte what authenticated here before: no KMS call needed to trust it.
            # The DAK is opened when something needs it (a changed descriptor, a write).
            self.descriptor, self.etag, self._raw = desc, etag, raw
            return desc
        try:
            opened = self._open_dak(desc, self.ring)
        except ProviderUnavailable as exc:
            return self._open_from_pin(raw, etag, desc, exc)
        self._accept(desc, raw, etag, opened)
        return desc

    def _open_from_pin(
        self, raw: bytes, etag: str, desc: Descriptor, exc: ProviderUnavailable
    ) -> Descriptor:
        pin = self._pin
        if pin is None or pin.volume_id != desc.volume_id:
            raise ProviderUnavailable(
                f"cannot check the volume descriptor: {exc}; a machine that has never opened "
                "this volume needs its key manager once"
            ) from None
        assert self.ring is not None
        if pin.descriptor.encode() == raw:
            trusted, trusted_etag = desc, etag
        else:
            log.warning(
                "the volume descriptor changed since this machine last checked it, and its key "
                "manager does not answer (%s): going on with generation %d until it does",
                exc,
                pin.generation,
            )
            trusted, trusted_etag = Descriptor.decode(pin.descriptor.encode()), None
            self.ring.update(trusted)
        self.descriptor, self.etag, self._raw = trusted, trusted_etag, pin.descriptor.encode()
        return trusted

    def _open_dak(self, desc: Descriptor, ring: KeyRing) -> Opened:
        auth = desc.auth
        assert auth is not None  # decode refuses a version 2 descriptor without one
        if auth.password is not None and self.local.password is not None:
            manager = ring.manager(PASSWORD_PROVIDER)  # WrongPasswordError when wrong
            assert isinstance(manager, PasswordKeyManager)
            return Opened(manager.open_auth_key(auth.password), True)
        if auth.kms is not None:
            seal = auth.kms
            envelope = KeyEnvelope(seal.key_id, seal.key_version, seal.provider, seal.wrapped)
            manager = ring.manager(seal.provider)
            try:
                dak = manager.unwrap_key(envelope, {"volume_id": desc.volume_id})
            except (UnwrapFailed, InvalidEnvelope) as exc:
                # Not an outage or a refusal: the seal itself is bad.
                raise DescriptorAuthError(
                    f"the volume descriptor's authentication key does not open with "
                    f"{seal.provider}: {exc}"
                ) from None
            return Opened(dak, False)
        raise ConfigError(
            "this volume's descriptor is authenticated by its password: a password is needed "
            "(--password-file or $S3CRYPTFS_PASSWORD)"
        )

    def _accept(self, desc: Descriptor, raw: bytes, etag: str, opened: Opened) -> None:
        desc.verify(opened.dak)
        found = fingerprint(opened.dak, desc.volume_id)
        pin = self._pin
        same_volume = pin is not None and pin.volume_id == desc.volume_id
        if not opened.by_password:
            # A pin of another volume id at this location counts too: a volume re-created
            # there is taken through a KMS only after `keys trust`.
            expected = self.local.fingerprint or (pin.fingerprint if pin else None)
            if expected is not None and found != expected:
                where = (
                    "the fingerprint in the key manager configuration"
                    if self.local.fingerprint
                    else f"the pin in {self.trust.path(self.endpoint, str(self.url))}"
                )
                raise DescriptorAuthError(
                    f"the volume descriptor is signed by key {found}, not by {expected} "
                    f"({where}): it was replaced. If an administrator rotated the volume's "
                    f"authentication key, check the new fingerprint with them and run: "
                    f"s3cryptfs keys trust {self.url} --fingerprint NEW"
                )
            if expected is None:
                text = (
                    f"first contact with {self.url}: trusting the volume fingerprint {found} "
                    "(compare it with `s3cryptfs keys status` on a machine you trust)"
                )
                log.warning(text)
                self.warnings.append(text)
        if same_volume and pin is not None and desc.generation < pin.generation:
            raise DescriptorAuthError(
                f"the volume descriptor was rolled back: it is generation {desc.generation}, "
                f"and this machine has seen generation {pin.generation}; refusing it"
            )
        self.dak = opened.dak
        self._set(desc, raw, etag)

    def _set(self, desc: Descriptor, raw: bytes, etag: str | None) -> None:
        assert self.dak is not None
        self.descriptor, self.etag, self._raw = desc, etag, raw
        if self.ring is not None:
            self.ring.update(desc)
        pin = Pin(
            volume=str(self.url),
            endpoint=self.endpoint,
            volume_id=desc.volume_id,
            fingerprint=fingerprint(self.dak, desc.volume_id),
            generation=desc.generation,
            descriptor=raw.decode("utf-8"),
        )
        old = self._pin
        if old is None or (old.generation, old.fingerprint, old.descriptor) != (
            pin.generation,
            pin.fingerprint,
            pin.descriptor,
        ):
            self.trust.save(pin)
        self._pin = pin

    # --- later reads -------------------------------------------------------------------------

    def refresh(self) -> Descriptor:
        """The descriptor now in the bucket, if it authenticates and is not older than the one
        in force; otherwise DescriptorAuthError and the one in force stays."""
        raw, etag = read_raw(self.store, self.url)
        with self._lock:
            if raw == self._raw and self.descriptor is not None:
                self.etag = etag
                return self.descriptor
            try:
                desc = self._check_newer(raw)
            except (DescriptorAuthError, VolumeError) as exc:
                if raw != self._refused:
                    self._refused = raw
                    log.error("the volume descriptor in the bucket is refused: %s", exc)
                raise
            self._set(desc, raw, etag)
            return desc

    def _check_newer(self, raw: bytes) -> Descriptor:
        desc = Descriptor.decode(raw)
        current = self.descriptor
        assert current is not None and self.ring is not None
        if desc.volume_id != current.volume_id:
            raise DescriptorAuthError(
                f"the volume descriptor now names volume {desc.volume_id}, not "
                f"{current.volume_id}; refusing it"
            )
        if self.dak is None:
            # Opened while the KMS was down: open the DAK from what was verified before.
            opened = self._open_dak(current, self.ring)
            found = fingerprint(opened.dak, current.volume_id)
            if self._pin is not None and found != self._pin.fingerprint:
                raise DescriptorAuthError(
                    f"the volume's authentication key opens to fingerprint {found}, not the "
                    f"pinned {self._pin.fingerprint}"
                )
            self.dak = opened.dak
        desc.verify(self.dak)
        if desc.generation < current.generation:
            raise DescriptorAuthError(
                f"the volume descriptor was rolled back: it is generation {desc.generation}, "
                f"and generation {current.generation} is in force; refusing it"
            )
        return desc

    # --- writing -----------------------------------------------------------------------------

    def require_dak(self) -> bytes:
        if self.dak is None:
            assert self.descriptor is not None and self.ring is not None
            with self._lock:
                self._check_newer(self.descriptor.encode())
        assert self.dak is not None
        return self.dak

    def seal(self, desc: Descriptor, *, new_key: bool = False) -> Descriptor:
        """Sign *desc* for writing: seals of the DAK for its anchors, a generation above any
        seen, and the MAC. *new_key*: a new DAK (a compromise response; pins must follow)."""
        assert self.ring is not None
        dak = new_auth_key() if new_key else self.require_dak()
        seen = max(
            desc.generation,
            self.descriptor.generation if self.descriptor is not None else 0,
            self._pin.generation if self._pin is not None else 0,
        )
        desc.generation = seen + 1
        # Whatever a manager handed back (some return the settings they were built with,
        # this machine's connection options included), only key identity is published.
        desc.key_settings = shared_settings(desc.provider, desc.key_settings)
        for entry in desc.previous:
            entry["settings"] = shared_settings(entry["provider"], entry["settings"])
        auth = DescriptorAuth()
        context = {"volume_id": desc.volume_id}
        self.ring.update(desc)
        if desc.password_settings() is not None:
            manager = self.ring.manager(PASSWORD_PROVIDER)
            assert isinstance(manager, PasswordKeyManager)
            wanted = desc.password_settings() or {}
            # A password change adopts the manager of the new password before signing.
            assert manager.settings_kdf() == wanted.get("kdf"), "password manager out of date"
            auth.password = manager.seal_auth_key(dak)
        if desc.provider != PASSWORD_PROVIDER:
            envelope = self.ring.active().wrap_key(dak, context)
            auth.kms = KmsSeal(
                envelope.provider, envelope.key_id, envelope.key_version, envelope.ciphertext
            )
        desc.auth = auth
        desc.sign(dak)
        if new_key:
            self.dak = dak
        return desc

    def create(
        self,
        desc: Descriptor,
        adopt: PasswordKeyManager | None = None,
        replace_etag: str | None = None,
    ) -> Descriptor:
        """Write the first signed descriptor of a volume, with a new DAK: where none exists
        (init), or over the version 1 descriptor read with *replace_etag* (upgrade). *adopt*:
        the password manager that made the settings (the password is stretched once)."""
        if self.ring is None:
            self.ring = KeyRing(desc, self.local)
        if adopt is not None:
            self.ring.adopt(PASSWORD_PROVIDER, adopt, desc.key_settings)
        self.dak = new_auth_key()
        desc.version = DESCRIPTOR_VERSION
        self.seal(desc)
        raw = desc.encode()
        key = descriptor_key(self.url.prefix)
        try:
            if replace_etag is None:
                self.store.put(key, raw, {}, if_none_match=True, content_type="application/json")
            else:
                self.store.put(key, raw, {}, if_match=replace_etag, content_type="application/json")
        except PreconditionFailed:
            if replace_etag is None:
                raise VolumeError(
                    f"{self.url} is already an s3cryptfs volume ({key} exists)"
                ) from None
            raise VolumeError(f"{key} changed while it was being upgraded: run it again") from None
        self._set(desc, raw, None)
        return desc

    def adopt_exported(self, desc: Descriptor) -> None:
        """Take a descriptor from a key export (authentic: the export is sealed under its
        passphrase). Its DAK is kept when this machine's keys open it, so pins stay valid."""
        self.ring = KeyRing(desc, self.local)
        self._pin = self.trust.load(self.endpoint, str(self.url))
        self.dak = None
        if desc.version == DESCRIPTOR_VERSION:
            opened = self._open_dak(desc, self.ring)
            desc.verify(opened.dak)
            self.dak = opened.dak
        else:
            self.dak = new_auth_key()

    def replace(self, desc: Descriptor, etag: str | None) -> Descriptor:
        """Write *desc* over the descriptor read with *etag* (None: there is none), signed, as
        a generation above the one there and the one pinned here."""
        key = descriptor_key(self.url.prefix)
        if etag is not None:
            try:
                current = Descriptor.decode(read_raw(self.store, self.url)[0])
                desc.generation = max(desc.generation, current.generation)
            except VolumeError:
                pass  # unreadable or unsigned: nothing of it counts
        self.seal(desc)
        raw = desc.encode()
        try:
            if etag is None:
                self.store.put(key, raw, {}, if_none_match=True, content_type="application/json")
            else:
                self.store.put(key, raw, {}, if_match=etag, content_type="application/json")
        except PreconditionFailed:
            raise VolumeError(f"{key} changed while importing: run the import again") from None
        self._set(desc, raw, None)
        return desc

    def update(
        self,
        change: Callable[[Descriptor], Descriptor | None],
        *,
        new_key: bool = False,
    ) -> Descriptor:
        """Apply *change* to a fresh copy of the current descriptor and write it, signed, only
        if nobody else wrote in between (If-Match). *change* may run more than once; it returns
        the new descriptor, or None for "nothing to write"."""
        key = descriptor_key(self.url.prefix)
        self.require_dak()  # before *change* may swap a key manager (a password change)
        for _ in range(WRITE_ATTEMPTS):
            current = self.refresh()
            etag = self.etag
            updated = change(copy.deepcopy(current))
            if updated is None:
                return current
            self.seal(updated, new_key=new_key)
            raw = updated.encode()
            try:
                self.store.put(key, raw, {}, if_match=etag, content_type="application/json")
            except PreconditionFailed:
                log.warning("the volume descriptor changed while we updated it; trying again")
                continue
            with self._lock:
                self._set(updated, raw, None)
            return updated
        raise VolumeError(
            f"the volume descriptor {key} kept changing under us ({WRITE_ATTEMPTS} attempts); "
            "try again"
        )

    @property
    def fingerprint(self) -> str | None:
        if self.dak is None or self.descriptor is None:
            return self._pin.fingerprint if self._pin is not None else None
        return fingerprint(self.dak, self.descriptor.volume_id)
