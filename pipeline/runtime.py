"""The assembled pipeline: settings, policy, keyring and stores, opened together.

Every entry point (embedded delivery, control plane, command line, retention
service, reports) opens one :class:`Pipeline` rather than wiring the parts
itself. :meth:`Pipeline.ingest` is the one path by which records enter the
stores, whether the batch arrived in-process or over HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, Engine, Executable, bindparam, select

from pipeline import bounds, columns, tombstones
from pipeline.audit import AuditEntry, AuditLog
from pipeline.config import Settings
from pipeline.db import ingested_batches, insert_ignoring_duplicates, reading, sqlite_file, transaction
from pipeline.environment import environment_id
from pipeline.errors import (
    BatchRefused,
    ConfigError,
    ForbiddenBatch,
    IntakeError,
    InvalidName,
    KeyringError,
    PipelineError,
    StoreError,
    StoreUnavailable,
    UnknownAccountError,
)
from pipeline.fsmodes import check_private_folder
from pipeline.group_commit import GroupCommit
from pipeline.ingest_tally import IngestTally
from pipeline.intake import OpenedBatch, intake_private_key, open_batch, public_key_text
from pipeline.keys import KEY_STATE_READ_EVERY, Keyring, open_key_provider
from pipeline.principals import Principal
from pipeline.records import records_by_kind, rows_from_table, table_from_rows, unreadable_rows, utcnow
from pipeline.redact import mask_url
from pipeline.retention.policy import Policy, load_policy
from pipeline.segments import Segment, open_segment, seal
from pipeline.signing import load_verify_key
from pipeline.stores import Store, is_sql_url, open_store
from pipeline.stores.sql import SQLStore
from pipeline.witness import HighWater

__all__ = [
    "Admitted",
    "Guard",
    "IngestResult",
    "Locking",
    "Pipeline",
    "PreparedBatch",
    "Unreadable",
    "seal_batches",
    "seal_records",
    "seal_tables",
]


@dataclass(frozen=True)
class Unreadable:
    """A segment that should decrypt and does not (altered, or sealed by another keyring), or one record
    of a segment that cannot be read (a time out of range, stored before ingest bounded times)."""

    store: str
    segment_id: str
    reason: str
    record_id: str | None = None  # None: the whole segment

    def __str__(self) -> str:
        if self.record_id is not None:
            return f"skipped record {self.record_id} in segment {self.segment_id} in {self.store}: {self.reason}"
        return f"unreadable segment {self.segment_id} in {self.store}: {self.reason}"


def seal_records(
    keyring: Keyring, records: Iterable[Mapping[str, Any]], *, segment_seed: str | None = None
) -> list[Segment]:
    """Seal records as :func:`seal_tables` does, from dicts (one table per kind)."""
    return seal_tables(keyring, _tables_by_kind(records), segment_seed=segment_seed)


def _tables_by_kind(records: Iterable[Mapping[str, Any]]) -> list[pa.Table]:
    """Records as one Arrow table per kind, kinds in order of first appearance.

    :raises TypeError, ValueError: a field of a record does not fit its kind's schema, or a record has no known kind
    """
    return [table_from_rows(kind_name, rows) for kind_name, rows in records_by_kind(records).items()]


def seal_tables(keyring: Keyring, tables: Iterable[pa.Table], *, segment_seed: str | None = None) -> list[Segment]:
    """Split each kind's table by account, user and (UTC) day, and seal each part as one segment.

    With ``segment_seed`` (a batch's scoped id) segment ids derive from it and the
    part, so sealing the same batch again yields the same ids and a retry after a
    partial write rewrites nothing twice; without it ids are random.
    """
    return seal_batches(keyring, [(segment_seed, tables)])[0]


def seal_batches(keyring: Keyring, batches: Sequence[tuple[str | None, Iterable[pa.Table]]]) -> list[list[Segment]]:
    """:func:`seal_tables` for each ``(segment_seed, tables)``, every key they use checked in one query."""
    parts = []
    for n, (seed, tables) in enumerate(batches):
        for table in tables:
            kind_name = table.column("kind")[0].as_py()
            for account, user, day, part in _parts_by_subject_and_day(table):
                refs = keyring.subject_ref(account), keyring.user_ref(account, user)
                parts.append((n, seed, refs, kind_name, day, part))
    ciphers = keyring.ciphers(refs for _n, _seed, refs, _kind, _day, _part in parts)  # one check of every key
    sealed: list[list[Segment]] = [[] for _ in batches]
    for n, seed, (subject_ref, user_ref), kind_name, day, part in parts:
        segment_id = None
        if seed is not None:
            name = f"{seed}|{subject_ref}|{user_ref or ''}|{kind_name}|{day.isoformat()}"
            segment_id = hashlib.sha256(name.encode()).hexdigest()[:32]
        key = ciphers[(subject_ref, user_ref)]
        sealed[n].append(seal(keyring, subject_ref, user_ref, part, segment_id=segment_id, key=key))
    return sealed


def _parts_by_subject_and_day(table: pa.Table) -> list[tuple[str, str | None, date, pa.Table]]:
    """The table's rows by (account, user, UTC day), groups in order of first appearance, rows in order.

    In Arrow kernels, no row turned into Python: each key column is dictionary-encoded, and
    only when more than one varies are their codes combined and the table sorted once (stably)
    into slices. A one-cluster batch has one account, user and day: three encodings, less than
    a loop over its 50 rows; a 10,000-row batch of 40 subjects costs a tenth of the loop.
    Python numbers never meet a kernel: converting one imports pandas (see :mod:`pipeline.columns`).
    """
    keys = [
        table.column("account").combine_chunks(),
        table.column("user").combine_chunks(),
        pc.cast(table.column("observed_at").combine_chunks(), pa.date32()),
    ]
    groups: pa.Array | None = None
    for values in keys:
        encoded = pc.dictionary_encode(values, null_encoding="encode")
        if len(encoded.dictionary) == 1:
            continue
        codes = encoded.indices.cast(pa.int64())
        if groups is not None:  # a code per pair of the groups so far and this key, numbered again
            width = columns.column(pa.int64(), [len(encoded.dictionary)])[0]
            codes = pc.dictionary_encode(pc.add(pc.multiply(groups, width), codes)).indices.cast(pa.int64())
        groups = codes
    if groups is None:
        account, user, day = (values[0].as_py() for values in keys)
        return [(account, user, day, table)]
    order = pc.sort_indices(groups)  # stable: a group's rows keep their order
    ordered = table.take(order)
    firsts = pa.Table.from_arrays(keys, names=["account", "user", "day"]).take(order)
    parts, start = [], 0
    for count in pc.value_counts(groups).field("counts").to_pylist():  # in order of first appearance
        first = firsts.slice(start, 1).to_pylist()[0]
        parts.append((first["account"], first["user"], first["day"], ordered.slice(start, count)))
        start += count
    return parts


def _without_rows(
    store: str, segment: Segment, table: pa.Table, bad: dict[int, str], unreadable: list[Unreadable] | None
) -> pa.Table:
    """``table`` less the rows in ``bad``, each named in ``unreadable``.

    :raises StoreError: naming the first, when there is no ``unreadable`` list
    """
    record_ids = table.column("record_id").to_pylist()
    for row, reason in sorted(bad.items()):
        problem = Unreadable(store, segment.segment_id, reason, record_id=record_ids[row])
        if unreadable is None:
            raise StoreError(str(problem))
        unreadable.append(problem)
    return table.filter([row not in bad for row in range(table.num_rows)])


def _foreign_subjects(table: pa.Table, principal: Principal) -> list[tuple[str, str | None]]:
    """The (account, user) of each row that is not the principal's own: another account,
    another user (a record without a user is the cluster's own), or another cluster.

    Plain Python, like the grouping above; comparing with a Python value through
    pyarrow would import pandas (see :mod:`pipeline.columns`). A cluster's own batch, the usual
    case, is told from its buffers first (a Python string per row is most of admission's time).
    """
    if _only_own(table, principal):
        return []
    accounts, users = table.column("account").to_pylist(), table.column("user").to_pylist()
    clusters = table.column("cluster_id").to_pylist() if principal.cluster_id is not None else [None] * len(accounts)
    return [
        (account, user)
        for account, user, cluster in zip(accounts, users, clusters, strict=True)
        if account != principal.account
        or (not principal.embedded and user is not None and user != principal.user)
        or (principal.cluster_id is not None and cluster != principal.cluster_id)
    ]


def _only_own(table: pa.Table, principal: Principal) -> bool:
    """Whether every row names the principal's account, its user (or, embedded or userless, any or none) and
    its cluster; False says only that some row may not."""
    users = table.column("user")
    return (
        principal.account is not None
        and bounds.holds_only(table.column("account"), principal.account)
        and (
            principal.embedded
            or users.null_count == len(users)
            or (principal.user is not None and bounds.holds_only(users, principal.user))
        )
        and (principal.cluster_id is None or bounds.holds_only(table.column("cluster_id"), principal.cluster_id))
    )


#: software environments turned into Python objects at once to compute their ids (150 packages each: 4 MB)
_ENVIRONMENTS_AT_ONCE = 256


def _stamped(table: pa.Table, principal: Principal, subject_ref: str) -> pa.Table:
    """The table with what the control plane decides, not the cluster: its owner as every record's
    user (a cluster bound to a user) and each environment's id, computed from its content within the account.

    Run after :meth:`Pipeline._scope`, so a user a record names is already the owner: only records
    naming none (a plugin configured without ``pipeline.user``) need the owner written in.
    """
    owner = principal.user if principal.kind == "cluster" and not principal.embedded else None
    if owner is not None and table.column("user").null_count:
        users = columns.column(pa.string(), [owner] * table.num_rows)  # pa.array would import pandas
        table = table.set_column(table.schema.get_field_index("user"), table.schema.field("user"), users)
    if table.column("kind")[0].as_py() == "software_env":
        content = table.select(["kind", "image", "python_version", "packages"])
        ids = [  # a slice's rows at a time: a batch's as Python objects took 20 times its bytes
            environment_id(row["image"], row["python_version"], row["packages"], account_ref=subject_ref)
            for start in range(0, table.num_rows, _ENVIRONMENTS_AT_ONCE)
            for row in rows_from_table(content.slice(start, _ENVIRONMENTS_AT_ONCE))
        ]
        field = table.schema.field("env_id")
        table = table.set_column(table.schema.get_field_index("env_id"), field, columns.column(field.type, ids))
    return table


@dataclass(frozen=True)
class IngestResult:
    """What :meth:`Pipeline.ingest` did: the batch's record count; ``duplicate`` when it was taken before."""

    records: int
    duplicate: bool


#: a statement for a group commit's transaction, with the key of the row it locks and its parameters
#: (the statement built once, its values given per batch: building one costs more than running it)
Locking = tuple[str, Executable, dict[str, Any]]
#: a check for a group commit's transaction, run after its locks: a statement selecting which of the keys
#: given as its ``ids`` no longer stand as admission saw them, and the batch's keys; a batch with a key
#: selected is admitted again (another process changed what its admission read)
Guard = tuple[Executable, tuple[Any, ...]]
#: what admission makes of a batch: the batch to write (less records it does not take), statements
#: for the commit that writes it, and a guard for that commit
Admitted = tuple[OpenedBatch, tuple[Locking, ...], Guard | None]


@dataclass(frozen=True, eq=False)
class PreparedBatch:
    """A batch opened, checked, scoped and stamped by :meth:`Pipeline.prepare_ingest`, ready to commit."""

    subject_ref: str
    batch_id: str
    records: int
    tables: list[pa.Table]
    #: run in the commit's transaction, taken or not (what ``admit`` returned: a cluster's contact)
    statements: tuple[Locking, ...] = ()
    #: checked in the commit's transaction after its locks (what ``admit`` returned: a job's end)
    guards: tuple[Guard, ...] = ()
    #: the same batch admitted again, when a guard fails (``None``: no admission)
    readmit: Callable[[], PreparedBatch] | None = None
    #: the cluster that sent it, whose drops are audited up to an hourly share (``None``: an operator's)
    cluster_id: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """What makes the batch itself: taken at most once."""
        return self.subject_ref, self.batch_id


def _mark_ingested(conn: Connection, engine: Engine, batches: Sequence[PreparedBatch]) -> set[int]:
    """Record the batch ids in ``conn``'s transaction; the ``id()`` of each batch that was new.

    Rows go in key order, so two processes committing overlapping groups wait for one
    another rather than deadlock; a row another transaction holds is waited for, then skipped.
    """
    received_at = utcnow()
    rows = sorted(
        {(b.subject_ref, b.batch_id): b.records for b in batches}.items()  # a replay within the group: once
    )
    inserted = conn.execute(
        insert_ignoring_duplicates(engine, ingested_batches).returning(
            ingested_batches.c.subject_ref, ingested_batches.c.batch_id
        ),
        [{"subject_ref": s, "batch_id": b, "records": n, "received_at": received_at} for (s, b), n in rows],
    )
    fresh = {(row.subject_ref, row.batch_id) for row in inserted}
    new = set()
    for batch in batches:
        key = (batch.subject_ref, batch.batch_id)
        if key in fresh:
            fresh.discard(key)  # the first of a replay within the group is new, the others duplicates
            new.add(id(batch))
    return new


def _stale_admissions(conn: Connection, batches: Sequence[PreparedBatch]) -> set[int]:
    """The ``id()`` of each batch a guard of its admission fails, checked in ``conn``'s transaction after
    its locks; one query for each guard statement of the group and 500 keys (none without guards: most
    groups), as a group may hold 256 batches of 5,000 job ends and PostgreSQL takes 65,535 parameters."""
    keys: dict[int, tuple[Executable, set[Any]]] = {}
    for batch in batches:
        for statement, guarded in batch.guards:
            keys.setdefault(id(statement), (statement, set()))[1].update(guarded)
    failed: set[Any] = set()
    for statement, wanted in keys.values():
        listed = sorted(wanted)
        for start in range(0, len(listed), 500):
            failed.update(tuple(row) for row in conn.execute(statement, {"ids": listed[start : start + 500]}))
    return {id(batch) for batch in batches for _statement, guarded in batch.guards if failed.intersection(guarded)}


class _StaleAdmission(Exception):
    """What admission read of some batches changed before their commit: admit them again."""

    def __init__(self, batches: set[int]) -> None:
        super().__init__(f"{len(batches)} batches to admit again")
        self.batches = batches


class _TombstonesMoved(Exception):
    """A request was filed (or moved on) for a subject of the group after its tombstones were read: drop
    and seal the group again."""


def _readmitted(batch: PreparedBatch) -> PreparedBatch | Exception:
    """``batch`` admitted again; the error of that admission is the batch's answer."""
    assert batch.readmit is not None  # guards come from admission
    try:
        return batch.readmit()
    except PipelineError as exc:
        return exc


def _policy_of(settings: Settings) -> Policy:
    """The configured policy; an archive is a copy of the long-term store (same routing, retention and erasure).

    :raises PolicyError: naming the file, the dotted field and the reason
    """
    policy = load_policy(settings.policy_path)
    return policy.with_copy("archive", of="long_term") if settings.archive_url else policy


@contextlib.contextmanager
def _closed_after(iterator: Iterator[Any]) -> Iterator[None]:
    """Close ``iterator`` when the block ends, if it can be (a store's scan: a generator holding a
    database connection), rather than whenever the garbage collector finds it."""
    try:
        yield
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


#: which of some batch ids are taken: built once (building an IN clause of literal values costs
#: more than the query), its lists given at each execution
_TAKEN = select(ingested_batches.c.subject_ref, ingested_batches.c.batch_id).where(
    ingested_batches.c.subject_ref.in_(bindparam("subjects", expanding=True)),
    ingested_batches.c.batch_id.in_(bindparam("ids", expanding=True)),
)


@contextlib.contextmanager
def _kept_for_retry(store: str) -> Iterator[None]:
    """A store's refusal becomes :class:`StoreUnavailable`: the batches are valid, so the sender keeps
    them for a retry rather than lose them."""
    try:
        yield
    except StoreUnavailable:
        raise
    except StoreError as exc:
        raise StoreUnavailable(f"{store}: {exc}") from exc


@dataclass
class Pipeline:
    """Open handles on everything the configuration names."""

    settings: Settings
    policy: Policy
    keyring: Keyring
    stores: dict[str, Store]
    _commits: GroupCommit[PreparedBatch, IngestResult] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._commits = GroupCommit(self._commit_group)  # one per pipeline: its ingests share commits

    @classmethod
    def open(cls, settings: Settings | None = None, *, create: bool = False) -> Pipeline:
        """Open (with ``create``: first make) the keyring, schema and stores.

        :raises ConfigError, PolicyError, KeyringError, StoreUnavailable:
        """
        settings = settings or Settings.from_config()
        check_private_folder(settings.home)
        policy = _policy_of(settings)
        if create:
            settings.ensure_home()
        # it is also the metadata database (keys, audit, requests): checked first, before another
        # backend asks for a keyring or credentials and names something else as the problem
        if not is_sql_url(settings.long_term_url):
            raise ConfigError(
                f"pipeline.long-term.url must be a SQL database (sqlite:/// or postgresql+psycopg://), "
                f"got {mask_url(settings.long_term_url)!r}"
            )
        if not create and (database := sqlite_file(settings.long_term_url)) is not None and not database.exists():
            # opening it would make it, schema and all, before a missing key named what is wrong
            raise ConfigError(f"metadata database {database} does not exist; run metadata-pipeline init")
        stores = {
            name: open_store(url, setting=f"pipeline.{name.replace('_', '-')}.url")
            for name, url in settings.store_urls().items()
        }
        long_term = stores["long_term"]
        assert isinstance(long_term, SQLStore)  # as its scheme says
        provider = open_key_provider(settings.keys_url, create=create, keyring_made=Keyring.made(long_term.engine))
        keyring = Keyring.open(long_term.engine, provider, create=create)
        if settings.archive_url:
            stores["archive"] = open_store(settings.archive_url, setting="pipeline.archive.url", keyring=keyring)
        pipeline = cls(settings, policy, keyring, stores)
        keyring.on_key_created = pipeline._audit_key_created
        pipeline.audit.note_policy(policy.path, policy.sha256)
        return pipeline

    def reload_policy(self) -> None:
        """Read the policy file again, for a process that runs for long (``serve``: each retention pass and
        each erasure filed): an edited policy is in force from then on, and noted in the audit trail.

        :raises PolicyError: the file is invalid now; the policy read before stays in force
        """
        policy = _policy_of(self.settings)
        if policy.sha256 != self.policy.sha256:
            self.policy = policy
            self.audit.note_policy(policy.path, policy.sha256)

    def rotate_master(
        self, *, then: Callable[[Connection, AuditEntry], object] | None = None, **details: Any
    ) -> tuple[int, int, AuditEntry]:
        """:meth:`Keyring.rotate_master`, its ``key.rotated`` entry (with ``details``) committed in the
        rotation's transaction: no rotation goes unrecorded, whenever the process dies.

        :param then: called with the transaction and the entry, last: what it writes commits with them
        :returns: the new version, the keys re-wrapped and the entry, which says when the versions
            before it retire at the earliest (``old_versions_retire_at``)
        """
        audit = self.audit  # opened before the rotation's transaction: SQLite has one writer
        entries: list[AuditEntry] = []

        def recorded(conn: Connection, version: int, rewrapped: int) -> None:
            retire_at = utcnow() + self.settings.retire_after  # not before: the old versions' superseded_at
            rotation = {
                "master_key_version": version,
                "keys_rewrapped": rewrapped,
                **details,
                "old_versions_retire_at": retire_at.isoformat(),
            }
            entries.append(audit.append_within(conn, "key.rotated", details=rotation))
            if then is not None:
                then(conn, entries[-1])

        version, rewrapped = self.keyring.rotate_master(recorded)
        return version, rewrapped, entries[-1]

    def _audit_key_created(self, subject_ref: str, key_version: int) -> None:
        self.audit.append("key.created", subject_ref=subject_ref, details={"key_version": key_version})

    @functools.cached_property
    def audit(self) -> AuditLog:
        """The audit trail in the metadata database, its signing key file and its witness."""
        s = self.settings
        return AuditLog.open(
            self.keyring.engine,
            self.keyring,
            s.signing_key_url,
            s.witness_url,
            verify_key=load_verify_key(s.verify_key) if s.verify_key else None,
            high_water=HighWater(s.home / "audit-high-water.json", s.witness_url),
        )

    @functools.cached_property
    def intake_key(self) -> X25519PrivateKey:
        """The intake private key that opens sealed batches (in the keyring; made on first use)."""
        return intake_private_key(self.keyring)

    @property
    def intake_public_key(self) -> str:
        """The text a cluster configures as ``pipeline.ingest.public-key``."""
        return public_key_text(self.intake_key)

    @functools.cached_property
    def _ingest_tally(self) -> IngestTally:
        return IngestTally(self.audit)

    # -- the one ingest path ---------------------------------------------------
    def ingest(
        self,
        sealed: bytes,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
        admit: Callable[[OpenedBatch], Admitted] | None = None,
    ) -> IngestResult:
        """Open, validate, scope, check tombstones, seal per subject, route and write one sealed batch, once per id.

        The embedded delivery calls this in-process and the API handler per request;
        neither re-implements a step. Accepting a batch id twice writes nothing.
        It is :meth:`prepare_ingest` then :meth:`commit_ingest`: concurrent callers share commits.

        :raises IntakeError: the batch is oversized, malformed, altered or holds an invalid record (400/413),
            audited; a value out of :mod:`pipeline.bounds` is named, and the batch refused whole and audited
        :raises ForbiddenBatch: the principal is neither a cluster nor the operator, or a record
            names another account, user or cluster, or is an ``account`` record from a cluster;
            the batch is refused whole and audited (403)
        :raises StoreUnavailable: a store or the metadata database is down; retry later (503)

        ``admit`` sees a scoped batch before anything is written, and returns the batch to write and
        may return a statement for the commit that writes it, with the key of the row it locks, and a
        guard that commit checks after its locks (the control plane notes its cluster's contact so,
        refuses a lost cluster's newer records with ForbiddenBatch, and drops the end of a job it
        recorded lost, also when another process records it lost between admission and commit).
        """
        prepared = self.prepare_ingest(sealed, principal, idempotency_key=idempotency_key, admit=admit)
        return self.commit_ingest(prepared)

    def prepare_ingest(
        self,
        sealed: bytes,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
        admit: Callable[[OpenedBatch], Admitted] | None = None,
    ) -> PreparedBatch:
        """Every check of :meth:`ingest` that needs the batch alone, nothing written but the audit of a refusal.

        A refused batch raises here, before it joins any group, so it never affects another batch.
        What needs the metadata database (batch ids taken, tombstones, data keys) is read once per
        group in :meth:`commit_ingest`, which seals.

        :raises IntakeError, ForbiddenBatch, StoreUnavailable: as :meth:`ingest`
        """
        try:
            batch = open_batch(self.intake_key, sealed)
        except IntakeError as exc:  # the reason goes to the caller only: it may quote the batch's content
            self._audit_rejected(principal, exc.batch_id, {"bytes": len(sealed), "reason": "could not be opened"})
            raise
        if idempotency_key is not None and idempotency_key != batch.batch_id:
            raise IntakeError(f"Idempotency-Key {idempotency_key[:140]!r} does not match batch id {batch.batch_id}")
        self._check_bounds(batch, principal)
        try:
            subject_ref = self._scope(batch, principal)
        except InvalidName as exc:  # refused for good, as a malformed batch is: a spooled copy is set aside
            raise IntakeError(f"batch {batch.batch_id} refused: {exc}") from exc
        received = batch.n_records
        # stamped before admission: the running jobs it keeps, and writes as lost one day, name the owner
        batch = OpenedBatch(batch.batch_id, [_stamped(table, principal, subject_ref) for table in batch.tables])
        return self._admitted(subject_ref, received, batch, admit, principal.cluster_id)

    def _admitted(
        self,
        subject_ref: str,
        received: int,
        batch: OpenedBatch,
        admit: Callable[[OpenedBatch], Admitted] | None,
        cluster_id: str | None,
    ) -> PreparedBatch:
        """``batch`` (scoped and stamped) through ``admit``, ready to commit, and how to admit it again."""
        if admit is None:
            return PreparedBatch(subject_ref, batch.batch_id, received, batch.tables, cluster_id=cluster_id)
        admitted, statements, guard = admit(batch)
        return PreparedBatch(
            subject_ref,
            admitted.batch_id,
            received,
            admitted.tables,
            statements,
            () if guard is None else (guard,),
            functools.partial(self._admitted, subject_ref, received, batch, admit, cluster_id),
            cluster_id,
        )

    def commit_ingest(self, prepared: PreparedBatch) -> IngestResult:
        """Seal and write a prepared batch in the next group commit; returns once that commit is durable.

        :raises StoreUnavailable: a store or the metadata database is down; nothing of the group
            was acknowledged, and what was written is found and skipped by a retry (503)
        """
        return self._commits.submit(prepared)

    def queue_ingest(self, prepared: PreparedBatch) -> Future[IngestResult]:
        """:meth:`commit_ingest` without waiting: the future is done once the commit is durable (or failed,
        with the errors of :meth:`commit_ingest`). The API awaits it on its event loop, holding no thread."""
        return self._commits.enqueue(prepared)

    def _commit_group(self, batches: Sequence[PreparedBatch]) -> list[IngestResult | Exception]:
        """Write a group of batches (:meth:`_commit_admitted`); a batch whose admission a guard finds
        stale is admitted again and the group written afresh (rare: another process ended its cluster
        meanwhile). An error of that second admission (its cluster found lost) is that batch's alone."""
        group: list[PreparedBatch | Exception] = list(batches)
        while True:
            try:
                results = iter(self._commit_admitted([b for b in group if isinstance(b, PreparedBatch)]))
            except _TombstonesMoved:
                continue
            except _StaleAdmission as stale:
                group = [
                    _readmitted(b) if isinstance(b, PreparedBatch) and id(b) in stale.batches else b for b in group
                ]
                continue
            return [next(results) if isinstance(b, PreparedBatch) else b for b in group]

    def _commit_admitted(self, batches: Sequence[PreparedBatch]) -> list[IngestResult]:
        """Write a group of batches: the ones not taken before, less what tombstones forbid, sealed
        (reads of the metadata database once for the whole group: batch ids, tombstones, data keys);
        then one long-term transaction that takes the admissions' locks and checks their guards, records
        the batch ids, and writes the batches it found new (a concurrent process may have taken one
        meanwhile) to every other store in one call each and to the long-term store.

        :raises _StaleAdmission: a guard failed; nothing was written
        :raises _TombstonesMoved: a subject's tombstones changed since they were read; nothing was written
        """
        fresh = self._untaken(batches)
        subjects = {b.subject_ref for b in fresh}
        stones = tombstones.load(self.keyring.engine, subjects)
        kept = [self._drop_erased(b, stones) for b in fresh]
        sealed = seal_batches(
            self.keyring,
            [(f"{b.subject_ref}/{b.batch_id}", tables) for b, (tables, _) in zip(fresh, kept, strict=True)],
        )
        now = utcnow()
        routes = [self.route(segments, arriving_at=now) for segments in sealed]

        def routed(name: str, only: set[int] | None = None) -> list[Segment]:
            return [
                s for b, route in zip(fresh, routes, strict=True) if only is None or id(b) in only for s in route[name]
            ]

        long_term = self.stores["long_term"]
        assert isinstance(long_term, SQLStore)  # checked by open
        dropping = any(dropped for _tables, dropped in kept)
        with (
            _kept_for_retry("long_term"),
            transaction(self.keyring.engine, "commit ingested batches") as conn,
        ):
            self._hold_for_writing(conn, subjects, auditing=dropping)  # an erasure filed from here on waits
            # in key order, then the batch ids in theirs: two processes' commits wait, never deadlock;
            # a run of one statement goes as one executemany (one round trip on PostgreSQL)
            locking = sorted((s for batch in batches for s in batch.statements), key=lambda s: s[0])
            for _statement_id, same in itertools.groupby(locking, key=lambda s: id(s[1])):
                run = list(same)
                conn.execute(run[0][1], [params for _key, _statement, params in run])
            if stale := _stale_admissions(conn, fresh):
                raise _StaleAdmission(stale)
            if not tombstones.stand(conn, stones):  # one filed, or run, while the group was sealed
                raise _TombstonesMoved()
            new = _mark_ingested(conn, self.keyring.engine, fresh) if fresh else set()
            # the batches this commit takes, after the checks: no store holds what a stale admission let
            # through, or this copy of a batch another process took meanwhile (a cluster may seal two
            # copies of one batch id that differ, and the logging store would keep both)
            for name in self.stores:
                if name != "long_term" and (segments := routed(name, new)):
                    with _kept_for_retry(name):
                        self.stores[name].write(segments)
            long_term.insert(conn, routed("long_term", new))
            for batch, (_tables, dropped) in zip(fresh, kept, strict=True):  # with the batch: a group sealed
                # again, or a batch sent again, says it once; a cluster's past its hour's share, the summary
                if not (id(batch) in new and dropped):
                    continue
                if batch.cluster_id is None or self._ingest_tally.drop(
                    batch.cluster_id, batch.subject_ref, sum(dropped.values()), dropped
                ):
                    self._audit_drop(conn, {"batch_id": batch.batch_id}, batch.subject_ref, dropped)
        for name in self.stores:
            self._ingest_tally.count(name, routed(name, new))
        return [IngestResult(batch.records, duplicate=id(batch) not in new) for batch in batches]

    def _untaken(self, batches: Sequence[PreparedBatch]) -> list[PreparedBatch]:
        """The first of each batch of the group whose id was not taken before, in one query."""
        keys = {b.key for b in batches}
        subjects, ids = sorted({s for s, _b in keys}), sorted({b for _s, b in keys})
        taken: set[tuple[str, str]] = set()
        with reading(self.keyring.engine, "check the batch ids") as conn:
            for start in range(0, len(ids), 500):
                taken.update(
                    (row.subject_ref, row.batch_id)
                    for row in conn.execute(_TAKEN, {"subjects": subjects, "ids": ids[start : start + 500]})
                )
        fresh: dict[tuple[str, str], PreparedBatch] = {}
        for batch in batches:
            if batch.key not in taken:
                fresh.setdefault(batch.key, batch)  # a replay within the group: its first only
        return list(fresh.values())

    def _scope(self, batch: OpenedBatch, principal: Principal) -> str:
        """The subject ref the batch belongs to; refuse it whole unless every record is the principal's own.

        A cluster may write only its own account, user and cluster, and no ``account`` record
        (who people are is not a cluster's to say); an embedded plugin only its own account.
        An operator (a local command holding the master key, e.g. ``spool replay``) may replay
        any batch of one account.
        """
        if principal.kind == "operator":
            accounts = set().union(*(pc.unique(t.column("account")).to_pylist() for t in batch.tables))
            if len(accounts) != 1:
                self._reject(batch, principal, f"records name {len(accounts)} accounts; a batch holds one")
            return self.keyring.subject_ref(accounts.pop())
        if principal.kind != "cluster" or principal.account is None:
            self._reject(batch, principal, f"a {principal.kind} principal may not ingest; only a cluster may")
        if not principal.embedded and any(table.column("kind")[0].as_py() == "account" for table in batch.tables):
            self._reject(batch, principal, "a cluster may not send account records")
        foreign = [subject for table in batch.tables for subject in _foreign_subjects(table, principal)]
        if foreign:
            self._reject(
                batch,
                principal,
                f"{len(foreign)} of {batch.n_records} records name another account, user or cluster than the caller's",
                foreign_subject_refs=sorted({self.keyring.subject_ref(account) for account, _user in foreign}),
                foreign_user_refs=sorted(
                    {ref for account, user in foreign if (ref := self.keyring.user_ref(account, user)) is not None}
                ),
            )
        assert principal.account is not None
        return self.keyring.subject_ref(principal.account)

    def _check_bounds(self, batch: OpenedBatch, principal: Principal) -> None:
        """Refuse the batch whole (400, audited) when a value lies outside :mod:`pipeline.bounds`."""
        try:
            bounds.check_batch(batch.tables, bounds.Window.of(principal.registered_at, utcnow()))
        except bounds.OutOfBounds as exc:
            self._reject(batch, principal, f"out of bounds: {exc}", error=IntakeError, field=exc.field)

    def _reject(
        self,
        batch: OpenedBatch,
        principal: Principal,
        reason: str,
        error: type[BatchRefused] = ForbiddenBatch,
        **refs: Any,
    ) -> None:
        """Audit a refused batch (refs and field names only, never names of people) and raise ``error``."""
        self._audit_rejected(principal, batch.batch_id, {"records": batch.n_records, "reason": reason, **refs})
        raise error(f"batch {batch.batch_id} refused: {reason}")

    def audit_dropped(self, cluster_id: str, subject_ref: str, details: dict[str, Any]) -> None:
        """Audit records of a cluster's batch that admission dropped (``ingest.dropped``): one entry each for
        the cluster's first batches of an hour, the rest counted in the hour's ``ingest.summary`` (a cluster
        sending a lost job's end again and again must not grow the trail at will; its tombstones' drops
        share that count, see :meth:`_commit_admitted`)."""
        if self._ingest_tally.drop(cluster_id, subject_ref, details["records"]):
            self.audit.append("ingest.dropped", subject_ref=subject_ref, details=details)
        self._ingest_tally.summarise()  # an hour over meanwhile: outside any transaction, its summary

    def _audit_rejected(self, principal: Principal, batch_id: str | None, details: dict[str, Any]) -> None:
        subject_ref = None if principal.account is None else self.keyring.subject_ref(principal.account)
        if not self._ingest_tally.refusal(principal.actor, subject_ref):  # past a share: counted in the summary
            return
        self.audit.append(
            "ingest.rejected", actor=principal.actor, subject_ref=subject_ref, details={"batch_id": batch_id, **details}
        )

    def _drop_erased(
        self, batch: PreparedBatch, stones: Mapping[str, list[tombstones.Tombstone]]
    ) -> tuple[list[pa.Table], Counter[str]]:
        """The batch's tables without records an erasure's tombstone forbids (a replayed spool, a late batch),
        and how many each tombstone dropped."""
        if not stones.get(batch.subject_ref):  # every record is of the batch's account (scoped): none forbidden
            return [table for table in batch.tables if table.num_rows], Counter()
        return self._without_erased(batch.tables, stones)

    def _without_erased(
        self, tables: Sequence[pa.Table], stones: Mapping[str, list[tombstones.Tombstone]]
    ) -> tuple[list[pa.Table], Counter[str]]:
        """``tables`` less what tombstones forbid, and how many records each tombstone dropped."""
        kept, dropped = tombstones.drop_erased(
            self.keyring.engine,
            tables,
            lambda a, u: (self.keyring.subject_ref(a), self.keyring.user_ref(a, u)),
            loaded=stones,
        )
        return [table for table in kept if table.num_rows], dropped

    def _hold_for_writing(self, conn: Connection, subjects: Iterable[str], *, auditing: bool) -> None:
        """First in a transaction that writes records of ``subjects``: hold their tombstones (and, when it
        audits what they dropped, the audit chain's lock before them, the order a filing takes both in)."""
        if auditing:
            self.audit.hold(conn)
        tombstones.hold(conn, subjects)

    def _audit_drop(
        self, conn: Connection, source: dict[str, str], subject_ref: str | None, dropped: Counter[str]
    ) -> None:
        """Audit what tombstones dropped of records written (``source``: what they came in), in the transaction
        that writes them (which took the chain's lock first: :meth:`AuditLog.hold`)."""
        if dropped:
            self.audit.append_within(
                conn,
                "ingest.dropped",
                subject_ref=subject_ref,
                details={**source, "records": sum(dropped.values()), "by_request": dict(dropped)},
            )

    def route(self, segments: Iterable[Segment], *, arriving_at: datetime | None = None) -> dict[str, list[Segment]]:
        """Store name → the segments the policy lets it hold.

        :param arriving_at: when batches arrive: then none whose every record is past the store's limit
            already (a spool replayed after a month), which the report would count overdue until removed
        """
        cutoffs: dict[tuple[str, str], datetime] = {}
        if arriving_at is not None:
            cutoffs = {(store, data_type): arriving_at - limit for store, data_type, limit in self.policy.limits()}
        routed: dict[str, list[Segment]] = {name: [] for name in self.stores}
        for segment in segments:
            for name in self.policy.stores_for(segment.data_type):
                cutoff = cutoffs.get((name, segment.data_type))
                if name in routed and (cutoff is None or segment.max_observed_at >= cutoff):
                    routed[name].append(segment)
        return routed

    def write_records(
        self, records: Iterable[Mapping[str, Any]], *, segment_seed: str | None = None, cluster_id: str | None = None
    ) -> dict[str, int]:
        """Seal and write records straight to every store the policy routes them to, less what an
        erasure's tombstone forbids (dropped and audited, as ingest does); store name → segments new.

        With ``segment_seed`` (see :func:`seal_tables`), writing the same records again, after a
        crash or from another process at the same moment, stores nothing twice.

        With ``cluster_id`` (records the control plane writes for a cluster: its jobs recorded lost, which
        its own snapshots decide), drops are audited within the cluster's hourly share, as its batches' are.

        :raises TypeError, ValueError: a field of a record does not fit its kind's schema, or a record has no known kind
        """
        tables = _tables_by_kind(records)
        subjects = {self.keyring.subject_ref(a) for t in tables for a in set(t.column("account").to_pylist())}
        long_term = self.stores["long_term"]
        assert isinstance(long_term, SQLStore)  # checked by open
        while True:  # as a group commit of ingest writes (see _commit_admitted): an erasure filed meanwhile
            stones = tombstones.load(self.keyring.engine, subjects)
            kept, dropped = self._without_erased(tables, stones)
            routed = self.route(seal_tables(self.keyring, kept, segment_seed=segment_seed))
            with transaction(self.keyring.engine, "writing records") as conn:
                self._hold_for_writing(conn, subjects, auditing=bool(dropped))
                if not tombstones.stand(conn, stones):
                    continue
                written = {name: self.stores[name].write(b) for name, b in routed.items() if b and name != "long_term"}
                if routed.get("long_term"):  # last, in the transaction holding the tombstones
                    written["long_term"] = long_term.write_within(conn, routed["long_term"])
                [subject_ref] = subjects if cluster_id is not None else [None]  # a cluster's records: one account
                if (
                    not dropped
                    or cluster_id is None
                    or self._ingest_tally.drop(cluster_id, subject_ref, sum(dropped.values()), dropped)
                ):
                    self._audit_drop(conn, {"written_as": segment_seed or "records"}, None, dropped)
            return {name: written[name] for name in routed if name in written}

    def subject_ref(self, account: str) -> str:
        """The subject ref of an account that has data now.

        :raises UnknownAccountError: no record of this account was ever stored, or it was
            erased: both get the same answer, so a lookup does not tell which
        """
        ref = self.keyring.subject_ref(account)
        if self.keyring.key_state(ref) != "active":
            raise UnknownAccountError(account)
        return ref

    def read_segments(
        self,
        store: str = "long_term",
        *,
        account: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        unreadable: list[Unreadable] | None = None,
        columns: Sequence[str] | None = None,
        visited: Callable[[Segment], None] | None = None,
        known: Callable[[Segment], bool] | None = None,
    ) -> Generator[tuple[Segment, pa.Table], None, None]:
        """Each readable segment with its decrypted table, skipping crypto-shredded subjects; closed, it
        closes the store's scan (a database connection held while it reads).

        ``columns`` (with ``record_id``) limits the tables to those columns, read alone.

        ``visited`` is called with every segment the scan reads, shredded and unreadable ones too: what
        this read saw, where a scan of its own would see the stores at another moment.

        ``known`` is asked of each segment whose data key stands, before it is decrypted: one it answers
        true for (the caller holds what it read of it before) is not decrypted or yielded.

        A segment that should open but does not (an altered header or payload, a subject or
        key version the keyring never issued) is appended to ``unreadable`` and skipped, so
        one bad segment hides nothing else; without that list it stops the scan.

        :raises StoreError: a segment is unreadable and no ``unreadable`` list was given
        """
        subject_ref = self.subject_ref(account) if account is not None else None
        keys: dict[str, tuple[str, int]] = {}
        ciphers: dict[str, AESGCM] = {}  # checked against the database every half second, not once a segment
        read_at = time.monotonic()
        scan = self.stores[store].scan(subject_ref=subject_ref, data_type=data_type, kind=kind)
        with _closed_after(scan):
            for segment in scan:
                if visited is not None:
                    visited(segment)
                if time.monotonic() - read_at > KEY_STATE_READ_EVERY:  # a scan outlasting an erasure (a slow
                    keys.clear()  # reader, a cursor's snapshot of segments since deleted) opens nothing of it
                    ciphers.clear()
                    read_at = time.monotonic()
                key_id = segment.user_ref or segment.subject_ref
                if key_id not in keys:
                    keys[key_id] = self._key_status(segment.subject_ref, segment.user_ref)
                state, version = keys[key_id]
                if state == "destroyed" or (state == "active" and 0 < segment.key_version < version):
                    continue  # crypto-shredded: unreadable on purpose
                if known is not None and state == "active" and segment.key_version == version and known(segment):
                    continue
                try:
                    if state == "unknown" or segment.key_version != version:
                        raise KeyringError(
                            f"subject or key version {segment.key_version} was never issued by this keyring: "
                            "the segment or its header was altered"
                        )
                    if key_id not in ciphers:
                        ciphers[key_id] = self.keyring.cipher_for(segment.subject_ref, segment.user_ref, version)
                    table = open_segment(self.keyring, segment, columns, cipher=ciphers[key_id])
                except KeyringError as exc:
                    problem = Unreadable(store, segment.segment_id, str(exc))
                    if unreadable is None:
                        raise StoreError(str(problem)) from exc
                    unreadable.append(problem)
                    continue
                yield segment, table

    def key_stands(self, segment: Segment) -> bool:
        """Whether the data key version that sealed ``segment`` stands, as the keyring's database says (no
        key service asked): then only damage, or a key service that fails, keeps the segment from opening;
        otherwise it was crypto-shredded (or its header names a key never issued)."""
        state, version = self._key_status(segment.subject_ref, segment.user_ref)
        return state == "active" and segment.key_version == version

    def _key_status(self, subject_ref: str, user_ref: str | None) -> tuple[str, int]:
        """``(key state, live key version)`` of a segment's data key; versions below the live one were destroyed."""
        version = self.keyring.live_version(subject_ref, user_ref)
        if version is not None:
            return "active", version
        return self.keyring.key_state(subject_ref, user_ref), 0

    def read_records(
        self, store: str = "long_term", *, unreadable: list[Unreadable] | None = None, **filters: Any
    ) -> Generator[dict[str, Any], None, None]:
        """Decrypted records as dicts (see :meth:`read_segments`); closed, it closes the read.

        A record with a time Python cannot hold (see :func:`~pipeline.records.unreadable_rows`)
        is appended to ``unreadable`` and skipped like an unreadable segment. Looked for only
        when a segment's conversion fails, so reads of sound data pay nothing for it.

        :raises StoreError: a segment or record is unreadable and no ``unreadable`` list was given
        """
        with contextlib.closing(self.read_segments(store, unreadable=unreadable, **filters)) as read:
            for segment, table in read:
                try:
                    rows = list(rows_from_table(table))
                except OverflowError:
                    table = _without_rows(store, segment, table, unreadable_rows(table), unreadable)
                    rows = list(rows_from_table(table))
                yield from rows

    def foreign_files(self) -> dict[str, list[str]]:
        """Store name → what was skipped in it so far as not being its segments (see ``Store.foreign_files``)."""
        return {name: found for name, store in self.stores.items() if (found := store.foreign_files())}

    def summarise_ingest(self) -> None:
        """Write the ingest summary of what this pipeline took so far (it is otherwise written hourly)."""
        if "_ingest_tally" in self.__dict__:
            self._ingest_tally.summarise(final=True)

    def close(self) -> None:
        """Write the pending ingest summary and release the stores."""
        self.summarise_ingest()
        for store in self.stores.values():
            store.close()
