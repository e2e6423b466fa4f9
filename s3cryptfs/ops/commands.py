"""The administration commands: keys status|list|rotate|retire|passwd|schedule|trust, rewrap,
migrate.

Each opens the volume the way a mount does (the descriptor authenticated, this machine's key
configuration), changes the descriptor only through ``VolumeAuthority.update`` (signed, and
conditional on what was read) and reports on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from s3cryptfs import config
from s3cryptfs.audit import AuditLog
from s3cryptfs.codec import GatewaySecrets, ObjectCodec
from s3cryptfs.errors import ConfigError, VolumeError
from s3cryptfs.exitcodes import EXIT_INCOMPLETE
from s3cryptfs.format.descriptor import Descriptor, normalize_fingerprint
from s3cryptfs.keys.base import KeyAdmin
from s3cryptfs.keys.config import load_kms_config
from s3cryptfs.keys.password import PROVIDER as PASSWORD_PROVIDER
from s3cryptfs.keys.password import PasswordKeyManager, check_new_password
from s3cryptfs.keys.registry import create_settings
from s3cryptfs.keys.ring import KeyRing, LocalKeys
from s3cryptfs.mount import check_bucket, make_store
from s3cryptfs.ops.mountwait import wait_for_mounts
from s3cryptfs.ops.rewrap import RewrapReport, VersionCounts, count_versions, rewrap_volume
from s3cryptfs.store.base import ObjectStore
from s3cryptfs.volume import VolumeAuthority, read_raw


@dataclass
class Admin:
    url: config.VolumeURL
    store: ObjectStore
    local: LocalKeys
    audit: AuditLog
    jobs: int
    authority: VolumeAuthority

    def descriptor(self) -> Descriptor:
        return self.authority.refresh()

    def ring(self) -> KeyRing:
        """The key ring of the descriptor in force, every manager opened (fail early)."""
        ring = self.authority.ring
        assert ring is not None
        ring.open_all()
        return ring

    def codec(self) -> ObjectCodec:
        desc = self.authority.descriptor
        assert desc is not None
        # The password also opens the S3 Encryption Gateway's objects (docs/INTEROP.md).
        secrets = GatewaySecrets(password=self.local.password)
        return ObjectCodec(
            desc,
            self.ring(),
            audit=self.audit,
            gateway=secrets,
            companion=self.store.read_companion,
        )

    def close(self) -> None:
        if self.authority.ring is not None:
            self.authority.ring.close()
        self.audit.close()


def local_keys(args: argparse.Namespace, need_password: bool) -> LocalKeys:
    local = LocalKeys()
    provider, options, secrets = load_kms_config(getattr(args, "kms_config", None), os.environ)
    if provider is not None:
        local.add(provider, options, secrets)
    if need_password or config.password_offered(getattr(args, "password_file", None)):
        local.password = config.get_password(args.password_file)
    return local


def open_admin(
    args: argparse.Namespace,
    extra_password: bool = False,
    retrust: bool = False,
    fingerprint: str | None = None,
) -> tuple[Admin, Descriptor]:
    """Open the volume as a mount does: the descriptor is used only once it authenticates.
    *retrust*: this machine's pin is replaced by what authenticates now (``keys trust``), which
    must show *fingerprint* when one is given."""
    url = config.parse_url(args.url)
    store = make_store(url, args.endpoint_url, args.region, retry_deadline=30)
    check_bucket(store)
    # Only to know whether to ask for a password; nothing else of it is used before it
    # authenticates.
    peek = Descriptor.decode(read_raw(store, url)[0])
    need = extra_password or PASSWORD_PROVIDER in peek.providers()
    local = local_keys(args, need)
    if fingerprint:
        local.fingerprint = normalize_fingerprint(fingerprint)
    authority = VolumeAuthority(store, url, args.endpoint_url, local)
    desc = authority.open(retrust=retrust)
    assert authority.ring is not None
    try:
        # Every key manager now: a wrong password or a missing token fails here, whatever the
        # command (a descriptor this machine checked before needs no key to be trusted).
        authority.ring.open_all()
    except BaseException:
        authority.ring.close()
        raise
    for warning in authority.warnings:
        print(f"s3cryptfs: warning: {warning}", file=sys.stderr)
    admin = Admin(
        url,
        store,
        local,
        AuditLog(getattr(args, "audit_log", None)),
        max(1, getattr(args, "jobs", 8) or 8),
        authority,
    )
    return admin, desc


# --- keys --------------------------------------------------------------------------------------


def _count_text(counts: VersionCounts, found: tuple[str, int]) -> str:
    text = f"objects: {counts.files[found]}"
    indexes = counts.indexes[found]
    return text + (f", directory indexes: {indexes}" if indexes else "")


def _versions_lines(desc: Descriptor, ring: KeyRing, counts: VersionCounts | None) -> list[str]:
    lines = []
    seen = set() if counts is None else counts.versions()
    for provider in desc.providers():
        role = "active" if provider == desc.provider else "previous (read only)"
        manager = ring.manager(provider)
        lines.append(f"provider {provider} [{role}]")
        if isinstance(manager, KeyAdmin):
            infos = manager.versions()
        else:
            infos = []
            lines.append(f"  active version {manager.active_key_version()}")
        for info in infos:
            count = "" if counts is None else "  " + _count_text(counts, (provider, info.version))
            lines.append(f"  version {info.version}  {info.state}  key {info.key_id}{count}")
        if counts is not None:
            known = {i.version for i in infos}
            for p, v in sorted(seen):
                if p == provider and v not in known:
                    text = _count_text(counts, (p, v))
                    lines.append(f"  version {v}  unknown to the manager  {text}")
    if counts is not None:
        for p, v in sorted(seen):
            if p not in desc.providers():
                text = _count_text(counts, (p, v))
                lines.append(f"provider {p} [NOT IN THE DESCRIPTOR] version {v} {text}")
    return lines


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "trust":
        return _trust(args)
    admin, desc = open_admin(args)
    try:
        ring = admin.ring()
        if args.action in ("status", "list"):
            counts = (
                count_versions(admin.store, admin.url.prefix, admin.jobs) if args.count else None
            )
            if args.action == "status":
                print(f"volume {admin.url} (id {desc.volume_id})")
                print(f"fingerprint: {admin.authority.fingerprint} (generation {desc.generation})")
                print(f"active: {desc.provider} version {ring.active().active_key_version()}")
                print(_rotation_line(desc))
            print("\n".join(_versions_lines(desc, ring, counts)))
            return 0
        if args.action == "schedule":
            return _schedule(admin, int(args.version))
        if args.action == "rotate":
            if args.due and not _rotation_due(desc):
                print(f"no rotation due: {_rotation_line(desc)}")
                return 0
            return _rotate(admin, ring, new_auth_key=args.new_auth_key)
        if args.action == "passwd":
            return _passwd(admin, ring, args)
        return _retire(admin, ring, args)
    finally:
        admin.close()


def _trust(args: argparse.Namespace) -> int:
    """Pin what authenticates now: after an administrator changed the volume's authentication
    key, or to pin a known fingerprint before the first contact through a KMS."""
    admin, desc = open_admin(args, retrust=True, fingerprint=getattr(args, "fingerprint", None))
    try:
        print(f"volume {admin.url} (id {desc.volume_id})")
        print(f"trusted fingerprint: {admin.authority.fingerprint} (generation {desc.generation})")
        return 0
    finally:
        admin.close()


def _rotate(admin: Admin, ring: KeyRing, new_auth_key: bool = False) -> int:
    result: dict[str, Any] = {}

    def change(desc: Descriptor) -> Descriptor | None:
        ring.update(desc)
        manager = ring.active()
        if not isinstance(manager, KeyAdmin):
            raise ConfigError(f"provider {desc.provider} cannot rotate keys from s3cryptfs")
        settings = manager.rotate()
        if settings == desc.key_settings:
            # The version lives on the key server; the descriptor only records when.
            result["version"] = manager.active_key_version()
            desc.rotated_at = int(time.time())
            return desc
        desc.key_settings = settings
        desc.rotated_at = int(time.time())
        # Managers need not update themselves: ask one built from the new settings.
        ring.update(desc)
        result["version"] = ring.active().active_key_version()
        return desc

    desc = admin.authority.update(change, new_key=new_auth_key)
    admin.audit.event("rotate", provider=desc.provider, key_version=result.get("version"))
    print(f"{desc.provider}: new active key version {result.get('version')}")
    if new_auth_key:
        _announce_new_auth_key(admin)
    return 0


def _announce_new_auth_key(admin: Admin) -> None:
    admin.audit.event("rotate", detail="new descriptor authentication key")
    print(
        f"new volume fingerprint: {admin.authority.fingerprint}. Machines that open the volume "
        "with its password follow by themselves; machines that use only a KMS refuse it until "
        f"someone checks the fingerprint and runs: s3cryptfs keys trust {admin.url} "
        "--fingerprint FINGERPRINT"
    )


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _rotation_due(desc: Descriptor, now: float | None = None) -> bool:
    if desc.rotation_days <= 0:
        return False
    last = desc.rotated_at or 0.0
    return (now or time.time()) - last >= desc.rotation_days * 86400


def _rotation_line(desc: Descriptor) -> str:
    last = desc.rotated_at
    age = "" if last is None else f"; last rotation {_when(last)}"
    age += "" if last is None else f" ({(time.time() - last) / 86400:.1f} days ago)"
    if desc.rotation_days <= 0:
        return f"rotation: not scheduled{age}"
    due = (last or 0.0) + desc.rotation_days * 86400
    when = "now" if due <= time.time() else _when(due)
    return f"rotation: every {desc.rotation_days} days{age}; next due {when}"


def _schedule(admin: Admin, days: int) -> int:
    def change(desc: Descriptor) -> Descriptor | None:
        desc.rotation_days = days
        if desc.rotated_at is None:
            desc.rotated_at = int(time.time())  # volumes made before schedules: count from now
        return desc

    desc = admin.authority.update(change)
    admin.audit.event("schedule", provider=desc.provider, detail=f"every {days} days")
    print(_rotation_line(desc))
    return 0


def _new_password(args: argparse.Namespace) -> bytes:
    if args.new_password_file:
        new = config.read_password_file(args.new_password_file)
    else:
        if not sys.stdin.isatty():
            raise ConfigError("keys passwd needs --new-password-file or a terminal")
        import getpass

        new = getpass.getpass("New password: ").encode()
        if getpass.getpass("Repeat new password: ").encode() != new:
            raise ConfigError("the passwords do not match")
    check_new_password(new)
    return new


def _passwd(admin: Admin, ring: KeyRing, args: argparse.Namespace) -> int:
    """Re-seal the password manager's keys under a new password; no object changes.

    With --rotate the old password (and any copy of the descriptor it opens) stops mattering:
    a new key version and a new descriptor authentication key, every object re-wrapped under
    the new version, then every older version retired."""
    rotate = bool(getattr(args, "rotate", False))
    desc = admin.authority.descriptor
    assert desc is not None
    if desc.password_settings() is None:
        raise ConfigError("this volume has no password key manager")
    if rotate and desc.provider != PASSWORD_PROVIDER:
        raise ConfigError(
            f"keys passwd --rotate: the password manager only reads old objects here (the "
            f"active key manager is {desc.provider}); `s3cryptfs migrate` retires it"
        )
    new = _new_password(args)

    def change(desc: Descriptor) -> Descriptor | None:
        settings = desc.password_settings()
        if settings is None:
            raise ConfigError("this volume has no password key manager")
        manager = PasswordKeyManager(settings, {"password": admin.local.password or b""})
        resealed = manager.change_password(new)
        if rotate:
            resealed = manager.rotate()
            desc.rotated_at = int(time.time())
        # The ring signs the descriptor with the manager that holds the new password.
        ring.adopt(PASSWORD_PROVIDER, manager, resealed)
        if desc.provider == PASSWORD_PROVIDER:
            desc.key_settings = resealed
        for entry in desc.previous:
            if entry["provider"] == PASSWORD_PROVIDER:
                entry["settings"] = resealed
        return desc

    desc = admin.authority.update(change, new_key=rotate)
    admin.local.password = new
    admin.audit.event("passwd", provider=PASSWORD_PROVIDER)
    if not rotate:
        print("password changed; running mounts keep working until they are remounted")
        return 0
    active = ring.active().active_key_version()
    print(f"password changed; new active key version {active}")
    _announce_new_auth_key(admin)
    report = rewrap_volume(
        admin.store, admin.url.prefix, admin.codec(), admin.jobs, False, admin.audit, "auto"
    )
    print(report.summary(False))
    if not report.complete:
        print(
            "s3cryptfs: some objects were not re-wrapped, so the old key versions stay: run "
            f"`s3cryptfs rewrap {admin.url}`, then `s3cryptfs keys retire VERSION {admin.url}` "
            "for each older version",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    manager = ring.manager(PASSWORD_PROVIDER)
    assert isinstance(manager, PasswordKeyManager)
    code = 0
    for info in manager.versions():
        if info.state == "decrypt-only":
            code = max(
                code,
                _retire_version(admin, ring, PASSWORD_PROVIDER, info.version, False, args.wait),
            )
    return code


def _retire(admin: Admin, ring: KeyRing, args: argparse.Namespace) -> int:
    desc = ring.descriptor
    provider = args.provider or desc.provider
    version = int(args.version)
    if provider not in desc.providers():
        raise ConfigError(f"provider {provider} is not one of this volume's key managers")
    if provider == desc.provider and version == ring.active().active_key_version():
        raise ConfigError(f"version {version} of {provider} is the active one; rotate first")
    if provider != desc.provider and version == ring.manager(provider).active_key_version():
        # A previous manager wraps nothing new and cannot be rotated: "rotate first" would
        # send the user to a command that refuses. What ends its use is the migration.
        raise ConfigError(
            f"version {version} is the last version of {provider}, which this volume only "
            f"keeps for reading; finish the migration instead: `s3cryptfs migrate {admin.url} "
            f"--to {desc.provider} --kms-config FILE` drops it once no object uses it"
        )
    return _retire_version(admin, ring, provider, version, args.force, args.wait)


def _retire_version(
    admin: Admin, ring: KeyRing, provider: str, version: int, force: bool, wait: float = 120.0
) -> int:
    current = admin.authority.descriptor
    assert current is not None
    if not wait_for_mounts(
        admin.store,
        admin.url.prefix,
        provider,
        version,
        current.generation,
        wait,
        f"{provider} version {version}",
        force=force,
    ):
        admin.audit.event("retire", "refused", provider=provider, key_version=version)
        return EXIT_INCOMPLETE
    # Only now: what the mounts uploaded under it while they caught up is counted too.
    counts = count_versions(admin.store, admin.url.prefix, admin.jobs)
    in_use = counts.in_use((provider, version))
    if in_use and not force:
        indexes = counts.indexes[(provider, version)]
        print(
            f"s3cryptfs: refusing to retire {provider} version {version}: {in_use} object(s) "
            "still use it"
            + (f" ({indexes} of them directory indexes)" if indexes else "")
            + f". Run `s3cryptfs rewrap {admin.url}` first (or --force to make them unreadable)",
            file=sys.stderr,
        )
        admin.audit.event("retire", "refused", provider=provider, key_version=version)
        return EXIT_INCOMPLETE
    current = admin.authority.descriptor
    seal = current.auth.kms if current is not None and current.auth is not None else None
    if seal is not None and (seal.provider, seal.key_version) == (provider, version):
        # The descriptor's own authentication key is wrapped under that version: wrap it under
        # the active one first, or machines that open the volume through the KMS lose it.
        admin.authority.update(lambda desc: desc)

    def change(current: Descriptor) -> Descriptor | None:
        ring.update(current)
        manager = ring.manager(provider)
        if not isinstance(manager, KeyAdmin):
            raise ConfigError(f"provider {provider} cannot retire keys from s3cryptfs")
        settings = manager.retire(version)
        if provider == current.provider:
            if settings == current.key_settings:
                return None
            current.key_settings = settings
        else:
            for entry in current.previous:
                if entry["provider"] == provider:
                    entry["settings"] = settings
        return current

    admin.authority.update(change)
    admin.audit.event(
        "retire", provider=provider, key_version=version, detail=f"{in_use} object(s) in use"
    )
    print(
        f"{provider}: version {version} retired" + (f" ({in_use} objects lost)" if in_use else "")
    )
    return 0


# --- rewrap ------------------------------------------------------------------------------------


def _print_report(report: RewrapReport, dry_run: bool) -> int:
    print(report.summary(dry_run))
    return 0 if report.complete else EXIT_INCOMPLETE


def checkpoint_path(args: argparse.Namespace, admin: Admin) -> str | None:
    root = os.path.abspath(args.cache_dir or config.default_cache_root())
    path = os.path.join(
        config.volume_cache_dir(root, args.endpoint_url, admin.url), "rewrap.checkpoint"
    )
    if args.from_start and os.path.exists(path):
        os.unlink(path)
    return path


def cmd_rewrap(args: argparse.Namespace) -> int:
    admin, desc = open_admin(args)
    try:
        codec = admin.codec()
        active = codec.ring.active()
        print(f"active key: {active.provider} version {active.active_key_version()}")
        report = rewrap_volume(
            admin.store,
            admin.url.prefix,
            codec,
            admin.jobs,
            args.dry_run,
            admin.audit,
            progress=args.progress,
            checkpoint_path=checkpoint_path(args, admin),
        )
        code = _print_report(report, args.dry_run)
        if not args.dry_run:
            _reseal_under_active(admin)
        return code
    finally:
        admin.close()


def _reseal_under_active(admin: Admin) -> None:
    """Re-wrapping covers the descriptor's own authentication key too: a KMS seal under an
    older version is renewed under the active one (a signed write, nothing else changes)."""
    desc = admin.authority.descriptor
    ring = admin.authority.ring
    seal = desc.auth.kms if desc is not None and desc.auth is not None else None
    if seal is None or ring is None or desc is None:
        return
    active = ring.active()
    if (seal.provider, seal.key_version) != (active.provider, active.active_key_version()):
        admin.authority.update(lambda current: current)


# --- migrate -----------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    admin, desc = open_admin(args, extra_password=args.to == PASSWORD_PROVIDER)
    target = args.to
    try:
        desc = _switch_provider(admin, target)
        report = rewrap_volume(
            admin.store,
            admin.url.prefix,
            admin.codec(),
            admin.jobs,
            False,
            admin.audit,
            progress=args.progress,
            checkpoint_path=checkpoint_path(args, admin),
        )
        code = _print_report(report, False)
        admin.audit.event(
            "migrate",
            "ok" if report.complete else "incomplete",
            provider=target,
            detail=f"{report.rewrapped} re-wrapped",
        )
        if not report.complete:
            print("some objects were not migrated: run the same command again", file=sys.stderr)
            return code
        if args.keep_old or not desc.previous:
            return 0

        def catch_up() -> bool:
            again = rewrap_volume(admin.store, admin.url.prefix, admin.codec(), admin.jobs)
            if again.rewrapped:
                print(f"re-wrapped {again.rewrapped} object(s) written during the migration")
            return again.complete

        return _drop_previous(admin, getattr(args, "wait", 120.0), catch_up)
    finally:
        admin.close()


def _switch_provider(admin: Admin, target: str) -> Descriptor:
    """Make *target* the active provider, keeping the old ones readable under ``previous``."""

    def change(desc: Descriptor) -> Descriptor | None:
        if desc.provider == target:
            return None  # an earlier run got this far
        options = dict(admin.local.options.get(target, {}))
        options.setdefault("volume_id", desc.volume_id)
        secrets = admin.local.secrets_for(target)
        settings = create_settings(target, options, secrets)
        previous = [{"provider": desc.provider, "settings": desc.key_settings}]
        previous += [e for e in desc.previous if e["provider"] not in (target, desc.provider)]
        for entry in desc.previous:
            if entry["provider"] == target:  # migrating back: reuse its existing keys
                settings = entry["settings"]
        desc.provider, desc.key_settings, desc.previous = target, settings, previous
        return desc

    desc = admin.authority.update(change)
    admin.audit.event("migrate", provider=target, detail="descriptor: new active provider")
    previous = ", ".join(p["provider"] for p in desc.previous) or "none"
    print(f"active key manager: {target} (previous: {previous})")
    return desc


def _drop_previous(
    admin: Admin, wait: float = 120.0, catch_up: Callable[[], bool] | None = None
) -> int:
    # A mount that has not seen the new descriptor yet may still wrap under an old provider
    # (a file, or a directory index it rewrites after the pass went by): wait for the mounts,
    # then count again; once they all follow the new descriptor, one more pass (*catch_up*)
    # re-wraps what they sealed meanwhile. Keep every provider still in use after that.
    current = admin.authority.descriptor
    assert current is not None
    held = {
        e["provider"]
        for e in current.previous
        if not wait_for_mounts(
            admin.store,
            admin.url.prefix,
            e["provider"],
            None,
            current.generation,
            wait,
            f"key manager {e['provider']}",
        )
    }
    def providers_in_use() -> set[str]:
        found = count_versions(admin.store, admin.url.prefix, admin.jobs).versions()
        return {p for p, _ in found}

    old = {e["provider"] for e in current.previous}
    in_use = providers_in_use()
    if catch_up is not None and in_use & (old - held) and catch_up():
        in_use = providers_in_use()
    in_use |= held

    def change(desc: Descriptor) -> Descriptor | None:
        kept = [e for e in desc.previous if e["provider"] in in_use]
        if kept == desc.previous:
            return None
        desc.previous = kept
        return desc

    desc = admin.authority.update(change)
    if desc.previous:
        print(
            "kept previous provider(s) still used by objects: "
            + ", ".join(e["provider"] for e in desc.previous),
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    admin.audit.event("migrate", provider=desc.provider, detail="previous providers dropped")
    print("previous key manager(s) dropped from the descriptor")
    return 0


# --- init with a KMS ---------------------------------------------------------------------------


def kms_settings(args: argparse.Namespace, volume_id: str) -> dict[str, Any]:
    provider, options, secrets = load_kms_config(args.kms_config, os.environ)
    if provider is not None and provider != args.key_manager:
        raise ConfigError(
            f"--key-manager {args.key_manager} but {args.kms_config} configures {provider}"
        )
    settings = create_settings(args.key_manager, {**options, "volume_id": volume_id}, secrets)
    if not isinstance(settings, dict):
        raise VolumeError(f"provider {args.key_manager} returned no settings")
    return settings
