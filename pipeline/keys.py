"""Keyring: master key providers, per-subject data keys, subject references.

Envelope encryption: each subject (account) has an AES-256 data key; data keys
are stored in the metadata database wrapped by the master key, which lives
outside the database (a local 0600 key file, or AWS KMS). Destroying a subject's
data key makes every copy of its segments unreadable (crypto-shredding); rotating
the master key re-wraps data keys without touching data.

``subject_ref`` is HMAC-SHA256 of the account name under the keyring's index
key: stores index by it, so no name is ever stored in clear.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from pipeline.db import insert_ignoring_duplicates, keyring_keys
from pipeline.errors import ConfigError, KeyringError, StoreUnavailable, UnknownAccountError
from pipeline.fsmodes import open_private, private_folder
from pipeline.records import utcnow
from pipeline.redact import mask_url

__all__ = ["KeyProvider", "Keyring", "LocalKeyFile", "open_key_provider"]

_NONCE = 12
INDEX_KEY_ID = "index"


class KeyProvider(ABC):
    """Holds the master key and wraps/unwraps data keys with it."""

    url: str

    @abstractmethod
    def current_version(self) -> int:
        """Version of the master key that new wraps use."""

    @abstractmethod
    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[int, bytes]:
        """Encrypt a data key under the current master key.

        :returns: the master key version used and the wrapped bytes
        """

    @abstractmethod
    def unwrap(self, version: int, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a wrapped data key.

        :raises KeyringError: the master key (version) is missing or does not match
        """

    @abstractmethod
    def rotate(self) -> int:
        """Create a new master key version and make it current; returns it."""


class LocalKeyFile(KeyProvider):
    """Master keys in a JSON file readable only by its owner (mode 0600)."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self.url = f"file://{path}"
        self._lock = threading.Lock()
        if not path.exists():
            if not create:
                raise KeyringError(f"master key file {path} does not exist; run metadata-pipeline init")
            self._keys = {1: AESGCM.generate_key(256)}
            self._current = 1
            self._save()
        else:
            self._load()
        self._ciphers = {v: AESGCM(k) for v, k in self._keys.items()}

    def _load(self) -> None:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise KeyringError(
                f"master key file {self.path} is readable by others (mode {mode:04o}); run chmod 600 {self.path}"
            )
        try:
            doc = json.loads(self.path.read_text())
            self._keys = {int(v): base64.b64decode(k) for v, k in doc["keys"].items()}
            self._current = int(doc["current"])
            if any(len(k) != 32 for k in self._keys.values()) or self._current not in self._keys:
                raise ValueError("keys must be 32 bytes and 'current' one of them")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyringError(f"master key file {self.path} is malformed: {exc}") from exc

    def _save(self) -> None:
        doc = {
            "current": self._current,
            "keys": {str(v): base64.b64encode(k).decode() for v, k in self._keys.items()},
        }
        private_folder(self.path.parent)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def current_version(self) -> int:
        return self._current

    def wrap(self, plaintext: bytes, aad: bytes) -> tuple[int, bytes]:
        nonce = os.urandom(_NONCE)
        return self._current, nonce + self._ciphers[self._current].encrypt(nonce, plaintext, aad)

    def unwrap(self, version: int, blob: bytes, aad: bytes) -> bytes:
        cipher = self._ciphers.get(version)
        if cipher is None:
            raise KeyringError(f"master key file {self.path} has no key version {version}")
        try:
            return cipher.decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag:
            raise KeyringError(f"master key file {self.path} does not open this keyring (wrong key)") from None

    def rotate(self) -> int:
        with self._lock:
            new = max(self._keys) + 1
            self._keys[new] = AESGCM.generate_key(256)
            self._current = new
            self._save()
            self._ciphers[new] = AESGCM(self._keys[new])
            return new


def open_key_provider(url: str, *, create: bool = False) -> KeyProvider:
    """The provider for ``pipeline.keys.url``, chosen by its scheme."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalKeyFile(Path(parsed.path), create=create)
    if parsed.scheme == "aws-kms":
        from pipeline.kms import AWSKMSKeyProvider

        return AWSKMSKeyProvider(url)
    raise ConfigError(f"unknown key URL scheme {parsed.scheme!r} in {mask_url(url)!r} (known: file, aws-kms)")


def _aad(key_id: str, key_version: int) -> bytes:
    return f"pipeline-key|{key_id}|{key_version}".encode()


class Keyring:
    """Data keys per subject, wrapped by the master key, cached as cipher objects."""

    def __init__(self, engine: Engine, provider: KeyProvider) -> None:
        self.engine = engine
        self.provider = provider
        self._lock = threading.Lock()
        self._ciphers: dict[str, tuple[int, AESGCM]] = {}
        self._refs: dict[tuple[str, str | None], str] = {}
        self._index_key = self._load_index_key()
        #: called with (subject_ref, key_version) after a subject's data key is created; the
        #: pipeline records it in the audit trail (a hook, so keys.py does not import audit)
        self.on_key_created: Callable[[str, int], None] | None = None

    @classmethod
    def open(cls, engine: Engine, provider: KeyProvider, *, create: bool = False) -> Keyring:
        """Open the keyring; with ``create`` make its index key on first use."""
        if create:
            cls._ensure_key(engine, provider, INDEX_KEY_ID, "index")
        return cls(engine, provider)

    @staticmethod
    def _ensure_key(engine: Engine, provider: KeyProvider, key_id: str, purpose: str) -> bool:
        """Insert a fresh wrapped key unless one exists; True when this call made it."""
        key = AESGCM.generate_key(256)
        master_version, wrapped = provider.wrap(key, _aad(key_id, 1))
        try:
            with engine.begin() as conn:
                created = conn.execute(
                    insert_ignoring_duplicates(engine, keyring_keys)
                    .returning(keyring_keys.c.key_id)  # rowcount is -1 on PostgreSQL for this statement
                    .values(
                        key_id=key_id,
                        purpose=purpose,
                        key_version=1,
                        master_version=master_version,
                        wrapped=wrapped,
                        created_at=utcnow(),
                    )
                ).first()
            return created is not None
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"keyring database unreachable: {exc.__class__.__name__}") from exc

    def _row(self, key_id: str):  # noqa: ANN202 - a SQLAlchemy Row
        try:
            with self.engine.connect() as conn:
                return conn.execute(select(keyring_keys).where(keyring_keys.c.key_id == key_id)).first()
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"keyring database unreachable: {exc.__class__.__name__}") from exc

    def _load_index_key(self) -> bytes:
        row = self._row(INDEX_KEY_ID)
        if row is None:
            raise KeyringError(
                f"no keyring in {mask_url(self.engine.url.render_as_string(hide_password=False))}; "
                "run metadata-pipeline init"
            )
        return self.provider.unwrap(row.master_version, row.wrapped, _aad(INDEX_KEY_ID, row.key_version))

    def subject_ref(self, account: str, user: str | None = None) -> str:
        """Keyed hash of an account (or of account and user): the only id stored in clear."""
        ref = self._refs.get((account, user))
        if ref is None:
            message = account.encode() if user is None else f"{account}\0{user}".encode()
            ref = hmac.new(self._index_key, message, hashlib.sha256).hexdigest()
            self._refs[(account, user)] = ref
        return ref

    def user_ref(self, account: str, user: str | None) -> str | None:
        return None if user is None else self.subject_ref(account, user)

    def named_key(self, key_id: str, purpose: str) -> bytes:
        """A wrapped key kept for another component (e.g. the audit signing key)."""
        row = self._row(key_id)
        if row is None:
            self._ensure_key(self.engine, self.provider, key_id, purpose)
            row = self._row(key_id)
        return self.provider.unwrap(row.master_version, row.wrapped, _aad(key_id, row.key_version))

    def cipher(self, subject_ref: str, *, create: bool = True) -> tuple[int, AESGCM]:
        """The current data key of a subject as ``(key_version, AESGCM)``.

        :raises UnknownAccountError: no key exists and ``create`` is false
        :raises KeyringError: the key was destroyed and ``create`` is false
        """
        cached = self._ciphers.get(subject_ref)
        if cached is not None:
            return cached
        with self._lock:
            row = self._row(subject_ref)
            if row is None or row.wrapped is None:
                if not create:
                    if row is None:
                        raise UnknownAccountError(subject_ref)
                    raise KeyringError(f"data key of subject {subject_ref[:12]}… was destroyed")
                row = self._new_version(subject_ref, row)
            key = self.provider.unwrap(row.master_version, row.wrapped, _aad(subject_ref, row.key_version))
            cached = self._ciphers[subject_ref] = (row.key_version, AESGCM(key))
            return cached

    def _new_version(self, subject_ref: str, destroyed):  # noqa: ANN001, ANN202
        if destroyed is None:
            created = self._ensure_key(self.engine, self.provider, subject_ref, "subject")
        else:  # a subject erased earlier comes back: a new key version, old data stays unreadable
            version = destroyed.key_version + 1
            master_version, wrapped = self.provider.wrap(AESGCM.generate_key(256), _aad(subject_ref, version))
            with self.engine.begin() as conn:
                created = (
                    conn.execute(
                        update(keyring_keys)
                        .where(keyring_keys.c.key_id == subject_ref, keyring_keys.c.wrapped.is_(None))
                        .values(
                            key_version=version,
                            master_version=master_version,
                            wrapped=wrapped,
                            created_at=utcnow(),
                            destroyed_at=None,
                        )
                    ).rowcount
                    > 0
                )
        row = self._row(subject_ref)
        if created and self.on_key_created is not None:
            self.on_key_created(subject_ref, row.key_version)
        return row

    def cipher_for(self, subject_ref: str, key_version: int) -> AESGCM:
        """The data key that sealed a segment; fails once the key was destroyed."""
        version, cipher = self.cipher(subject_ref, create=False)
        if version != key_version:
            raise KeyringError(f"data key version {key_version} of subject {subject_ref[:12]}… was destroyed")
        return cipher

    def key_state(self, subject_ref: str) -> str:
        """``active``, ``destroyed`` or ``unknown``."""
        row = self._row(subject_ref)
        if row is None:
            return "unknown"
        return "destroyed" if row.wrapped is None else "active"

    def destroy(self, subject_ref: str) -> bool:
        """Crypto-shred a subject's data key; True when a live key was destroyed."""
        with self._lock:
            self._ciphers.pop(subject_ref, None)
            with self.engine.begin() as conn:
                result = conn.execute(
                    update(keyring_keys)
                    .where(keyring_keys.c.key_id == subject_ref, keyring_keys.c.wrapped.is_not(None))
                    .values(wrapped=None, destroyed_at=utcnow())
                )
            return result.rowcount > 0

    def rotate_master(self) -> tuple[int, int]:
        """New master key version; re-wrap every live key. Returns (version, keys re-wrapped)."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(keyring_keys).where(keyring_keys.c.wrapped.is_not(None))).all()
            plain = {
                r.key_id: (
                    r.key_version,
                    self.provider.unwrap(r.master_version, r.wrapped, _aad(r.key_id, r.key_version)),
                )
                for r in rows
            }
            version = self.provider.rotate()
            for key_id, (key_version, key) in plain.items():
                master_version, wrapped = self.provider.wrap(key, _aad(key_id, key_version))
                conn.execute(
                    update(keyring_keys)
                    .where(keyring_keys.c.key_id == key_id)
                    .values(master_version=master_version, wrapped=wrapped)
                )
        return version, len(plain)
