"""The metadata database: engine factory and the tables every component shares.

One SQL database (SQLite by default, PostgreSQL in production) holds the
long-term store's segments, the keyring's wrapped keys, deletion requests, the
audit trail, service leases and APScheduler's job store. Tables are defined
with SQLAlchemy Core so that the same code runs on both dialects.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
    type_coerce,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.sql.elements import Label
from sqlalchemy.types import NullType, TypeDecorator

from pipeline.errors import ConfigError, StoreError, StoreUnavailable
from pipeline.fsmodes import open_private, private_folder
from pipeline.redact import mask_url

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = [
    "SCHEMA_HEAD",
    "UTCDateTime",
    "alembic_config",
    "create_schema",
    "engine_for",
    "insert_ignoring_duplicates",
    "mapped_errors",
    "metadata",
    "reading",
    "sqlite_file",
    "transaction",
]

#: the newest migration in ``pipeline/migrations/versions`` (a test checks it is alembic's head)
SCHEMA_HEAD = "d9e3b7a1c604"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_stored(column: Column[Any]) -> Label[Any]:
    """``column`` as the database holds it, unconverted: SQLite keeps any type in any column, and a
    value altered into another type failed the whole read in the column type's conversion, not its
    one row. Convert each row's with :func:`stored_reader`."""
    return type_coerce(column, NullType()).label(column.name)


def stored_reader(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """The conversion ``column``'s type applies on this database, to call per row on :func:`as_stored`'s
    value (it raises ``ValueError``, ``TypeError`` or ``OverflowError`` on an altered one)."""
    convert = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return convert or (lambda value: value)


metadata = MetaData()
#: created and owned by APScheduler's SQLAlchemyJobStore, not by our migrations
APSCHEDULER_TABLE = "apscheduler_jobs"

segments = Table(
    "segments",
    metadata,
    Column("segment_id", String(64), primary_key=True),
    Column("subject_ref", String(64), nullable=False),
    Column("user_ref", String(64)),
    Column("data_type", String(16), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("min_observed_at", UTCDateTime, nullable=False),
    Column("max_observed_at", UTCDateTime, nullable=False),
    Column("n_records", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Index("ix_segments_subject", "subject_ref", "user_ref"),
    Index("ix_segments_type_age", "data_type", "max_observed_at"),
)

keyring_keys = Table(
    "keyring_keys",
    metadata,
    Column("key_id", String(80), primary_key=True),  # "index", "deletion-reasons", a subject_ref or a user_ref
    Column("purpose", String(16), nullable=False),
    Column("account_ref", String(64)),  # a user's key: the account it belongs to (erased with it)
    Column("key_version", Integer, nullable=False),
    Column("master_version", Integer, nullable=False),
    Column("wrapped", LargeBinary),  # NULL once destroyed (crypto-shredding)
    Column("created_at", UTCDateTime, nullable=False),
    Column("destroyed_at", UTCDateTime),
    Index("ix_keyring_account", "account_ref"),
    Index("ix_keyring_master", "master_version"),
)

master_keys = Table(
    "master_keys",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("key_ref", String(2048)),  # where the provider keeps this version (a KMS key ARN); NULL in a key file
    Column("created_at", UTCDateTime, nullable=False),
    Column("superseded_at", UTCDateTime),  # a newer version became current: the backup window starts
    Column("retired_at", UTCDateTime),  # destroyed in the key provider: wraps under it open nothing
)

tombstones = Table(
    "tombstones",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("subject_ref", String(64), nullable=False),
    Column("user_ref", String(64)),  # NULL: the whole account
    Column("erased_at", UTCDateTime, nullable=False),  # records observed before this are dropped on ingest
    Column("suppress", Boolean, nullable=False, default=False),  # later records too, until lifted
    Column("lifted_at", UTCDateTime),
    Index("ix_tombstones_subject", "subject_ref"),
)

deletion_requests = Table(
    "deletion_requests",
    metadata,
    Column("request_id", String(36), primary_key=True),
    Column("subject_ref", String(64), nullable=False),
    Column("user_ref", String(64)),
    Column("reason", Text),
    Column("state", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("deadline", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),
    Column("receipt", Text, nullable=False, default="{}"),  # JSON: store -> counts, when
    Column("error", Text),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject_ref", String(64)),
    Column("details", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("entry_hash", String(64), nullable=False),
    Column("signature", String(256), nullable=False),  # Ed25519: 128 hex; ECDSA P-256 (KMS) DER: up to 144
    Index("ix_audit_action", "action", "seq"),  # last policy.loaded / retention.pass
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime),  # set once the work is done: never granted again
)

cluster_credentials = Table(
    "cluster_credentials",
    metadata,
    Column("cluster_id", String(128), primary_key=True),
    Column("subject_ref", String(64), nullable=False),  # the account whose data key seals them
    Column("key_version", Integer, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("sealed", LargeBinary, nullable=False),  # AES-GCM: CA and role certificates, private keys
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_cluster_credentials_subject", "subject_ref"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("token_id", String(16), primary_key=True),
    Column("token_sha256", String(64), nullable=False, unique=True),  # the token itself is never stored
    Column("kind", String(16), nullable=False),
    Column("subject_ref", String(64)),
    Column("user_ref", String(64)),
    Column("cluster_id", String(64)),
    Column("names", Text),  # account and user, sealed under their data key (pipeline.server.names)
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime),
    Column("revoked_at", UTCDateTime),
)

clusters = Table(
    "clusters",
    metadata,
    Column("cluster_id", String(64), primary_key=True),
    Column("subject_ref", String(64), nullable=False),
    Column("token_id", String(16), nullable=False),
    Column("names", Text, nullable=False),  # account, name and image, sealed under the account's data key
    Column("created_at", UTCDateTime, nullable=False),
    Column("closed_at", UTCDateTime, nullable=True),  # its plugin (or its owner) closed it
    Column("last_contact_at", UTCDateTime, nullable=True),  # its last batch (snapshots are the heartbeat)
    Column("lost_at", UTCDateTime, nullable=True),  # nothing heard for pipeline.server.cluster-lost-after
    Column("running", Text, nullable=True),  # its running jobs as last reported, sealed under its owner's key
    Column("user_ref", String(64), nullable=True),  # its owner (none: account-level, or registered before it was kept)
    Column("owner_names", Text, nullable=True),  # its name and image, sealed under its owner's key
    Index("ix_clusters_subject", "subject_ref"),
)

lost_jobs = Table(
    "lost_jobs",
    metadata,
    # a job the control plane recorded lost (its cluster ended, or a newer snapshot dropped it): its end
    # record, delivered late by a spool replayed, is not stored beside it (the id hashes cluster and job)
    Column("cluster_id", String(64), primary_key=True),
    Column("record_id", String(32), primary_key=True),
)

ended_jobs = Table(
    "ended_jobs",
    metadata,
    # a job of an open cluster whose end a batch stored: never recorded lost after, though a copy of an older
    # snapshot, admitted on another replica before the end committed, lists it running again (the id is
    # its lost record's); a cluster's rows go once its end has recorded its running jobs
    Column("cluster_id", String(64), primary_key=True),
    Column("record_id", String(32), primary_key=True),
)

erasure_receipts = Table(
    "erasure_receipts",
    metadata,
    Column("token_sha256", String(64), primary_key=True),  # the receipt token itself is never stored
    Column("request_id", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

env_visibility = Table(
    "env_visibility",
    metadata,
    Column("subject_ref", String(64), primary_key=True),
    Column("env_id", String(64), primary_key=True),
    Column("visibility", String(8), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

ingested_batches = Table(
    "ingested_batches",
    metadata,
    # scoped by subject: another account reusing a batch id can neither skip nor shadow this one
    Column("subject_ref", String(64), primary_key=True),
    Column("batch_id", String(128), primary_key=True),
    Column("records", Integer, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
)

_engines: OrderedDict[str, tuple[Engine, tuple[int, int] | None]] = OrderedDict()  # url -> engine, file then
#: engines whose idle connections stay open: a process that opens many databases (a test suite, a
#: notebook making homes) would otherwise keep every one's pooled connections, and files, open
_KEEP_OPEN = 4
_engines_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA secure_delete=ON")  # deleted rows (shredded keys, erased segments) are zeroed
    cursor.close()


def engine_for(url: str) -> Engine:
    """One pooled engine per database URL and process; only the newest few keep idle connections open.

    A SQLite file removed or replaced since its engine was made (a home folder
    deleted between two clusters) gets a new engine: the old one's pooled
    connections would go on writing to the removed file.
    """
    with _engines_lock:
        cached = _engines.get(url)
        if cached is not None:
            engine, file = cached
            if _sqlite_file(engine) == file:
                _engines.move_to_end(url)
                return engine
            engine.dispose()
        engine = _create_engine(url)
        _engines[url] = engine, _sqlite_file(engine)
        _engines.move_to_end(url)
        if len(_engines) > _KEEP_OPEN:  # the one now just past the newest: closing its idle connections
            next(islice(reversed(_engines.values()), _KEEP_OPEN, None))[0].dispose()  # leaves it usable
        return engine


def _sqlite_file(engine: Engine) -> tuple[int, int] | None:
    """(device, inode) of the SQLite file now at the engine's path; None for other databases.

    While the engine's pool holds that file open its inode number is not reused, so
    another number (or none) means the file was removed or replaced.
    """
    database = _sqlite_path(engine.url)
    if database is None:
        return None
    try:
        stat = os.stat(database)
    except OSError:
        return (-1, -1)
    return stat.st_dev, stat.st_ino


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; None for another database, SQLite in memory, or a URL that does not parse
    (named where its engine is made)."""
    try:
        return _sqlite_path(make_url(url))
    except (ArgumentError, ValueError):
        return None


def _sqlite_path(url: URL) -> Path | None:
    database = url.database
    return Path(database) if url.get_backend_name() == "sqlite" and database and database != ":memory:" else None


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
        raise ConfigError(f"not a database URL: {mask_url(url)!r}") from exc
    # as many connections as SQLAlchemy's default allows at once (5 + 10 overflow), all kept: an
    # overflow connection is closed when returned, and under load ingest opened hundreds a minute
    # (each a backend process on PostgreSQL; on SQLite a file opened and four pragmas run)
    kwargs: dict[str, Any] = {"pool_size": 15, "max_overflow": 0}
    if parsed.get_backend_name() == "sqlite":  # a file: no connection to go stale, so no ping per checkout
        if (database := _sqlite_path(parsed)) is not None:
            _create_private_file(database)
        else:  # in memory: SQLAlchemy's SingletonThreadPool, which takes no sizes
            kwargs = {}
        kwargs["connect_args"] = {"timeout": 5}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise ConfigError(f"no driver for {parsed.drivername!r}: install dask-metadata-pipeline[postgres]") from exc
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        event.listen(engine, "checkin", _note_idle)
        event.listen(engine, "checkout", _ping_if_idle(engine.dialect))
    return engine


#: a pooled PostgreSQL connection idle this long is pinged before it is used again
_PING_AFTER_IDLE = 1.0


def _note_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dialect: Dialect) -> Callable[[Any, Any, Any], None]:
    """A checkout listener that replaces a dead pooled connection (a server restarted, a link
    dropped) before it is used.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: a round trip more for every
    read, a fifth of a saturated ``serve``'s CPU. A connection in steady use was alive a
    moment ago, so only one idle for :data:`_PING_AFTER_IDLE` is pinged; one dropped
    while busy fails its statement (503, the caller retries) and SQLAlchemy then renews
    every connection of the pool.
    """

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < _PING_AFTER_IDLE:
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error:  # what the driver does not call a disconnect (a reset link)
            alive = False
        if not alive:
            raise DisconnectionError("a pooled connection died while idle")  # the pool connects anew

    return checkout


def _create_private_file(path: Path) -> None:
    """Create the SQLite file owner-only before SQLite does: its -wal and -shm files copy its mode."""
    private_folder(path.parent)
    with suppress(FileExistsError):
        os.close(open_private(path))


def insert_ignoring_duplicates(engine: Engine, table: Table) -> Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the engine's dialect (idempotent writes)."""
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects import postgresql  # here: importing it costs every SQLite process 30 ms

    return postgresql.insert(table).on_conflict_do_nothing()


def include_in_migrations(name: str | None, type_: str, parent_names: Any) -> bool:
    """Leave APScheduler's own job table to APScheduler."""
    return not (type_ == "table" and name == APSCHEDULER_TABLE)


def alembic_config(connection: Connection | None) -> Config:
    """Alembic configuration for the migrations shipped in ``pipeline/migrations``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.attributes["connection"] = connection
    return config


def create_schema(engine: Engine) -> None:
    """Upgrade the schema to the newest migration (idempotent; safe with concurrent callers).

    An up-to-date schema is recognised with plain SQL: alembic (which loads a
    template engine and a syntax highlighter, 0.1 s) is imported only to migrate.
    """
    if _revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with _one_upgrader(engine), engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        else:  # SQLite's DDL is transactional, but its driver begins transactions only for DML: a process
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # killed mid-migration left half a schema, opened by none
        if MigrationContext.configure(conn).get_current_revision() != SCHEMA_HEAD:
            command.upgrade(alembic_config(conn), "head")


def _revision(engine: Engine) -> str | None:
    """The migration the database is at; None for a new database."""
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            return None  # no version table yet


@contextmanager
def _one_upgrader(engine: Engine) -> Iterator[None]:
    """SQLite runs DDL outside transactions: serialise upgrades with a lock file beside the database."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with os.fdopen(open_private(f"{database}.schema-lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def transaction(engine: Engine, what: str) -> Iterator[Connection]:
    """``engine.begin()`` with database failures mapped to pipeline errors naming ``what``."""
    with mapped_errors(what), engine.begin() as conn:
        yield conn


@contextmanager
def reading(engine: Engine, what: str) -> Iterator[Connection]:
    """A connection outside any transaction, for reads each complete in itself (one statement, or
    chunks of one lookup): no BEGIN and COMMIT around them, so on PostgreSQL one round trip a read,
    not three (the hot reads of ingest: a token, a cluster, batch ids, tombstones, key versions).
    SQLite's driver begins no transaction for a read anyway, and switching its isolation level
    costs a statement more. Failures are mapped as :func:`transaction` maps them."""
    with mapped_errors(what), engine.connect() as conn:
        yield conn if engine.dialect.name == "sqlite" else conn.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """SQLAlchemy's errors as one line naming ``what`` failed: unavailable (a retry may do), else refused."""
    try:
        yield
    except SQLAlchemyError as exc:
        reason = driver_reason(exc)
        if isinstance(exc, OperationalError | PoolTimeout):  # down, or every pooled connection busy: retry
            raise StoreUnavailable(f"{what}: metadata database unavailable: {reason}") from exc
        raise StoreError(f"{what}: metadata database refused: {reason}") from exc


def driver_reason(exc: SQLAlchemyError) -> str:
    """The first line of what the database driver said, else the error's class."""
    return str(getattr(exc, "orig", None) or exc.__class__.__name__).splitlines()[0]
