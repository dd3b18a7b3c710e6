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
import contextlib
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import ColumnElement, Connection, Engine, bindparam, func, or_, select, text, update

from pipeline.db import insert_ignoring_duplicates, keyring_keys, master_keys, reading, transaction
from pipeline.errors import ConfigError, KeyringError, PipelineError, StoreUnavailable, UnknownAccountError
from pipeline.fsmodes import private_folder, stale_copies, write_private
from pipeline.records import utcnow
from pipeline.redact import mask_url
from pipeline.subject_names import checked

__all__ = [
    "KEY_STATE_READ_EVERY",
    "KeyProvider",
    "Keyring",
    "LocalKeyFile",
    "MasterVersion",
    "lock_keys",
    "open_key_provider",
]

logger = logging.getLogger(__name__)

_NONCE = 12
INDEX_KEY_ID = "index"
_LOCK_KEY = 0x6B657973  # PostgreSQL advisory lock id of key operations ("keys")
#: seconds a read uses a data key's state, read from the database, before reading it again; an erasure
#: completes no sooner after destroying a key, so no read opens a segment of it once the receipt says completed
KEY_STATE_READ_EVERY = 0.5


class KeyProvider(ABC):
    """Holds the master key versions and wraps/unwraps data keys with them.

    Versions are created (:meth:`stage`), made current (:meth:`activate`) and, once
    the backup window has passed, destroyed (:meth:`destroy`): a data key wrapped
    under a destroyed version, in a backup or anywhere else, opens nothing.
    """

    url: str
    #: how long a destroyed version may still be restored where it lives (a KMS key's waiting period)
    destroyed_after: timedelta = timedelta(0)

    @abstractmethod
    def current_version(self) -> int:
        """Version of the master key that new wraps use."""

    @abstractmethod
    def versions(self) -> list[int]:
        """Versions that still exist (not destroyed), oldest first."""

    @abstractmethod
    def wrap(self, plaintext: bytes, aad: bytes, version: int | None = None) -> tuple[int, bytes]:
        """Encrypt a data key under a master key version (default: the current one).

        :returns: the master key version used and the wrapped bytes
        """

    @abstractmethod
    def unwrap(self, version: int, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a wrapped data key.

        :raises KeyringError: the master key (version) is missing or does not match
        """

    @abstractmethod
    def stage(self) -> int:
        """Create a new version beside the current one (not yet current); returns it."""

    @abstractmethod
    def activate(self, version: int) -> None:
        """Make a staged version the one new wraps use."""

    @abstractmethod
    def destroy(self, version: int) -> None:
        """Destroy a version for good (retirement); a missing version is no error.

        :raises KeyringError: ``version`` is the current one
        """

    def refresh(self) -> None:  # noqa: B027 - providers whose state lives elsewhere re-read it
        """Re-read versions another process may have created, activated or destroyed."""

    def rewrap(self, wrapped: Sequence[tuple[int, bytes, bytes]], version: int) -> list[bytes]:
        """Unwrap each ``(version, blob, aad)`` and wrap it again under ``version`` (a rotation's bulk step)."""
        return [self.wrap(self.unwrap(old, blob, aad), aad, version)[1] for old, blob, aad in wrapped]

    def key_ref(self, version: int) -> str | None:
        """Where this version lives, for providers that keep each version apart (a KMS key ARN)."""
        return None

    def adopt(self, key_refs: dict[int, str | None], current: int, *, first: str | None) -> None:  # noqa: B027
        """Learn live versions and the current one from the keyring's records (what :meth:`key_ref` gave).

        A key file knows itself and ignores this. ``first`` is the key of version 1,
        which the provider's URL must name.

        :raises KeyringError: the keyring was made with another master key
        """


class LocalKeyFile(KeyProvider):
    """Master key versions in a JSON file readable only by its owner (mode 0600).

    Every change is written to a uniquely named temporary file, fsync'd and
    renamed over the old one, so a reader sees the old or the new file, never half.
    """

    def __init__(self, path: Path, *, create: bool = False, keyring_made: bool = False) -> None:
        """:param keyring_made: the metadata database holds keys wrapped by this file already: a missing
        file is lost, never made again (a new key would open nothing and hide the loss)"""
        self.path = path
        self.url = f"file://{path}"
        self._lock = threading.Lock()
        self._keys: dict[int, bytes] = {}
        self._ciphers: dict[int, AESGCM] = {}
        self._current = 0
        if not path.exists():
            if keyring_made:
                raise KeyringError(
                    f"master key file {self.path} does not exist, but the metadata database holds a keyring made "
                    "with it: restore the file from a backup (a new key would open nothing)"
                )
            if not create:
                raise KeyringError(f"master key file {self.path} does not exist; run metadata-pipeline init")
            self._keys, self._current = {1: AESGCM.generate_key(256)}, 1
            self._save(exclusive=True)
        self.refresh()

    def refresh(self) -> None:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise KeyringError(
                f"master key file {self.path} is readable by others (mode {mode:04o}); run chmod 600 {self.path}"
            )
        try:
            doc = json.loads(self.path.read_text())
            keys = {int(v): base64.b64decode(k) for v, k in doc["keys"].items()}
            current = int(doc["current"])
            if any(len(k) != 32 for k in keys.values()) or current not in keys:
                raise ValueError("keys must be 32 bytes and 'current' one of them")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:  # any JSON shape
            raise KeyringError(f"master key file {self.path} is malformed: {exc}") from exc
        with self._lock:
            self._keys, self._current = keys, current
            self._ciphers = {v: self._ciphers.get(v) or AESGCM(k) for v, k in keys.items()}

    def _save(self, *, exclusive: bool = False) -> None:
        doc = {"current": self._current, "keys": {str(v): base64.b64encode(k).decode() for v, k in self._keys.items()}}
        private_folder(self.path.parent)
        if not exclusive:  # changes hold the keyring's lock: a copy found now is a killed writer's, whose
            for copy in stale_copies(self.path):  # versions a retirement must destroy with the file's own
                copy.unlink(missing_ok=True)
        with contextlib.suppress(FileExistsError):  # first creation: never replace a file another process just made
            write_private(self.path, json.dumps(doc).encode(), replace=not exclusive)

    def current_version(self) -> int:
        return self._current

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def wrap(self, plaintext: bytes, aad: bytes, version: int | None = None) -> tuple[int, bytes]:
        version = version or self._current
        nonce = os.urandom(_NONCE)
        return version, nonce + self._cipher(version).encrypt(nonce, plaintext, aad)

    def _cipher(self, version: int) -> AESGCM:
        cipher = self._ciphers.get(version)
        if cipher is None:
            self.refresh()  # another process may have rotated since this one read the file
            cipher = self._ciphers.get(version)
        if cipher is None:
            raise KeyringError(f"master key file {self.path} has no key version {version} (retired or never made)")
        return cipher

    def unwrap(self, version: int, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._cipher(version).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
        except InvalidTag:
            raise KeyringError(f"master key file {self.path} does not open this keyring (wrong key)") from None

    def rewrap(self, wrapped: Sequence[tuple[int, bytes, bytes]], version: int) -> list[bytes]:
        target = self._cipher(version)
        nonces = os.urandom(_NONCE * len(wrapped))
        out = []
        try:
            for i, (old, blob, aad) in enumerate(wrapped):
                nonce = nonces[i * _NONCE : (i + 1) * _NONCE]
                key = self._cipher(old).decrypt(blob[:_NONCE], blob[_NONCE:], aad)
                out.append(nonce + target.encrypt(nonce, key, aad))
        except InvalidTag:
            raise KeyringError(f"master key file {self.path} does not open this keyring (wrong key)") from None
        return out

    def stage(self) -> int:
        self.refresh()
        with self._lock:
            new = max(self._keys) + 1
            self._keys[new] = AESGCM.generate_key(256)
            self._ciphers[new] = AESGCM(self._keys[new])
            self._save()
            return new

    def activate(self, version: int) -> None:
        self.refresh()
        with self._lock:
            if version not in self._keys:
                raise KeyringError(f"master key file {self.path} has no key version {version} to activate")
            self._current = version
            self._save()

    def destroy(self, version: int) -> None:
        self.refresh()
        with self._lock:
            if version == self._current:
                raise KeyringError(f"master key version {version} is current and cannot be retired")
            if self._keys.pop(version, None) is not None:
                self._ciphers.pop(version, None)
                self._save()


#: the live version of some data keys: built once (an IN clause of literal values costs more than the query)
_LIVE_VERSIONS = select(keyring_keys.c.key_id, keyring_keys.c.key_version).where(
    keyring_keys.c.key_id.in_(bindparam("ids", expanding=True)), keyring_keys.c.wrapped.is_not(None)
)


def open_key_provider(url: str, *, create: bool = False, keyring_made: bool = False) -> KeyProvider:
    """The provider for ``pipeline.keys.url``, chosen by its scheme (``keyring_made``: see :class:`LocalKeyFile`)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalKeyFile(Path(parsed.path), create=create, keyring_made=keyring_made)
    if parsed.scheme == "aws-kms":
        from pipeline.kms import AWSKMSKeyProvider

        return AWSKMSKeyProvider(url)
    raise ConfigError(
        f"pipeline.keys.url: unknown key URL scheme {parsed.scheme!r} in {mask_url(url)!r} (known: file, aws-kms)"
    )


def _aad(key_id: str, key_version: int) -> bytes:
    return f"pipeline-key|{key_id}|{key_version}".encode()


@dataclass(frozen=True)
class MasterVersion:
    """One master key version's life: made, superseded by a newer one, retired (destroyed)."""

    version: int
    created_at: datetime
    superseded_at: datetime | None
    retired_at: datetime | None

    def retires_at(self, after: timedelta) -> datetime | None:
        """When it may be retired: the backup window after it stopped being current."""
        return None if self.superseded_at is None else self.superseded_at + after


def lock_keys(conn: Connection) -> None:
    """Serialise key operations (rotation, retirement) across processes until the transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:  # SQLite: a first write takes the database write lock (busy_timeout waits for it)
        conn.execute(update(master_keys).where(master_keys.c.version == -1).values(version=master_keys.c.version))


class Keyring:
    """Data keys per (account, user), wrapped by the master key, cached as cipher objects.

    An account's records without a user use the account's key (``key_id`` is its
    subject ref); a user's records use the user's own key (``key_id`` is the user
    ref), so erasing one user shreds exactly that user's data.
    """

    def __init__(self, engine: Engine, provider: KeyProvider) -> None:
        self.engine = engine
        self.provider = provider
        self._lock = threading.Lock()
        self._ciphers: dict[str, tuple[int, AESGCM]] = {}
        self._refs: dict[tuple[str, str | None], str] = {}
        _sync(engine, provider)
        self._index_key = self._load_index_key()
        self._adopt_master_versions()
        #: called with (key_id, key_version) after a data key is created; the pipeline
        #: records it in the audit trail (a hook, so keys.py does not import audit)
        self.on_key_created: Callable[[str, int], None] | None = None

    @classmethod
    def open(cls, engine: Engine, provider: KeyProvider, *, create: bool = False) -> Keyring:
        """Open the keyring; with ``create`` make its index key on first use."""
        if create:
            cls._ensure_key(engine, provider, INDEX_KEY_ID, "index", None)
        return cls(engine, provider)

    @staticmethod
    def made(engine: Engine) -> bool:
        """Whether the metadata database holds a keyring (keys wrapped by some master key) already."""
        with reading(engine, "reading the keyring") as conn:
            return conn.execute(select(keyring_keys.c.key_id).limit(1)).first() is not None

    @staticmethod
    def _ensure_key(engine: Engine, provider: KeyProvider, key_id: str, purpose: str, account_ref: str | None) -> bool:
        """Insert a fresh wrapped key unless one exists; True when this call made it."""
        with transaction(engine, "creating a data key") as conn:
            master_version, wrapped = _wrap_current(conn, provider, AESGCM.generate_key(256), _aad(key_id, 1))
            created = conn.execute(
                insert_ignoring_duplicates(engine, keyring_keys)
                .returning(keyring_keys.c.key_id)  # rowcount is -1 on PostgreSQL for this statement
                .values(
                    key_id=key_id,
                    purpose=purpose,
                    account_ref=account_ref,
                    key_version=1,
                    master_version=master_version,
                    wrapped=wrapped,
                    created_at=utcnow(),
                )
            ).first()
        return created is not None

    def _row(self, key_id: str):  # noqa: ANN202 - a SQLAlchemy Row
        with reading(self.engine, "reading the keyring") as conn:
            return conn.execute(select(keyring_keys).where(keyring_keys.c.key_id == key_id)).first()

    def _load_index_key(self) -> bytes:
        row = self._row(INDEX_KEY_ID)
        if row is None:
            raise KeyringError(
                f"no keyring in {mask_url(self.engine.url.render_as_string(hide_password=False))}; "
                "run metadata-pipeline init"
            )
        return self._unwrap(row.master_version, row.wrapped, _aad(INDEX_KEY_ID, row.key_version))

    def _adopt_master_versions(self) -> None:
        """Record the provider's versions (a keyring made before retirement existed has none recorded)."""
        with transaction(self.engine, "reading master key versions") as conn:
            known = set(conn.scalars(select(master_keys.c.version)))
        missing = [v for v in self.provider.versions() if v not in known]
        if not missing:
            return
        now, current = utcnow(), self.provider.current_version()
        rows = [
            {
                "version": v,
                "key_ref": self.provider.key_ref(v),
                "created_at": now,
                "superseded_at": None if v == current else now,
                "retired_at": None,
            }
            for v in missing
        ]
        with transaction(self.engine, "recording master key versions") as conn:
            conn.execute(insert_ignoring_duplicates(self.engine, master_keys), rows)

    def subject_ref(self, account: str, user: str | None = None) -> str:
        """Keyed hash of an account (or of account and user): the only id stored in clear.

        :raises InvalidName: a name holds a control character (see :mod:`pipeline.subject_names`)
        """
        ref = self._refs.get((account, user))
        if ref is None:
            account_nfc = checked("account", account)
            message = account_nfc if user is None else f"{account_nfc}\0{checked('user', user)}"
            ref = hmac.new(self._index_key, message.encode(), hashlib.sha256).hexdigest()
            self._refs[(account, user)] = ref
        return ref

    def user_ref(self, account: str, user: str | None) -> str | None:
        return None if user is None else self.subject_ref(account, user)

    def named_key(self, key_id: str, purpose: str) -> bytes:
        """A wrapped key kept for another component."""
        row = self._row(key_id)
        if row is None or row.wrapped is None:
            if row is None:
                self._ensure_key(self.engine, self.provider, key_id, purpose, None)
            row = self._row(key_id)
            if row is None or row.wrapped is None:
                raise KeyringError(f"key {key_id!r} was destroyed")
        return self._unwrap(row.master_version, row.wrapped, _aad(key_id, row.key_version))

    def cipher(self, subject_ref: str, user_ref: str | None = None, *, create: bool = True) -> tuple[int, AESGCM]:
        """The current data key of an account (or of one of its users) as ``(key_version, AESGCM)``.

        Checked against the database on every call, so a process that cached a key
        another process destroyed never seals under it: it gets a new key version.
        While the database is unreachable the cached key is used (it cannot be
        destroyed meanwhile), so sealing and spooling go on through an outage.

        :raises UnknownAccountError: no key exists and ``create`` is false
        :raises KeyringError: the key was destroyed and ``create`` is false
        """
        key_id = user_ref or subject_ref
        with self._lock:
            try:
                row = self._row(key_id)
            except StoreUnavailable:  # the database is down: nobody can destroy the key meanwhile
                if key_id in self._ciphers:
                    return self._ciphers[key_id]
                raise
            if row is None or row.wrapped is None:
                self._ciphers.pop(key_id, None)
                if not create:
                    if row is None:
                        raise UnknownAccountError(subject_ref)
                    raise KeyringError(f"data key of subject {key_id[:12]}… was destroyed")
                row = self._new_version(key_id, row, subject_ref if user_ref else None)
            cached = self._ciphers.get(key_id)
            if cached is None or cached[0] != row.key_version:
                key = self._unwrap(row.master_version, row.wrapped, _aad(key_id, row.key_version))
                cached = self._ciphers[key_id] = (row.key_version, AESGCM(key))
            return cached

    def ciphers(self, refs: Iterable[tuple[str, str | None]]) -> dict[tuple[str, str | None], tuple[int, AESGCM]]:
        """:meth:`cipher` for many ``(subject_ref, user_ref)`` at once, checked in one query (a batch's seal)."""
        wanted = set(refs)
        if not wanted:  # nothing to seal (a group commit of replays only): no read
            return {}
        ids = sorted({user_ref or subject_ref for subject_ref, user_ref in wanted})
        live: dict[str, int] | None
        try:
            with reading(self.engine, "reading the keyring") as conn:
                live = {
                    key_id: version
                    for start in range(0, len(ids), 500)
                    for key_id, version in conn.execute(_LIVE_VERSIONS, {"ids": ids[start : start + 500]})
                }
        except StoreUnavailable:
            live = None  # as in cipher(): cached keys go on, others fail there
        found = {}
        for subject_ref, user_ref in wanted:
            cached = self._ciphers.get(user_ref or subject_ref)
            fresh = cached is not None and (live is None or live.get(user_ref or subject_ref) == cached[0])
            found[(subject_ref, user_ref)] = cached if fresh and cached else self.cipher(subject_ref, user_ref)
        return found

    def _new_version(self, key_id: str, destroyed, account_ref: str | None):  # noqa: ANN001, ANN202
        if destroyed is None:
            created = self._ensure_key(self.engine, self.provider, key_id, "subject", account_ref)
        else:  # a subject erased earlier comes back: a new key version, old data stays unreadable
            version = destroyed.key_version + 1
            with transaction(self.engine, "creating a data key") as conn:
                aad = _aad(key_id, version)
                master_version, wrapped = _wrap_current(conn, self.provider, AESGCM.generate_key(256), aad)
                created = (
                    conn.execute(
                        update(keyring_keys)
                        .where(keyring_keys.c.key_id == key_id, keyring_keys.c.wrapped.is_(None))
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
        row = self._row(key_id)
        if created and self.on_key_created is not None:
            self.on_key_created(key_id, row.key_version)
        return row

    def _unwrap(self, master_version: int, wrapped: bytes, aad: bytes) -> bytes:
        """A data key wrapped under ``master_version``, which another process's rotation may have made since
        this one synced: then the provider learns it first (a KMS key of its own; unknown, the URL's key
        was asked, and every key re-wrapped since failed until a restart)."""
        if master_version not in self.provider.versions():
            _sync(self.engine, self.provider)
        return self.provider.unwrap(master_version, wrapped, aad)

    def cipher_for(self, subject_ref: str, user_ref: str | None, key_version: int, *, checked: bool = False) -> AESGCM:
        """The data key that sealed a segment; fails once the key was destroyed.

        Checked against the database on every call, as :meth:`cipher` is: a long-running process
        that cached a key another process destroyed (an erasure by ``enforce``) opens nothing more
        with it. A caller opening many segments of one subject checks once and passes the cipher.

        :param checked: the caller read ``key_version`` as the live version just now, in the query
            that read what it opens: a cached key is used without a read of its own
        """
        key_id = user_ref or subject_ref
        cached = self._ciphers.get(key_id) if checked else None
        if cached is not None and cached[0] == key_version:
            return cached[1]
        version, cipher = self.cipher(subject_ref, user_ref, create=False)
        if version != key_version:
            raise KeyringError(f"data key version {key_version} of subject {key_id[:12]}… was destroyed")
        return cipher

    def data_key(self, subject_ref: str, user_ref: str | None = None) -> tuple[int, bytes]:
        """The live data key as ``(key_version, key bytes)``, for a process that decrypts without the
        keyring (a Dask worker reading the archive for ``report --engine dask``).

        :raises KeyringError: the key was destroyed or never made
        """
        key_id = user_ref or subject_ref
        row = self._row(key_id)
        if row is None or row.wrapped is None:
            raise KeyringError(f"data key of subject {key_id[:12]}… was destroyed or never made")
        return row.key_version, self._unwrap(row.master_version, row.wrapped, _aad(key_id, row.key_version))

    def live_version(self, subject_ref: str, user_ref: str | None = None) -> int | None:
        """The version of the live data key, or None (destroyed or never made); read from the database."""
        row = self._row(user_ref or subject_ref)
        return None if row is None or row.wrapped is None else int(row.key_version)

    def key_issued(self, subject_ref: str, user_ref: str | None = None) -> bool:
        """Whether this very key (a person's, or the account's own: unlike :meth:`key_state`, an account's
        users' keys do not count) was ever made, destroyed since or not."""
        return self._row(user_ref or subject_ref) is not None

    def key_state(self, subject_ref: str, user_ref: str | None = None) -> str:
        """``active`` (a live key), ``destroyed`` (keys, none live) or ``unknown`` (never any key).

        For an account this covers its users' keys too.
        """
        with reading(self.engine, "reading the keyring") as conn:
            live = (
                conn.execute(select(keyring_keys.c.wrapped.is_not(None)).where(_keys_of(subject_ref, user_ref)))
                .scalars()
                .all()
            )
        if not live:
            return "unknown"
        return "active" if any(live) else "destroyed"

    def destroy(
        self, subject_ref: str, user_ref: str | None = None, recorded: Callable[[Connection, int], object] | None = None
    ) -> int:
        """Crypto-shred a user's data key, or every key of an account; returns how many were live.

        Under the key lock: a rotation re-wrapping meanwhile would write the key back (PostgreSQL reads
        committed rows, so its read of the live keys may predate this).

        :param recorded: called with ``(conn, keys destroyed)`` in the destruction's transaction when it destroyed
            any: what it writes (an erasure's audit entry) commits with the destruction or not at all
        """
        which = _keys_of(subject_ref, user_ref)
        with self._lock, transaction(self.engine, "destroying data keys") as conn:
            lock_keys(conn)
            destroyed = conn.execute(
                update(keyring_keys)
                .where(which, keyring_keys.c.wrapped.is_not(None))
                .values(wrapped=None, destroyed_at=utcnow())
                .returning(keyring_keys.c.key_id)
            ).all()
            if destroyed and recorded is not None:
                recorded(conn, len(destroyed))
            for (key_id,) in destroyed:
                self._ciphers.pop(key_id, None)
        return len(destroyed)

    def destroyed_since(self, subject_ref: str, user_ref: str | None, since: datetime) -> int:
        """How many keys of a user, or of an account, were destroyed at or after ``since``."""
        with reading(self.engine, "reading the keyring") as conn:
            return int(
                conn.scalar(
                    select(func.count()).where(
                        _keys_of(subject_ref, user_ref),
                        keyring_keys.c.wrapped.is_(None),
                        keyring_keys.c.destroyed_at >= since,
                    )
                )
                or 0
            )

    def rotate_master(self, recorded: Callable[[Connection, int, int], object] | None = None) -> tuple[int, int]:
        """New master key version; re-wrap every live key. Returns (version, keys re-wrapped).

        Serialised by a database lock. The new version is added to the provider
        beside the old ones before the re-wrap and made current only after the
        re-wrap commits, so a crash at any point leaves every key openable.

        :param recorded: called with ``(conn, version, keys re-wrapped)`` in the re-wrap's transaction, last:
            what it writes (the rotation's audit entry) commits with the rotation or not at all
        """
        now = utcnow()
        with transaction(self.engine, "rotating the master key") as conn:
            lock_keys(conn)
            _sync(conn, self.provider)
            new = self.provider.stage()
            with self._unstaged_on_error(new):  # until the body is done: the commit may then have landed
                # driver-level SQL: at 100,000 keys SQLAlchemy's per-row work would double the time
                rows = conn.exec_driver_sql(
                    "SELECT key_id, key_version, master_version, wrapped FROM keyring_keys WHERE wrapped IS NOT NULL"
                ).fetchall()
                blobs = self.provider.rewrap([(m, bytes(w), _aad(k, v)) for k, v, m, w in rows], new)
                rewrapped = [(new, blob, row[0]) for row, blob in zip(rows, blobs, strict=True)]
                mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
                statement = (  # a key destroyed since the read stays destroyed (destroy takes the lock as well)
                    f"UPDATE keyring_keys SET master_version = {mark}, wrapped = {mark} "
                    f"WHERE key_id = {mark} AND wrapped IS NOT NULL"
                )
                for start in range(0, len(rewrapped), 5000):
                    conn.exec_driver_sql(statement, rewrapped[start : start + 5000])
                conn.execute(
                    update(master_keys)
                    .where(master_keys.c.superseded_at.is_(None), master_keys.c.version != new)
                    .values(superseded_at=now)
                )
                conn.execute(
                    insert_ignoring_duplicates(self.engine, master_keys).values(
                        version=new, key_ref=self.provider.key_ref(new), created_at=now
                    )
                )
                if recorded is not None:
                    recorded(conn, new, len(rewrapped))
        with transaction(self.engine, "activating the new master key") as conn:
            lock_keys(conn)  # a rotation that committed after this one activates its own, newer version
            if conn.scalar(select(func.max(master_keys.c.version))) == new:
                self.provider.activate(new)
        return new, len(rewrapped)

    @contextlib.contextmanager
    def _unstaged_on_error(self, version: int) -> Iterator[None]:
        """Destroy a staged master version (a KMS key each try makes, billed monthly) when the re-wrap under
        it fails: nothing was wrapped under it. Not once the re-wrap is done: a commit whose answer was
        lost may hold keys wrapped under it."""
        try:
            yield
        except BaseException:
            try:
                self.provider.destroy(version)
            except PipelineError as exc:
                logger.warning("master key version %d, staged for a failed rotation, is left: %s", version, exc)
            raise

    def master_versions(self) -> list[MasterVersion]:
        """Every master key version the keyring has used, oldest first."""
        with transaction(self.engine, "reading master key versions") as conn:
            rows = conn.execute(select(master_keys).order_by(master_keys.c.version)).all()
        return [MasterVersion(r.version, r.created_at, r.superseded_at, r.retired_at) for r in rows]

    def rewrap_leftovers(self) -> int:
        """Re-wrap live keys still under a superseded master version under the current one; returns how many.

        Keys are created under the key lock with the current version, so none
        should be left; a keyring written by an older release may hold some.
        """
        with transaction(self.engine, "re-wrapping data keys") as conn:
            lock_keys(conn)
            _sync(conn, self.provider)
            current = _current_master(conn, self.provider)
            k = keyring_keys.c
            rows = conn.execute(
                select(k.key_id, k.key_version, k.master_version, k.wrapped).where(
                    k.wrapped.is_not(None), k.master_version != current
                )
            ).all()
            blobs = self.provider.rewrap([(m, bytes(w), _aad(k, v)) for k, v, m, w in rows], current)
            for row, blob in zip(rows, blobs, strict=True):
                conn.execute(
                    update(keyring_keys)
                    .where(keyring_keys.c.key_id == row.key_id, keyring_keys.c.wrapped.is_not(None))
                    .values(master_version=current, wrapped=blob)
                )
        return len(rows)

    def retire_masters(
        self,
        after: timedelta,
        now: datetime | None = None,
        recorded: Callable[[Connection, list[int]], object] | None = None,
    ) -> list[int]:
        """Destroy master versions superseded more than ``after`` before ``now`` that wrap no live key.

        What is destroyed opens nothing anywhere: database backups, WAL or dead
        tuples holding keys wrapped under it become unreadable. Returns the versions retired,
        each marked retired at the clock's time (``now`` may be a simulated one).

        :param recorded: called with ``(conn, versions)`` in the retirement's transaction when it retires any
        """
        now = now or utcnow()
        with transaction(self.engine, "retiring master key versions") as conn:
            lock_keys(conn)
            _sync(conn, self.provider)
            due = set(
                conn.scalars(
                    select(master_keys.c.version).where(
                        master_keys.c.retired_at.is_(None),
                        master_keys.c.superseded_at.is_not(None),
                        master_keys.c.superseded_at <= now - after,
                    )
                )
            )
            in_use = set(
                conn.scalars(
                    select(keyring_keys.c.master_version).where(keyring_keys.c.wrapped.is_not(None)).distinct()
                )
            )
            current = {self.provider.current_version(), _current_master(conn, self.provider)}
            retired = sorted(due - in_use - current)
            for version in retired:
                self.provider.destroy(version)
            if retired:
                conn.execute(update(master_keys).where(master_keys.c.version.in_(retired)).values(retired_at=utcnow()))
                if recorded is not None:
                    recorded(conn, retired)
        return retired

    def compact(self) -> None:
        """Drop copies of destroyed keys the database keeps outside its tables (SQLite's WAL).

        A read in progress (``records``, a report, an API stream) keeps the log in use, and with it those
        copies, until it ends: then the next call, which every retention pass makes, drops them. Waiting for
        reads here would let any reader, another tenant's stream among them, hold erasures back.
        """
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as conn:
            busy, _frames, _copied = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        if busy:
            logger.warning(
                "a read in progress keeps SQLite's write-ahead log in use: retried by the next retention pass"
            )


def _sync(db: Engine | Connection, provider: KeyProvider) -> None:
    """Bring the provider up to date: its own state (a key file) or the versions recorded in the database."""
    query = select(master_keys).order_by(master_keys.c.version)
    if isinstance(db, Engine):
        with transaction(db, "reading master key versions") as conn:
            rows = conn.execute(query).all()
    else:
        rows = db.execute(query).all()
    current = [r.version for r in rows if r.superseded_at is None and r.retired_at is None]
    if current:
        live = {r.version: r.key_ref for r in rows if r.retired_at is None}
        provider.adopt(live, max(current), first=rows[0].key_ref)
    provider.refresh()


def _current_master(conn: Connection, provider: KeyProvider) -> int:
    """The version new keys are wrapped under: the newest the database records as current.

    That includes a rotation's version committed but not yet activated in the
    provider, so a key made in between is never wrapped under the version it supersedes.
    """
    recorded = conn.scalar(
        select(func.max(master_keys.c.version)).where(
            master_keys.c.superseded_at.is_(None), master_keys.c.retired_at.is_(None)
        )
    )
    return int(recorded) if recorded is not None else provider.current_version()


def _wrap_current(conn: Connection, provider: KeyProvider, key: bytes, aad: bytes) -> tuple[int, bytes]:
    """Wrap a new data key under the current master version, holding the key lock until ``conn`` commits.

    A rotation re-wraps what it reads under the same lock, so it either sees this
    key or runs after it commits and has already made its version current here.
    """
    lock_keys(conn)
    _sync(conn, provider)
    return provider.wrap(key, aad, _current_master(conn, provider))


def _keys_of(subject_ref: str, user_ref: str | None) -> ColumnElement[bool]:
    """A user's key, or an account's key and its users' keys."""
    if user_ref is not None:
        return keyring_keys.c.key_id == user_ref
    return or_(keyring_keys.c.key_id == subject_ref, keyring_keys.c.account_ref == subject_ref)
