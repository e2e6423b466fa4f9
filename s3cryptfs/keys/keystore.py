"""Database key store (provider ``keystore``): versioned wrapping keys in SQLite or PostgreSQL.

Each key ring holds numbered versions of a 256-bit wrapping key. A version's key is stored
sealed (AES-256-GCM) under a master key: scrypt of a passphrase (derived once per process) or a
32-byte key file. DEKs are wrapped with AES-256-GCM under the version's key, with associated
data binding ring, version and volume id.

Settings: ``database`` (a path, ``sqlite:///path`` or ``postgresql://...``), ``ring`` (key ring
name), ``master_key_file`` (instead of a passphrase), ``timeout`` (seconds, default 10).
Secrets: ``passphrase`` (S3CRYPTFS_KEYSTORE_PASSPHRASE), ``db_password``
(S3CRYPTFS_KEYSTORE_DB_PASSWORD, PostgreSQL).

Administration functions usable without a volume: ``KeyStore.create_ring``, ``rotate``,
``deactivate``, ``list_versions``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from s3cryptfs import limits
from s3cryptfs.errors import (
    ConfigError,
    InvalidEnvelope,
    KeyAccessDenied,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    ProviderUnavailable,
    UnwrapFailed,
    WrongPasswordError,
)
from s3cryptfs.keys.base import KeyEnvelope, KeyVersionInfo

PROVIDER = "keystore"
DEFAULT_TIMEOUT = 10.0
DEFAULT_SCRYPT = {"n": 2**17, "r": 8, "p": 1}
NONCE = 12
WRAPPED_LEN = NONCE + 32 + 16
_CHECK = b"s3cryptfs keystore master check"
DESCRIPTOR_FIELDS = ("ring",)

T = TypeVar("T")
Row = tuple[Any, ...]  # one result row, as either database driver returns it

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS s3cryptfs_key_rings (
        name TEXT PRIMARY KEY,
        kdf TEXT NOT NULL,
        check_value BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS s3cryptfs_key_versions (
        ring TEXT NOT NULL REFERENCES s3cryptfs_key_rings(name),
        version INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('active', 'decrypt-only', 'retired')),
        sealed BYTEA,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (ring, version))""",
    # At most one active version per ring, whatever the races between admins.
    """CREATE UNIQUE INDEX IF NOT EXISTS s3cryptfs_one_active
        ON s3cryptfs_key_versions (ring) WHERE state = 'active'""",
]

# scrypt is slow on purpose: derive each (passphrase, salt) once per process.
_derived: dict[bytes, bytes] = {}
_derived_lock = threading.Lock()


def _derive(passphrase: bytes, kdf: Mapping[str, Any]) -> bytes:
    salt = bytes.fromhex(kdf["salt"])
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    # Read from the database: bounded before scrypt takes the memory.
    limits.check_scrypt(n, r, p, "key store", KeyManagerError)
    tag = hashlib.sha256(b"%d:%d:%d:" % (n, r, p) + salt + b"\0" + passphrase).digest()
    with _derived_lock:
        key = _derived.get(tag)
    if key is None:
        key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
        with _derived_lock:
            _derived[tag] = key
    return key


def _seal_aad(ring: str, version: int) -> bytes:
    return f"s3cryptfs-keystore/seal/{ring}/{version}".encode()


def _wrap_aad(ring: str, version: int, volume_id: str) -> bytes:
    return json.dumps(["s3cryptfs-keystore/dek", ring, version, volume_id]).encode()


# --- database ------------------------------------------------------------------------------


class _Database:
    """One connection (SQLite or PostgreSQL) used under a lock; reconnects after failures."""

    def __init__(self, url: str, secrets: Mapping[str, Any], timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self._password = secrets.get("db_password")
        self._conn: Any = None
        self._lock = threading.RLock()
        self._schema_ready = False
        self._closed = False

    def _connect(self) -> Any:
        if self.postgres:
            import psycopg

            kwargs: dict[str, Any] = {"connect_timeout": max(1, int(self.timeout))}
            if self._password:
                kwargs["password"] = str(self._password)
            try:
                conn = psycopg.connect(self.url, autocommit=True, **kwargs)
            except psycopg.OperationalError as exc:
                reason = _pg_reason(exc)
                if "authentication failed" in reason or "no password supplied" in reason:
                    raise KeyAccessDenied(f"key store database refused us: {reason}") from None
                raise ProviderUnavailable(f"key store database unreachable: {reason}") from None
            return conn
        path = self.url.removeprefix("sqlite:///") if self.url.startswith("sqlite:") else self.url
        try:
            return sqlite3.connect(
                path, timeout=self.timeout, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise ProviderUnavailable(f"cannot open key store database {path}: {exc}") from None

    @contextmanager
    def transaction(self) -> Iterator[Callable[..., list[Row]]]:
        """Run statements (written with ? placeholders) in one transaction that locks out
        other writers (BEGIN IMMEDIATE on SQLite, row locks on PostgreSQL)."""
        with self._lock:
            if self._closed:
                raise ProviderUnavailable("key store manager is closed")
            try:
                if self._conn is None:
                    self._conn = self._connect()
                if not self._schema_ready:
                    with self._in_transaction() as run:
                        for statement in _SCHEMA:
                            run(statement if self.postgres else statement.replace("BYTEA", "BLOB"))
                    self._schema_ready = True
                with self._in_transaction() as run:
                    yield run
            except ProviderUnavailable:
                self._drop()
                raise
            except KeyManagerError:
                raise
            except Exception as exc:  # translated by kind below
                if _is_connection_error(exc):
                    self._drop()
                    raise ProviderUnavailable(
                        f"key store database failed: {type(exc).__name__}"
                    ) from None
                raise

    @contextmanager
    def _in_transaction(self) -> Iterator[Callable[..., list[Row]]]:
        conn = self._conn
        if self.postgres:
            with conn.transaction():
                cur = conn.cursor()

                def run(sql: str, *params: Any) -> list[Row]:
                    cur.execute(sql.replace("?", "%s"), params)
                    return list(cur.fetchall()) if cur.description else []

                yield run
            return
        conn.execute("BEGIN IMMEDIATE")
        try:

            def run(sql: str, *params: Any) -> list[Row]:
                return list(conn.execute(sql, params).fetchall())

            yield run
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._schema_ready = False
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


def _pg_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else type(exc).__name__


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return True  # locked past the timeout, disk I/O, unopenable file
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


# --- the key store --------------------------------------------------------------------------


class KeyStore:
    """Key rings in one database, opened with one master secret."""

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        url = settings.get("database")
        if not isinstance(url, str) or not url:
            raise ConfigError("keystore key manager: setting 'database' is required")
        self.db = _Database(url, secrets, float(settings.get("timeout", DEFAULT_TIMEOUT)))
        self._passphrase: bytes | None = None
        self._master_file: bytes | None = None
        key_file = settings.get("master_key_file")
        if key_file:
            self._master_file = _read_key_file(str(key_file))
        else:
            phrase = secrets.get("passphrase")
            if not phrase:
                raise ConfigError(
                    "keystore key manager: no master secret (S3CRYPTFS_KEYSTORE_PASSPHRASE, "
                    "passphrase_file or master_key_file)"
                )
            self._passphrase = phrase.encode() if isinstance(phrase, str) else bytes(phrase)
        self._masters: dict[str, AESGCM] = {}
        self._keys: dict[tuple[str, int], AESGCM] = {}
        self._lock = threading.Lock()

    def _master_for(self, ring: str, kdf_text: str, check: bytes) -> AESGCM:
        with self._lock:
            cached = self._masters.get(ring)
        if cached is not None:
            return cached
        kdf = json.loads(kdf_text)
        if kdf.get("name") == "key-file":
            if self._master_file is None:
                raise ConfigError(f"key ring {ring} is sealed under a key file (master_key_file)")
            key = self._master_file
        else:
            if self._passphrase is None:
                raise ConfigError(f"key ring {ring} is sealed under a passphrase, not a key file")
            key = _derive(self._passphrase, kdf)
        master = AESGCM(key)
        try:
            master.decrypt(check[:NONCE], check[NONCE:], _CHECK + ring.encode())
        except InvalidTag:
            raise WrongPasswordError(
                f"wrong master passphrase or key file for key ring {ring}"
            ) from None
        with self._lock:
            self._masters[ring] = master
        return master

    def _ring(self, run: Callable[..., list[Row]], ring: str) -> AESGCM:
        rows = run("SELECT kdf, check_value FROM s3cryptfs_key_rings WHERE name = ?", ring)
        if not rows:
            raise KeyNotFound(f"key store has no key ring {ring!r}")
        return self._master_for(ring, rows[0][0], bytes(rows[0][1]))

    def _lock_ring(self, run: Callable[..., list[Row]], ring: str) -> AESGCM:
        if self.db.postgres:  # serialize admins of one ring (SQLite: BEGIN IMMEDIATE does)
            run("SELECT name FROM s3cryptfs_key_rings WHERE name = ? FOR UPDATE", ring)
        return self._ring(run, ring)

    def _new_version(
        self, run: Callable[..., list[Row]], master: AESGCM, ring: str, version: int
    ) -> None:
        nonce = os.urandom(NONCE)
        sealed = nonce + master.encrypt(nonce, os.urandom(32), _seal_aad(ring, version))
        run(
            "INSERT INTO s3cryptfs_key_versions (ring, version, state, sealed, created) "
            "VALUES (?, ?, 'active', ?, ?)",
            ring,
            version,
            sealed,
            time.time(),
        )

    # --- administration ---------------------------------------------------------------

    def create_ring(self, ring: str, scrypt: Mapping[str, int] | None = None) -> bool:
        """Create *ring* with an active version 1; False when it exists (master checked)."""
        with self.db.transaction() as run:
            if run("SELECT name FROM s3cryptfs_key_rings WHERE name = ?", ring):
                self._ring(run, ring)
                return False
            if self._master_file is not None:
                kdf: dict[str, Any] = {"name": "key-file"}
            else:
                kdf = {"name": "scrypt", "salt": os.urandom(16).hex(), **(scrypt or DEFAULT_SCRYPT)}
            key = self._master_file if self._master_file is not None else None
            if key is None:
                assert self._passphrase is not None
                key = _derive(self._passphrase, kdf)
            master = AESGCM(key)
            nonce = os.urandom(NONCE)
            check = nonce + master.encrypt(nonce, b"", _CHECK + ring.encode())
            run(
                "INSERT INTO s3cryptfs_key_rings (name, kdf, check_value, created) "
                "VALUES (?, ?, ?, ?)",
                ring,
                json.dumps(kdf),
                check,
                time.time(),
            )
            self._new_version(run, master, ring, 1)
        return True

    def rotate(self, ring: str) -> int:
        """Make a new active version; the old active one becomes decrypt-only."""
        with self.db.transaction() as run:
            master = self._lock_ring(run, ring)
            rows = run("SELECT MAX(version) FROM s3cryptfs_key_versions WHERE ring = ?", ring)
            version = int(rows[0][0] or 0) + 1
            run(
                "UPDATE s3cryptfs_key_versions SET state = 'decrypt-only' "
                "WHERE ring = ? AND state = 'active'",
                ring,
            )
            self._new_version(run, master, ring, version)
        return version

    def deactivate(self, ring: str, version: int) -> None:
        """Retire *version*: its sealed key is erased; what it wrapped is lost."""
        with self.db.transaction() as run:
            self._lock_ring(run, ring)
            rows = run(
                "SELECT state FROM s3cryptfs_key_versions WHERE ring = ? AND version = ?",
                ring,
                version,
            )
            if not rows:
                raise KeyNotFound(f"key ring {ring} has no version {version}")
            if rows[0][0] == "active":
                raise KeyManagerError(f"version {version} of {ring} is the active one")
            run(
                "UPDATE s3cryptfs_key_versions SET state = 'retired', sealed = NULL "
                "WHERE ring = ? AND version = ?",
                ring,
                version,
            )
        with self._lock:
            self._keys.pop((ring, version), None)

    def list_versions(self, ring: str) -> list[KeyVersionInfo]:
        with self.db.transaction() as run:
            self._ring(run, ring)
            rows = run(
                "SELECT version, state, created FROM s3cryptfs_key_versions WHERE ring = ? "
                "ORDER BY version",
                ring,
            )
        return [KeyVersionInfo(int(v), ring, str(s), float(c)) for v, s, c in rows]

    # --- keys ---------------------------------------------------------------------------

    def active(self, ring: str) -> tuple[int, AESGCM]:
        with self.db.transaction() as run:
            master = self._ring(run, ring)
            rows = run(
                "SELECT version, sealed FROM s3cryptfs_key_versions "
                "WHERE ring = ? AND state = 'active'",
                ring,
            )
        if not rows:
            raise KeyNotFound(f"key ring {ring} has no active version")
        version = int(rows[0][0])
        return version, self._unseal(master, ring, version, bytes(rows[0][1]))

    def usable(self, ring: str, version: int) -> AESGCM:
        """The key of *version* if it may still unwrap (the state is read every time)."""
        with self.db.transaction() as run:
            master = self._ring(run, ring)
            rows = run(
                "SELECT state, sealed FROM s3cryptfs_key_versions WHERE ring = ? AND version = ?",
                ring,
                version,
            )
        if not rows:
            raise KeyNotFound(f"key ring {ring} has no version {version}")
        if rows[0][0] == "retired" or rows[0][1] is None:
            raise KeyRetired(f"key ring {ring} version {version} is retired")
        return self._unseal(master, ring, version, bytes(rows[0][1]))

    def _unseal(self, master: AESGCM, ring: str, version: int, sealed: bytes) -> AESGCM:
        with self._lock:
            cached = self._keys.get((ring, version))
        if cached is not None:
            return cached
        try:
            key = master.decrypt(sealed[:NONCE], sealed[NONCE:], _seal_aad(ring, version))
        except InvalidTag:
            raise UnwrapFailed(f"sealed key of {ring} version {version} is corrupt") from None
        aead = AESGCM(key)
        with self._lock:
            self._keys[(ring, version)] = aead
        return aead

    def close(self) -> None:
        self.db.close()
        with self._lock:
            self._keys.clear()
            self._masters.clear()


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read master key file {path}: {exc.strerror}") from None
    if len(data) != 32:
        stripped = data.strip()
        try:
            data = bytes.fromhex(stripped.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            data = b""
    if len(data) != 32:
        raise ConfigError(f"master key file {path} must hold 32 bytes (raw or 64 hex digits)")
    return data


# --- the KeyManager ----------------------------------------------------------------------------


class KeystoreKeyManager:
    provider = PROVIDER

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        ring = settings.get("ring")
        if not isinstance(ring, str) or not ring:
            raise ConfigError("keystore key manager: setting 'ring' is required")
        self.ring = ring
        self._store = KeyStore(settings, secrets)
        # A wrong master secret should fail a mount at once, not at its first file; a database
        # that is down now may come back, so that alone does not fail the construction.
        try:
            self._store.active(ring)
        except ProviderUnavailable:
            pass
        except BaseException:
            self._store.close()
            raise

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        version, aead = self._store.active(self.ring)
        nonce = os.urandom(NONCE)
        aad = _wrap_aad(self.ring, version, context.get("volume_id", ""))
        return KeyEnvelope(self.ring, version, PROVIDER, nonce + aead.encrypt(nonce, dek, aad))

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        if envelope.provider != PROVIDER:
            raise InvalidEnvelope(f"envelope of provider {envelope.provider!r}, not {PROVIDER}")
        if envelope.key_id != self.ring:
            raise KeyNotFound(f"key ring {envelope.key_id!r} is not this volume's ({self.ring})")
        aead = self._store.usable(self.ring, envelope.key_version)
        ct = envelope.ciphertext
        if len(ct) != WRAPPED_LEN:
            raise InvalidEnvelope(f"wrapped key is {len(ct)} bytes, expected {WRAPPED_LEN}")
        aad = _wrap_aad(self.ring, envelope.key_version, context.get("volume_id", ""))
        try:
            return aead.decrypt(ct[:NONCE], ct[NONCE:], aad)
        except InvalidTag:
            raise UnwrapFailed("data key does not authenticate under its key version") from None

    def active_key_version(self) -> int:
        return self._store.active(self.ring)[0]

    def health_check(self) -> None:
        self._store.active(self.ring)

    def versions(self) -> list[KeyVersionInfo]:
        return self._store.list_versions(self.ring)

    def rotate(self) -> dict[str, Any]:
        self._store.rotate(self.ring)
        return {"ring": self.ring}

    def retire(self, version: int) -> dict[str, Any]:
        self._store.deactivate(self.ring, version)
        return {"ring": self.ring}

    def close(self) -> None:
        self._store.close()


def create_settings(options: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """Descriptor settings for a new volume: creates the ring (default ``s3cryptfs-<volume>``)
    with version 1 when missing. Only the ring name goes to the descriptor."""
    ring = options.get("ring")
    if not ring:
        volume_id = options.get("volume_id")
        if not volume_id:
            raise ConfigError("keystore key manager: set 'ring' (the key ring name)")
        ring = f"s3cryptfs-{volume_id}"
    store = KeyStore(options, secrets)
    try:
        scrypt = options.get("scrypt")
        store.create_ring(str(ring), dict(scrypt) if isinstance(scrypt, Mapping) else None)
    finally:
        store.close()
    return {"ring": str(ring)}
