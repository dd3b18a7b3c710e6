"""The audit signing key: its own 0600 file, never in the database, never under the master key.

Whoever holds the master key and the database can decrypt every data key, but
cannot re-sign a rewritten audit trail: the Ed25519 key that signs entries and
checkpoints lives only in ``pipeline.audit.signing-key-url`` (default
``file://{home}/audit-signing.key``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from pipeline.errors import ConfigError, KeyringError

__all__ = ["AuditSigner", "open_signer", "public_hex"]


def public_hex(key: Ed25519PublicKey) -> str:
    """The raw public key as hex (how audit entries name a key)."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class AuditSigner:
    """An Ed25519 private key kept in a file readable only by its owner."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = path
        self.url = f"file://{path}"
        self._key = key
        self.public_key = key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @classmethod
    def load(cls, path: Path) -> AuditSigner:
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
    def create(cls, path: Path) -> AuditSigner:
        """A new key, written once (a key another process just made wins)."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return cls.load(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return cls(path, key)


def open_signer(url: str) -> AuditSigner | None:
    """The signer ``pipeline.audit.signing-key-url`` names, or None when its file does not exist yet."""
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise ConfigError(f"pipeline.audit.signing-key-url: unknown scheme {parsed.scheme!r} in {url!r} (known: file)")
    path = Path(parsed.path)
    return AuditSigner.load(path) if path.exists() else None
