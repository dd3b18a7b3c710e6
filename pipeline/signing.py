"""The audit signing key: never in the database, never under the master key.

Whoever holds the master key and the database can decrypt every data key, but
cannot re-sign a rewritten audit trail: the key that signs entries and
checkpoints lives only in ``pipeline.audit.signing-key-url`` — its own 0600
file with an Ed25519 key (default ``file://{home}/audit-signing.key``), or an
asymmetric AWS KMS key (``aws-kms://KEY``, ``ECC_NIST_P256``, ECDSA with
SHA-256), whose private half never leaves KMS.
"""

from __future__ import annotations

import stat
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
    load_pem_private_key,
    load_pem_public_key,
)

from pipeline.awsclient import aws_client
from pipeline.errors import ConfigError, KeyringError
from pipeline.fsmodes import private_folder, write_private

__all__ = [
    "AuditSigner",
    "FileSigner",
    "KMSSigner",
    "PublicKey",
    "load_public_hex",
    "load_verify_key",
    "open_signer",
    "public_hex",
    "verifies",
]

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey


def public_hex(key: PublicKey) -> str:
    """How audit entries name a key: hex of its DER SubjectPublicKeyInfo."""
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo).hex()


def load_public_hex(text: str) -> PublicKey:
    """The key :func:`public_hex` named (a raw 32-byte Ed25519 key in hex is accepted too)."""
    data = bytes.fromhex(text)
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    key = load_der_public_key(data)
    if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"unsupported audit key type {type(key).__name__}")
    return key


def load_verify_key(text: str) -> PublicKey:
    """``pipeline.audit.verify-key``: a PEM public key, or hex as :func:`public_hex` writes it.

    :raises ConfigError: it is neither, or not an Ed25519 / ECDSA P-256 key
    """
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
                raise ValueError(f"unsupported audit key type {type(key).__name__}")
            return key
        return load_public_hex(text)
    except ValueError as exc:
        raise ConfigError(f"pipeline.audit.verify-key is not an audit public key (PEM or hex DER): {exc}") from exc


def verifies(key: PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``data`` (Ed25519, or ECDSA with SHA-256)."""
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class AuditSigner(ABC):
    """Signs audit entries and checkpoints."""

    url: str
    public_key: PublicKey

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """The signature of ``data``.

        :raises KeyringError: the key cannot sign (KMS unreachable or refusing)
        """


class FileSigner(AuditSigner):
    """An Ed25519 private key kept in a file readable only by its owner."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = path
        self.url = f"file://{path}"
        self._key = key
        self.public_key = key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @classmethod
    def load(cls, path: Path) -> FileSigner:
        """:raises KeyringError: the file is readable by others or is not an Ed25519 key"""
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyringError(
                f"audit signing key {path} is readable by others (mode {mode:04o}); run chmod 600 {path}"
            )
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise KeyringError(f"audit signing key {path} is malformed: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyringError(f"audit signing key {path} is not an Ed25519 key")
        return cls(path, key)

    @classmethod
    def create(cls, path: Path) -> FileSigner:
        """A new key, written once (a key another process just made wins)."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        private_folder(path.parent)
        try:
            write_private(path, pem, replace=False)
        except FileExistsError:
            return cls.load(path)
        return cls(path, key)


class KMSSigner(AuditSigner):
    """An asymmetric AWS KMS key (``ECC_NIST_P256``): every signature is a KMS ``Sign`` call."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.url, self.key_id = url, (parsed.netloc + parsed.path).strip("/")
        if not self.key_id:
            raise ConfigError(f"pipeline.audit.signing-key-url {url!r} names no KMS key (aws-kms://KEY-ID)")
        self._kms, self._errors = aws_client("kms", url, "an AWS KMS audit key")
        try:
            reply = self._kms.get_public_key(KeyId=self.key_id)
        except self._errors as exc:
            raise KeyringError(f"AWS KMS audit key {self.key_id!r} is not usable: {exc}") from exc
        spec = reply.get("KeySpec") or reply.get("CustomerMasterKeySpec")  # the older name, still sent by some
        if spec != "ECC_NIST_P256" or reply.get("KeyUsage") != "SIGN_VERIFY":
            raise ConfigError(
                f"pipeline.audit.signing-key-url: KMS key {self.key_id!r} must be ECC_NIST_P256 for SIGN_VERIFY"
            )
        key = load_der_public_key(reply["PublicKey"])
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.public_key = key

    def sign(self, data: bytes) -> bytes:
        try:
            reply = self._kms.sign(KeyId=self.key_id, Message=data, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
        except self._errors as exc:
            raise KeyringError(f"AWS KMS audit key {self.key_id!r} cannot sign: {exc}") from exc
        return bytes(reply["Signature"])


def open_signer(url: str) -> AuditSigner | None:
    """The signer ``pipeline.audit.signing-key-url`` names; None when its file does not exist yet."""
    parsed = urlparse(url)
    if parsed.scheme == "aws-kms":
        return KMSSigner(url)
    if parsed.scheme != "file":
        raise ConfigError(
            f"pipeline.audit.signing-key-url: unknown scheme {parsed.scheme!r} in {url!r} (known: file, aws-kms)"
        )
    path = Path(parsed.path)
    return FileSigner.load(path) if path.exists() else None
