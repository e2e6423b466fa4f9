"""``pykmip-server`` plus NIST key wrap (RFC 3394) in Encrypt and Decrypt.

PyKMIP's server rejects BlockCipherMode NISTKeyWrap in Encrypt/Decrypt; Cosmian KMS, which the Go
gateway's ``cosmian-kmip`` provider talks to, implements it. This launcher adds exactly that mode
to PyKMIP's crypto engine (with ``cryptography``'s AES key wrap) and then runs the stock server,
so the manager's nist-keywrap requests can be exercised end to end. Run as a script.
"""

from __future__ import annotations

import sys

from cryptography.hazmat.primitives import keywrap
from kmip.core import enums, exceptions
from kmip.services.server import server
from kmip.services.server.crypto.engine import CryptographyEngine

DEFAULT_IV = bytes.fromhex("A6A6A6A6A6A6A6A6")

_plain_encrypt = CryptographyEngine._encrypt_symmetric
_plain_decrypt = CryptographyEngine._decrypt_symmetric


def _check_iv(iv_nonce: bytes | None) -> None:
    if iv_nonce not in (None, DEFAULT_IV):
        raise exceptions.InvalidField("NIST key wrap supports only the default IV.")


def _encrypt_symmetric(self, encryption_algorithm, encryption_key, plain_text, **kwargs):
    if kwargs.get("cipher_mode") != enums.BlockCipherMode.NIST_KEY_WRAP:
        return _plain_encrypt(self, encryption_algorithm, encryption_key, plain_text, **kwargs)
    _check_iv(kwargs.get("iv_nonce"))
    try:
        return {"cipher_text": keywrap.aes_key_wrap(encryption_key, plain_text)}
    except ValueError as exc:
        raise exceptions.InvalidField(f"NIST key wrap: {exc}") from None


def _decrypt_symmetric(self, decryption_algorithm, decryption_key, cipher_text, **kwargs):
    if kwargs.get("cipher_mode") != enums.BlockCipherMode.NIST_KEY_WRAP:
        return _plain_decrypt(self, decryption_algorithm, decryption_key, cipher_text, **kwargs)
    _check_iv(kwargs.get("iv_nonce"))
    try:
        return keywrap.aes_key_unwrap(decryption_key, cipher_text)
    except (keywrap.InvalidUnwrap, ValueError):
        raise exceptions.CryptographicFailure("NIST key wrap integrity check failed.") from None


CryptographyEngine._encrypt_symmetric = _encrypt_symmetric
CryptographyEngine._decrypt_symmetric = _decrypt_symmetric

if __name__ == "__main__":
    sys.exit(server.main())
