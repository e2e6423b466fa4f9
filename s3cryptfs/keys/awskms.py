"""AWS KMS key manager (provider ``awskms``), over boto3 Encrypt/Decrypt.

Settings (descriptor): ``key_ids`` (key ids or ARNs; version N is ``key_ids[N-1]`` and the LAST
one is active), ``retired`` (list of retired versions), ``region``. Machine-local: ``endpoint_url``
(optional), ``timeout`` (seconds, default 10). Credentials come from boto3's usual chain, or from
secrets ``aws_access_key_id`` / ``aws_secret_access_key`` (/ ``aws_session_token``).

The volume id is bound as EncryptionContext {"s3cryptfs-volume": volume_id}. AWS KMS's own
automatic rotation is invisible to the ciphertext, so s3cryptfs rotation is a NEW key (CreateKey)
appended to ``key_ids``; versions live in the descriptor, and rotate/retire return new settings.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from s3cryptfs.errors import (
    ConfigError,
    InvalidEnvelope,
    KeyAccessDenied,
    KeyManagerError,
    KeyNotFound,
    KeyRetired,
    ProviderUnavailable,
    UnwrapFailed,
)
from s3cryptfs.keys.base import KeyEnvelope, KeyVersionInfo

PROVIDER = "awskms"
DEFAULT_TIMEOUT = 10.0
CONTEXT_NAME = "s3cryptfs-volume"
DESCRIPTOR_FIELDS = ("key_ids", "retired", "region")

_UNAVAILABLE = (
    bexc.EndpointConnectionError,
    bexc.ConnectTimeoutError,
    bexc.ReadTimeoutError,
    bexc.ConnectionClosedError,
)
_DENIED = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignature",
    "ExpiredTokenException",
}
_STATE = {"DisabledException", "KMSInvalidStateException"}
_SERVER = {"KMSInternalException", "DependencyTimeoutException", "ThrottlingException"}


def _client(settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> Any:
    timeout = float(settings.get("timeout", DEFAULT_TIMEOUT))
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    kwargs: dict[str, Any] = {"config": config}
    if settings.get("region"):
        kwargs["region_name"] = settings["region"]
    if settings.get("endpoint_url"):
        kwargs["endpoint_url"] = settings["endpoint_url"]
    for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        if secrets.get(name):
            kwargs[name] = secrets[name]
    try:
        return boto3.session.Session().client("kms", **kwargs)
    except bexc.BotoCoreError as exc:  # e.g. no region configured anywhere
        raise ConfigError(f"awskms key manager: {exc}") from None


def _call(what: str, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except _UNAVAILABLE as exc:
        raise ProviderUnavailable(f"AWS KMS did not answer {what} ({type(exc).__name__})") from None
    except bexc.NoCredentialsError:
        raise KeyAccessDenied("AWS KMS: no credentials found") from None
    except bexc.ParamValidationError:
        raise InvalidEnvelope(f"AWS KMS {what}: malformed request") from None
    except bexc.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _DENIED:
            raise KeyAccessDenied(f"AWS KMS refused {what} ({code})") from None
        if code == "NotFoundException":
            raise KeyNotFound(f"AWS KMS has no such key for {what}") from None
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):
            raise UnwrapFailed(f"AWS KMS could not decrypt the data key ({code})") from None
        if code in _STATE:
            raise KeyRetired(f"AWS KMS key is disabled or pending deletion ({code})") from None
        if code in _SERVER:
            raise ProviderUnavailable(f"AWS KMS cannot serve {what} now ({code})") from None
        raise KeyManagerError(f"AWS KMS {what} failed ({code})") from None
    except bexc.BotoCoreError as exc:
        raise ProviderUnavailable(f"AWS KMS {what} failed ({type(exc).__name__})") from None


def _context(context: Mapping[str, str]) -> dict[str, str]:
    return {CONTEXT_NAME: str(context.get("volume_id", ""))}


class AwsKmsKeyManager:
    provider = PROVIDER

    def __init__(self, settings: Mapping[str, Any], secrets: Mapping[str, Any]) -> None:
        key_ids = settings.get("key_ids")
        if (
            not isinstance(key_ids, list)
            or not key_ids
            or not all(isinstance(k, str) and k for k in key_ids)
        ):
            raise ConfigError("awskms key manager: 'key_ids' must be a non-empty list of key ids")
        if len(set(key_ids)) != len(key_ids):
            raise ConfigError("awskms key manager: a key id appears twice in 'key_ids'")
        self._settings = {k: settings[k] for k in DESCRIPTOR_FIELDS if settings.get(k)}
        self._key_ids = list(key_ids)
        self._retired = {int(v) for v in settings.get("retired", [])}
        self._kms = _client(settings, secrets)
        self._lock = threading.Lock()
        self._closed = False

    def active_key_version(self) -> int:
        return len(self._key_ids)

    def wrap_key(self, dek: bytes, context: Mapping[str, str]) -> KeyEnvelope:
        version = self.active_key_version()
        key_id = self._key_ids[version - 1]
        reply = _call(
            "encrypt",
            self._kms.encrypt,
            KeyId=key_id,
            Plaintext=dek,
            EncryptionContext=_context(context),
        )
        return KeyEnvelope(key_id, version, PROVIDER, bytes(reply["CiphertextBlob"]))

    def unwrap_key(self, envelope: KeyEnvelope, context: Mapping[str, str]) -> bytes:
        if envelope.provider != PROVIDER:
            raise InvalidEnvelope(f"envelope of provider {envelope.provider!r}, not {PROVIDER}")
        v = envelope.key_version
        if not 1 <= v <= len(self._key_ids) or self._key_ids[v - 1] != envelope.key_id:
            raise KeyNotFound(f"no AWS KMS key {envelope.key_id!r} as version {v} of this volume")
        if v in self._retired:
            raise KeyRetired(f"AWS KMS key version {v} of this volume is retired")
        if not envelope.ciphertext:
            raise InvalidEnvelope("empty wrapped key")
        reply = _call(
            "decrypt",
            self._kms.decrypt,
            KeyId=envelope.key_id,
            CiphertextBlob=envelope.ciphertext,
            EncryptionContext=_context(context),
        )
        return bytes(reply["Plaintext"])

    def health_check(self) -> None:
        _call("describe key", self._kms.describe_key, KeyId=self._key_ids[-1])

    # --- KeyAdmin: versions live in the descriptor ------------------------------------

    def versions(self) -> list[KeyVersionInfo]:
        active = self.active_key_version()
        out = []
        for i, key_id in enumerate(self._key_ids, start=1):
            state = "retired" if i in self._retired else "active" if i == active else "decrypt-only"
            out.append(KeyVersionInfo(i, key_id, state))
        return out

    def rotate(self) -> dict[str, Any]:
        reply = _call(
            "create key",
            self._kms.create_key,
            Description="s3cryptfs volume key",
            KeyUsage="ENCRYPT_DECRYPT",
        )
        settings = dict(self._settings)
        settings["key_ids"] = [*self._key_ids, reply["KeyMetadata"]["Arn"]]
        return settings

    def retire(self, version: int) -> dict[str, Any]:
        if not 1 <= version <= len(self._key_ids):
            raise KeyNotFound(f"this volume has no AWS KMS key version {version}")
        if version == self.active_key_version():
            raise KeyManagerError(f"version {version} is the active one; rotate first")
        settings = dict(self._settings)
        settings["retired"] = sorted(self._retired | {version})
        return settings

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._kms.close()


def create_settings(options: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, Any]:
    """Descriptor settings for a new volume: ``key_id`` (or ``key_ids``) from the options, else
    a new symmetric key made with CreateKey."""
    out: dict[str, Any] = {}
    if options.get("region"):
        out["region"] = options["region"]
    if options.get("key_ids"):
        out["key_ids"] = list(options["key_ids"])
    elif options.get("key_id"):
        out["key_ids"] = [str(options["key_id"])]
    else:
        kms = _client(options, secrets)
        try:
            volume = options.get("volume_id", "")
            reply = _call(
                "create key",
                kms.create_key,
                Description=f"s3cryptfs volume {volume}".strip(),
                KeyUsage="ENCRYPT_DECRYPT",
            )
        finally:
            kms.close()
        out["key_ids"] = [reply["KeyMetadata"]["Arn"]]
    return out
