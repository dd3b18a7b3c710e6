"""Clusters: register one (and issue its write-only token), list the caller's, close one.

A registered cluster gets a cluster token bound to its account, its owner (the
member who registered it, or the user an admin named; none for an account-level
service cluster) and its cluster id,
the control plane's ingest URL and the intake public key: everything its
plugin needs to write, nothing that reads; and its own TLS credentials (a CA,
scheduler / worker / client certificates and keys, see :mod:`pipeline.security.tls`),
except for a cluster a dask-gateway registers: the gateway gives each cluster TLS of its
own, so the project issues none (``tls`` is empty) and the gateway token that registered
it may close it.
When the plugin closes with its spool empty it closes the cluster with its own
token, which revokes that token: a closed cluster's credentials write nothing
more. The account name is kept sealed
under the account's data key beside its HMAC ref (see :mod:`pipeline.server.names`):
erasing the account leaves its clusters listed without names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.compute as pc
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, String, bindparam, delete, func, insert, select, tuple_, update

from pipeline import columns
from pipeline.bounds import MAX_STRING_BYTES
from pipeline.db import api_tokens, clusters, ended_jobs, insert_ignoring_duplicates, lost_jobs, reading, transaction
from pipeline.errors import (
    ClusterLost,
    ForbiddenBatch,
    InvalidBinding,
    KeyringError,
    OutputError,
    UnknownAccountError,
)
from pipeline.fsmodes import FOLDER_MODE, check_output_folder, output_folder, write_private
from pipeline.intake import OpenedBatch, intake_private_key, public_key_text
from pipeline.principals import Principal
from pipeline.records import rows_from_table, utcnow
from pipeline.redact import first_line
from pipeline.retention.lease import default_holder
from pipeline.runtime import Admitted, Guard, Locking, Pipeline
from pipeline.security.tls import dask_tls_config, issue_credentials
from pipeline.server.auth import TokenStore, require
from pipeline.server.listening import GAP_PERIODS, listening, note_listening, sweep_period
from pipeline.server.names import NameBox
from pipeline.subject_names import MAX_NAME_CHARS, control_character, normalise, same

__all__ = [
    "ROLE_FILES",
    "ClusterRegistry",
    "FoundCluster",
    "LostClusterSweeper",
    "Registration",
    "check_role_files",
    "cluster_config",
    "plugin_config",
    "role_configs",
    "router",
    "write_role_files",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A new cluster and the secrets its plugin needs (shown once)."""

    cluster_id: str
    account: str
    user: str | None  # the owner: every record the cluster sends is theirs
    name: str | None
    image: str | None
    token_id: str
    token: str
    expires_at: datetime | None
    ingest_url: str
    intake_public_key: str
    tls: dict[str, str]  # the cluster's CA, role certificates and private keys (PEM): shown once; none for a gateway

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plugin_config(registration: dict[str, Any]) -> dict[str, Any]:
    """The ``pipeline`` section a registered cluster's scheduler runs with (its plugin in remote mode)."""
    return {
        "account": registration["account"],
        "user": registration["user"],
        "cluster-id": registration["cluster_id"],
        "image": registration["image"],
        "ingest": {
            "url": registration["ingest_url"],
            "token": registration["token"],
            "public-key": registration["intake_public_key"],
        },
    }


@dataclass(frozen=True)
class FoundCluster:
    """Whose a registered cluster is: ``account`` and ``owner`` ``None`` once erased (the owner also
    for an account-level cluster), and its token."""

    account: str | None
    owner: str | None
    token_id: str


def cluster_config(registration: dict[str, Any]) -> dict[str, Any]:
    """The dask config a registered cluster runs with: section ``pipeline``, and ``distributed.comm``
    for TLS with the cluster's own certificates."""
    return {**dask_tls_config(registration["tls"]), "pipeline": plugin_config(registration)}


#: the file ``clusters create --out DIR`` writes for each role
ROLE_FILES = {"scheduler": "scheduler.yaml", "worker": "worker.yaml", "client": "client.yaml"}


def role_configs(registration: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One dask config per role (``scheduler``, ``worker``, ``client``), each with only its own key.

    A worker or client host must not hold the scheduler's key (it would let it pose as the
    scheduler) nor the cluster token (it would let it write as the cluster): only the
    scheduler's config has ``pipeline.ingest``. The client's has the workers' certificate.
    """
    tls = registration["tls"]
    configs = {}
    for role in ROLE_FILES:
        own = {"cert": tls[f"{role}_cert"], "key": tls[f"{role}_key"]}
        configs[role] = {
            "distributed": {
                "comm": {"require-encryption": True, "tls": {"ca-file": tls["ca_cert"], role: own}},
            },
        }
    configs["scheduler"]["pipeline"] = plugin_config(registration)
    # public: a client seals the AWS session tokens it forwards to the workers' key (SessionTokenForwarder)
    configs["client"]["pipeline"] = {"aws": {"worker-cert": tls["worker_cert"]}}
    return configs


def check_role_files(out_dir: Path) -> None:
    """Refuse a folder that already holds a role file, or cannot be written (before registering: nothing is
    issued in vain).

    :raises OutputError: a role file is there (another cluster's credentials would be overwritten), or the
        folder cannot be made or written in
    """
    taken = [name for name in ROLE_FILES.values() if (out_dir / name).exists()]
    if taken:
        raise OutputError(f"{out_dir} already holds {', '.join(taken)}; give another --out folder")
    check_output_folder(out_dir)


def write_role_files(registration: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write each role's dask config to ``out_dir`` (0600 files in a folder created 0700); their paths by role.

    :raises OutputError: the folder or a file cannot be written, or a role file is already there
    """
    import yaml

    check_role_files(out_dir)
    written: dict[str, Path] = {}
    with output_folder(out_dir):
        os.chmod(out_dir, FOLDER_MODE)  # an existing folder too: it now holds private keys
        try:
            for role, config in role_configs(registration).items():
                path = out_dir / ROLE_FILES[role]
                try:
                    write_private(path, yaml.safe_dump(config, sort_keys=False).encode(), replace=False)
                except FileExistsError:
                    raise OutputError(f"{path} appeared while writing; give another --out folder") from None
                written[role] = path
        except BaseException:
            for path in written.values():  # all the files or none
                path.unlink(missing_ok=True)
            raise
    return written


class ClusterRegistry:
    """The ``clusters`` table."""

    def __init__(self, pipeline: Pipeline, tokens: TokenStore | None = None) -> None:
        self.pipeline = pipeline
        self.tokens = tokens or TokenStore(pipeline)
        self.names = NameBox(pipeline.keyring)
        self._note_ended = insert_ignoring_duplicates(pipeline.keyring.engine, ended_jobs).from_select(
            ["cluster_id", "record_id"],
            select(bindparam("cluster_id", type_=String), bindparam("record_id", type_=String)).where(
                select(clusters.c.cluster_id)  # an ended cluster recorded its running jobs: nothing to note
                .where(
                    clusters.c.cluster_id == bindparam("cluster_id"),
                    clusters.c.closed_at.is_(None),
                    clusters.c.lost_at.is_(None),
                )
                .exists()
            ),
        )

    def register(
        self,
        account: str,
        ingest_url: str,
        *,
        user: str | None = None,
        name: str | None = None,
        image: str | None = None,
        gateway_token_id: str | None = None,
    ) -> Registration:
        """A new cluster of ``account`` owned by ``user`` (none: account-level), with a cluster token
        valid for ``pipeline.server.cluster-token-ttl``.

        ``gateway_token_id``: a dask-gateway registers it with that token (which may close it), and
        its TLS is the gateway's, so none is issued.

        :raises InvalidBinding: an image longer than ingest accepts in its plugin's records; a name or image
            with a control character (printed back by ``clusters list``, written into ``scheduler.yaml``)
        """
        account, user = normalise(account), None if user is None else normalise(user)  # as its token keeps them
        if image is not None and len(image.encode()) > MAX_STRING_BYTES:  # its plugin's records could never be sent
            raise InvalidBinding(f"image: {len(image.encode())} bytes of UTF-8; at most {MAX_STRING_BYTES}")
        for field, value in (("name", name), ("image", image)):
            found = None if value is None else control_character(value)
            if found is not None:
                raise InvalidBinding(f"{field}: may not hold a control character ({found})")
        public_key = public_key_text(intake_private_key(self.pipeline.keyring))  # first: nothing issued if it fails
        cluster_id = f"cluster-{uuid.uuid4().hex[:12]}"
        validity = timedelta(seconds=self.pipeline.settings.tls_validity)
        tls = (  # before the token and the row: a failure leaves no open cluster with a token nobody received
            {}
            if gateway_token_id
            else issue_credentials(self.pipeline.keyring, account, cluster_id, validity=validity).to_json()
        )
        ttl = timedelta(seconds=self.pipeline.settings.cluster_token_ttl)
        issued = self.tokens.create("cluster", account, user, cluster_id=cluster_id, ttl=ttl)
        subject_ref = self.pipeline.keyring.subject_ref(account)
        user_ref = None if user is None else self.pipeline.keyring.user_ref(account, user)
        # what its owner named it and ran in it is hers (her erasure shreds it); its account is the account's
        chosen = {"name": name, "image": image}
        names: dict[str, Any] = {"account": account, **(chosen if user_ref is None else {})}
        if gateway_token_id is not None:
            names["registered_by"] = gateway_token_id
        with transaction(self.pipeline.keyring.engine, "registering a cluster") as conn:
            conn.execute(
                insert(clusters).values(
                    cluster_id=cluster_id,
                    subject_ref=subject_ref,
                    token_id=issued.token_id,
                    names=self.names.seal(cluster_id, names, subject_ref=subject_ref),
                    created_at=utcnow(),
                    user_ref=user_ref,
                    owner_names=None
                    if user_ref is None
                    else self.names.seal(f"{cluster_id}/owner", chosen, subject_ref=subject_ref, user_ref=user_ref),
                )
            )
        return Registration(
            cluster_id,
            account,
            user,
            name,
            image,
            issued.token_id,
            issued.token,
            issued.expires_at,
            ingest_url,
            public_key,
            tls,
        )

    def close(self, cluster_id: str, token_id: str, *, now: datetime | None = None, actor: str | None = None) -> None:
        """Revoke the cluster's token ``token_id`` and mark the cluster closed (idempotent).

        Its jobs still running, as last reported, are recorded with ``status: lost``.
        """
        now = now or utcnow()
        self.tokens.revoke(token_id, now=now)  # first: a crash in between leaves no open token of a closed cluster
        row = self._row(cluster_id)
        if row is not None and row.closed_at is None and row.lost_at is None:
            self._end(row, "closed", now, actor=actor)

    def sweep(self, *, now: datetime | None = None) -> list[str]:
        """Mark lost every open cluster not heard of for ``pipeline.server.cluster-lost-after``; their ids.

        A lost cluster is lost from its last contact plus that time; its running jobs are
        recorded then with the counts last reported and ``status: lost``. A cluster never
        heard of is not lost: its files may wait days for their hosts. Once its token expired
        it can never deliver: it is closed, as of that moment.
        """
        now = now or utcnow()
        lost_after = timedelta(seconds=self.pipeline.settings.cluster_lost_after)
        run = listening(self.pipeline.keyring.engine)
        query = select(clusters).where(
            clusters.c.closed_at.is_(None), clusters.c.lost_at.is_(None), clusters.c.last_contact_at <= now - lost_after
        )
        unheard = (
            select(clusters, api_tokens.c.expires_at)
            .join(api_tokens, api_tokens.c.token_id == clusters.c.token_id)
            .where(clusters.c.closed_at.is_(None), clusters.c.lost_at.is_(None), clusters.c.last_contact_at.is_(None))
            .where(api_tokens.c.expires_at <= now)
        )
        # ended a while ago and its jobs not yet recorded: the process ending it stopped in between (one
        # that did not records them moments after, so another process's sweep leaves those alone)
        stranded = select(clusters).where(
            func.coalesce(clusters.c.closed_at, clusters.c.lost_at) <= now - lost_after,
            clusters.c.running.is_not(None),
        )
        with transaction(self.pipeline.keyring.engine, "finding lost clusters") as conn:
            rows = conn.execute(query).all()
            left = conn.execute(stranded).all()
            expired = conn.execute(unheard).all()
        for row in left:
            self._record_lost_jobs(row, row.closed_at or row.lost_at)
        for row in expired:
            self._end(row, "closed", row.expires_at)
        lost = []
        for row in rows:
            silent = run.silent_from(row.last_contact_at, now, self._gap)
            if silent is not None and silent + lost_after <= now:
                self._end(row, "lost", silent + lost_after)
                lost.append(row.cluster_id)
        return lost

    @property
    def _gap(self) -> timedelta:
        """No note of a listening ``serve`` for this long: the control plane was not listening."""
        return timedelta(seconds=GAP_PERIODS * sweep_period(self.pipeline.settings.cluster_lost_after))

    def admit(self, cluster_id: str, batch: OpenedBatch, *, now: datetime | None = None) -> Admitted:
        """Admit a batch of cluster ``cluster_id``: the batch to write, less the end of any job recorded
        lost (a spool replayed after the cluster ended: the job is stored once, as recorded), and the
        statement that notes the contact and the running jobs it reports, for the commit that writes the
        batch (no write transaction of its own per batch), with the cluster id as the key of the row it locks.

        The running jobs are computed from the cluster's row as read here: two batches of one
        cluster in one group commit (a spool replayed beside live delivery) keep the later one's.

        :raises ClusterLost: the cluster was lost and the batch holds a record observed after
            that (batches observed before it may still arrive, e.g. from ``spool replay``)
        :raises ForbiddenBatch: the cluster was closed and the batch holds a record observed after that (a
            request authenticated before the close, its body sent after: a closed cluster writes nothing new)
        """
        now = now or utcnow()
        row = self._row(cluster_id)
        if row is None:
            return batch, (), None
        lost_after = timedelta(seconds=self.pipeline.settings.cluster_lost_after)
        heard = row.last_contact_at
        if row.closed_at is None and row.lost_at is None and heard is not None and heard + lost_after <= now:
            silent = listening(self.pipeline.keyring.engine).silent_from(heard, now, self._gap)
            if silent is not None and silent + lost_after <= now:  # lost, whether or not a sweep saw it yet
                self._end(row, "lost", silent + lost_after)
                row = self._row(cluster_id)
        if row.lost_at is not None or row.closed_at is not None:  # ended: a late batch, observed before the end
            newest = max(pc.max(table.column("observed_at")).as_py() for table in batch.tables)
            if row.lost_at is not None and newest > row.lost_at:
                raise ClusterLost(
                    f"batch {batch.batch_id} refused: cluster {cluster_id} {ClusterLost.MARK} "
                    f"{row.lost_at:%Y-%m-%d %H:%M:%S} UTC (nothing heard for pipeline.server.cluster-lost-after) "
                    "and this batch was observed after; register the cluster again"
                )
            if row.closed_at is not None and newest > row.closed_at:  # its token revoked as its body trickled in
                raise ForbiddenBatch(
                    f"batch {batch.batch_id} refused: cluster {cluster_id} was closed at "
                    f"{row.closed_at:%Y-%m-%d %H:%M:%S} UTC and this batch was observed after"
                )
        batch = self._without_jobs_recorded_lost(row, batch)
        if row.lost_at is not None or row.closed_at is not None:  # a late batch (a spool replayed): written,
            return batch, (), None  # the cluster stays as it ended
        if not {"cluster_snapshot", "job"} & batch.by_kind.keys():  # nothing of its jobs: the contact alone
            return batch, ((cluster_id, _HEARD, {"id": cluster_id, "at": now}),), None
        before = self._running(row)
        running, vanished = _running_after(before, batch)
        if arrived := running["jobs"].keys() - before.get("jobs", {}).keys():  # once a job starts: rare
            for job_id in self._recorded_lost(row.cluster_id, arrived):
                del running["jobs"][job_id]
        if vanished["jobs"]:  # rare (a restarted scheduler): written here, once, whoever admits it
            self._write_lost_jobs(row.cluster_id, vanished, now)
        contact = {"id": cluster_id, "at": now, "running": self._seal_running(row, running)}
        ends = _job_ends(cluster_id, batch)
        return (
            batch,
            ((cluster_id, _CONTACT, contact), *self._ends_noted(cluster_id, ends)),
            _ends_guard(cluster_id, ends),
        )

    def _ends_noted(self, cluster_id: str, ends: list[str]) -> list[Locking]:
        """Statements noting the jobs a batch ends (:func:`_job_ends`) as ended, in the commit that stores the
        ends (after the cluster's row is locked): a job ended is never recorded lost after, though an admission
        that read the row before this commit lists it running again (two replicas, a late copy of a batch)."""
        return [
            (cluster_id, self._note_ended, {"cluster_id": cluster_id, "record_id": record_id}) for record_id in ends
        ]

    def _recorded_lost(self, cluster_id: str, job_ids: Iterable[str]) -> set[str]:
        """The jobs of ``job_ids`` this cluster recorded lost. A snapshot listing one again is of a second
        scheduler started with the cluster's files (the other one no longer lists it): it stays lost, written
        once, rather than running again, and lost again, and written again with other counts."""
        ids = {_lost_record_id(cluster_id, job_id): job_id for job_id in job_ids}
        with reading(self.pipeline.keyring.engine, "reading a cluster's jobs recorded lost") as conn:
            return {
                ids[record_id] for record_id in conn.scalars(_RECORDED_LOST, {"id": cluster_id, "records": list(ids)})
            }

    def _without_jobs_recorded_lost(self, row: Any, batch: OpenedBatch) -> OpenedBatch:
        """``batch`` less the end records of jobs this cluster's end (or a newer snapshot) recorded lost,
        the drop audited (:meth:`Pipeline.audit_dropped`): the job is stored once, as it was recorded (rare:
        one query for a batch with ends)."""
        if "job" not in batch.by_kind:
            return batch
        tables = dict(batch.by_kind)
        ends = tables["job"]
        job_ids = ends.column("job_id").to_pylist()
        recorded = self._recorded_lost(row.cluster_id, job_ids)
        if not recorded:
            return batch
        kept = [n for n, job_id in enumerate(job_ids) if job_id not in recorded]
        tables["job"] = ends.take(columns.column(pa.int64(), kept))
        self.pipeline.audit_dropped(
            row.cluster_id,
            row.subject_ref,
            {"batch_id": batch.batch_id, "records": len(job_ids) - len(kept), "reason": "jobs recorded lost"},
        )
        return OpenedBatch(batch.batch_id, [table for table in tables.values() if table.num_rows])

    def _end(self, row: Any, state: str, when: datetime, *, actor: str | None = None) -> None:
        """Mark the cluster ``closed`` or ``lost`` at ``when``, then record its running jobs as lost.

        The mark is claimed first: of two ``serve`` processes ending one cluster at once (a sweep
        each, or a sweep and the plugin's close), one ends it, records its jobs and audits, the
        other does nothing. The running jobs stay in the row until recorded, so a crash in between
        leaves them to the next sweep. They are noted lost with the claim, in its transaction: a
        batch with the end of one, committed after (by another process), drops that end; one
        committed before changed the row's running jobs, which the claim then reads.
        """
        column = clusters.c.closed_at if state == "closed" else clusters.c.lost_at
        with transaction(self.pipeline.keyring.engine, f"marking a cluster {state}") as conn:
            claimed = conn.execute(
                update(clusters)
                .where(clusters.c.cluster_id == row.cluster_id)
                .where(clusters.c.closed_at.is_(None), clusters.c.lost_at.is_(None))
                .values({column.name: when})
                .returning(clusters.c.cluster_id, clusters.c.subject_ref, clusters.c.user_ref, clusters.c.running)
            ).first()
            if claimed is not None:
                self._note_lost(conn, claimed.cluster_id, self._running(claimed))
        if claimed is None:  # ended meanwhile, by another process or request
            return
        jobs_lost = self._record_lost_jobs(claimed, when)
        self.pipeline.audit.append(
            f"cluster.{state}",
            actor=actor,
            subject_ref=row.subject_ref,
            details={"cluster_id": row.cluster_id, f"{state}_at": when.isoformat(), "jobs_lost": jobs_lost},
        )

    def _record_lost_jobs(self, row: Any, when: datetime) -> int:
        """Write an ended cluster's running jobs as ``status: lost``, then clear them; how many.

        Each is observed when its counts were last reported (``when`` the cluster ended, if no
        snapshot says), and goes through the tombstones as ingest does: a job of a user erased
        since must not come back with the cluster's end.

        Record and segment ids derive from the cluster and its jobs, so writing them again stores
        nothing twice: two sweeps that find the same ended cluster at once, or a sweep after a
        process stopped between writing them and clearing them.
        """
        lost = self._write_lost_jobs(row.cluster_id, self._running(row), when)
        with transaction(self.pipeline.keyring.engine, "clearing a cluster's running jobs") as conn:
            cleared = (
                row.running is None
                or conn.execute(
                    update(clusters)
                    .where(clusters.c.cluster_id == row.cluster_id, clusters.c.running == row.running)
                    .values(running=None)
                ).rowcount
            )
            if cleared:  # ended, nothing running: no job of it is recorded lost any more
                conn.execute(delete(ended_jobs).where(ended_jobs.c.cluster_id == row.cluster_id))
        return lost

    def _write_lost_jobs(self, cluster_id: str, running: dict[str, Any], when: datetime) -> int:
        """Write the jobs of ``running`` (as :meth:`_running` reads it) as ``status: lost``; how many.

        Record and segment ids derive from the cluster and the jobs, so the same jobs written again
        are stored once."""
        reported = running.get("observed_at")
        observed_at = when if not reported else datetime.fromisoformat(reported)
        noted: set[str] = set()
        if running.get("jobs"):  # first: a late end record arriving meanwhile is dropped, not stored beside it
            with transaction(self.pipeline.keyring.engine, "noting a cluster's jobs recorded lost") as conn:
                conn.execute(_LOCK_CLUSTER, {"id": cluster_id})  # after a commit storing an end, or before it
                noted = self._note_lost(conn, cluster_id, running)
        lost = [
            {
                **_from_json(job),
                "record_id": _lost_record_id(cluster_id, job_id),
                "observed_at": observed_at,
                "status": "lost",
            }
            for job_id, job in running.get("jobs", {}).items()
            if job_id in noted
        ]
        for record in lost:  # a seed of its own: written again with another set (a late copy of an older
            # snapshot listed it running again, then its cluster ended), it is stored once
            job = hashlib.sha256(record["job_id"].encode()).hexdigest()[:16]
            self.pipeline.write_records([record], segment_seed=f"lost-jobs/{cluster_id}/{job}", cluster_id=cluster_id)
        return len(lost)

    def _note_lost(self, conn: Connection, cluster_id: str, running: dict[str, Any]) -> set[str]:
        """Note the jobs of ``running`` as recorded lost, in ``conn``'s transaction, which holds the cluster's
        row (again: nothing); the ids of those noted, less the jobs whose end a batch stored meanwhile."""
        ids = {_lost_record_id(cluster_id, job_id): job_id for job_id in running.get("jobs", {})}
        ended = set(conn.scalars(_ENDED, {"id": cluster_id, "records": list(ids)})) if ids else set()
        if rows := [{"cluster_id": cluster_id, "record_id": r} for r in ids if r not in ended]:
            conn.execute(insert_ignoring_duplicates(self.pipeline.keyring.engine, lost_jobs), rows)
        return {job_id for record_id, job_id in ids.items() if record_id not in ended}

    def _row(self, cluster_id: str) -> Any:
        with reading(self.pipeline.keyring.engine, "reading a cluster") as conn:
            return conn.execute(_ROW, {"id": cluster_id}).first()

    def _running(self, row: Any) -> dict[str, Any]:
        """``{"observed_at": newest snapshot, "jobs": {job id: job record}}``, sealed under the key of the
        cluster's owner (the account's, for an account-level cluster): the jobs name her and her functions,
        so her erasure shreds them while the cluster runs on (nothing then: her jobs are not recorded lost)."""
        if row.running is None:
            return {}
        if row.running.startswith(_NONE_RUNNING):
            return {"observed_at": row.running.removeprefix(_NONE_RUNNING), "jobs": {}}
        opened = self.names.open(
            f"{row.cluster_id}/running", row.running, subject_ref=row.subject_ref, user_ref=row.user_ref
        )
        return opened or {}

    def _seal_running(self, row: Any, running: dict[str, Any]) -> str | None:
        """The running jobs sealed (``None``: the owner's key is erased, nothing of hers is kept); none, as of
        the newest snapshot in clear (no name, no key to read): a late batch's older snapshot, its duplicate
        even, then changes nothing (without it, one listed a finished job running again, recorded lost next)."""
        if not running.get("jobs"):
            return f"{_NONE_RUNNING}{running['observed_at']}" if running.get("observed_at") else None
        try:  # her key was made with the cluster's token: a key not live is an erasure's
            return self.names.seal(
                f"{row.cluster_id}/running", running, subject_ref=row.subject_ref, user_ref=row.user_ref, create=False
            )
        except (KeyringError, UnknownAccountError):
            return None

    def registered_by(self, cluster_id: str) -> str | None:
        """The id of the gateway token that registered a cluster (``None``: no gateway did, or erased)."""
        row = self._row(cluster_id)
        names = None if row is None else self.names.open(row.cluster_id, row.names, subject_ref=row.subject_ref)
        return None if names is None else names.get("registered_by")

    def find(self, cluster_id: str, *, of_account: str | None = None) -> FoundCluster | None:
        """Whose a cluster is and its token; ``None``: no such cluster (with ``of_account``, none of that
        account, told from its ref before any name is decrypted: as soon as for an unknown id)."""
        row = self._row(cluster_id)
        if row is None or (of_account is not None and row.subject_ref != self.pipeline.keyring.subject_ref(of_account)):
            return None
        names = self.names.open(row.cluster_id, row.names, subject_ref=row.subject_ref)
        owner = self.tokens.get(str(row.token_id)).user  # the registration bound it to the cluster's token
        return FoundCluster(None if names is None else names["account"], owner, str(row.token_id))

    def _shown(self, row: Any) -> dict[str, Any]:
        """A cluster's names as listed: its account (the account's key), its name and image (its owner's key,
        ``None`` once she is erased); which gateway token registered it is the operator's business."""
        names = self.names.open(row.cluster_id, row.names, subject_ref=row.subject_ref) or {}
        if row.owner_names is not None:
            owner = f"{row.cluster_id}/owner"
            names.update(
                self.names.open(owner, row.owner_names, subject_ref=row.subject_ref, user_ref=row.user_ref) or {}
            )
        return {k: names.get(k) for k in ("account", "name", "image")}

    def list(self, account: str | None = None, *, now: datetime | None = None) -> list[dict[str, Any]]:
        """Clusters of ``account`` (``None``: of every account), oldest first, with state and last contact."""
        now = now or utcnow()
        self.sweep(now=now)
        query = select(clusters).order_by(clusters.c.created_at)
        if account is not None:
            query = query.where(clusters.c.subject_ref == self.pipeline.keyring.subject_ref(account))
        with transaction(self.pipeline.keyring.engine, "listing clusters") as conn:
            rows = conn.execute(query).all()
        return [
            {
                "cluster_id": row.cluster_id,
                **self._shown(row),
                "state": "closed" if row.closed_at else "lost" if row.lost_at else "open",
                "created_at": row.created_at,
                "last_contact_at": row.last_contact_at,
                "closed_at": row.closed_at,
                "lost_at": row.lost_at,
            }
            for row in rows
        ]


#: a cluster's ``running`` with no job running, followed by its newest snapshot's time (a sealed value starts
#: with its key version, a digit)
_NONE_RUNNING = "none since "

#: the hot statements of admission, built once (building one costs more than running it)
_ROW = select(clusters).where(clusters.c.cluster_id == bindparam("id"))
_RECORDED_LOST = select(lost_jobs.c.record_id).where(
    lost_jobs.c.cluster_id == bindparam("id"), lost_jobs.c.record_id.in_(bindparam("records", expanding=True))
)


_ENDED = select(ended_jobs.c.record_id).where(
    ended_jobs.c.cluster_id == bindparam("id"), ended_jobs.c.record_id.in_(bindparam("records", expanding=True))
)

#: the cluster's row, held by a transaction recording its jobs lost until it ends, as a commit storing
#: an end holds it (its contact statement): one of the two settles each job. A write, not a SELECT FOR
#: UPDATE: SQLite has no row locks, and its driver begins no transaction for a read, so a read of the
#: jobs ended was taken while that commit ran; the write waits for it, and the reads after see it
_LOCK_CLUSTER = (
    update(clusters).where(clusters.c.cluster_id == bindparam("id")).values(cluster_id=clusters.c.cluster_id)
)

#: which of some (cluster id, record id) pairs name jobs recorded lost: a guard of admission (its ``ids``)
_RECORDED_LOST_PAIRS = select(lost_jobs.c.cluster_id, lost_jobs.c.record_id).where(
    tuple_(lost_jobs.c.cluster_id, lost_jobs.c.record_id).in_(bindparam("ids", expanding=True))
)


def _job_ends(cluster_id: str, batch: OpenedBatch) -> list[str]:
    """The ids a batch's job ends settle (their lost records' ids): none, or each once."""
    if "job" not in batch.by_kind:
        return []
    return sorted({_lost_record_id(cluster_id, job_id) for job_id in batch.by_kind["job"].column("job_id").to_pylist()})


def _ends_guard(cluster_id: str, ends: list[str]) -> Guard | None:
    """The jobs a batch ends (:func:`_job_ends`), checked again in the commit's transaction, after the cluster's
    row is locked: another process closing the cluster (or finding it lost) meanwhile records them lost
    (``None``: no end)."""
    return (_RECORDED_LOST_PAIRS, tuple((cluster_id, record_id) for record_id in ends)) if ends else None


def _lost_record_id(cluster_id: str, job_id: str) -> str:
    """The one record id of a cluster's job recorded lost, in the form of a random one (32 hex digits)."""
    return hashlib.sha256(f"{cluster_id}/{job_id}/lost".encode()).hexdigest()[:32]


_OPEN_CLUSTER = update(clusters).where(  # an ended one keeps its end, and its running jobs are recorded
    clusters.c.cluster_id == bindparam("id"), clusters.c.closed_at.is_(None), clusters.c.lost_at.is_(None)
)
#: the contact of an open cluster, and the running jobs its batch leaves
_CONTACT = _OPEN_CLUSTER.values(last_contact_at=bindparam("at"), running=bindparam("running"))
#: the contact alone, of a batch that says nothing of its jobs: its running ones stand
_HEARD = _OPEN_CLUSTER.values(last_contact_at=bindparam("at"))


def _running_after(running: dict[str, Any], batch: OpenedBatch) -> tuple[dict[str, Any], dict[str, Any]]:
    """The running jobs after a batch: its newest snapshot's, less the jobs it reports ended; and the
    jobs that vanished, as last reported (``observed_at`` and ``jobs``, as the running ones).

    A job vanishes when a newer snapshot no longer lists it and no end record came for it: its
    scheduler was killed and started again with the same cluster (the new one knows nothing of
    it), or the batch with its end was refused. A plugin sends a job's end before the first
    snapshot without it. A snapshot older than the one kept (a batch delivered late) changes
    nothing. Only the newest snapshot is read into Python: a batch holds dozens.
    """
    jobs: dict[str, Any] = dict(running.get("jobs", {}))
    newest = running.get("observed_at", "")
    vanished: dict[str, Any] = {"observed_at": newest, "jobs": {}}
    tables = batch.by_kind
    snapshots = tables.get("cluster_snapshot")
    if snapshots is not None and snapshots.num_rows:
        times = snapshots.column("observed_at")
        [snapshot] = rows_from_table(snapshots.slice(pc.index(times, pc.max(times)).as_py(), 1))
        observed_at = snapshot["observed_at"].isoformat()
        if observed_at > newest:
            newest = observed_at
            common = {k: snapshot[k] for k in ("account", "user", "cluster_id")}
            listed = {
                job["job_id"]: _jsonable({**common, "data_type": "cluster_jobs", "kind": "job", **job})
                for job in snapshot["jobs_running"] or ()
            }
            vanished["jobs"] = {job_id: job for job_id, job in jobs.items() if job_id not in listed}
            jobs = listed
    for ended in tables["job"].column("job_id").to_pylist() if "job" in tables else ():
        jobs.pop(ended, None)
        vanished["jobs"].pop(ended, None)
    return {"observed_at": newest, "jobs": jobs}, vanished


def _jsonable(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in job.items()}


def _from_json(job: dict[str, Any]) -> dict[str, Any]:
    times = ("observed_at", "started_at", "finished_at")
    return {k: datetime.fromisoformat(v) if k in times and v is not None else v for k, v in job.items()}


class LostClusterSweeper:
    """Notes that this ``serve`` listens and finds lost clusters, at once and then every quarter of
    ``cluster-lost-after`` (at most a minute), on a thread of its own, so their running jobs are recorded
    even when nobody lists clusters (``serve`` runs one; see :mod:`pipeline.server.listening`)."""

    def __init__(self, registry: ClusterRegistry) -> None:
        self.registry = registry
        self.period = sweep_period(registry.pipeline.settings.cluster_lost_after)
        self._holder = default_holder()
        self._stop = threading.Event()

    def run(self) -> None:
        while True:
            try:
                note_listening(self.registry.pipeline.keyring.engine, self._holder, utcnow(), self.registry._gap)
                self.registry.sweep()
            except Exception as exc:  # the database is down: the next round tries again
                logger.warning("could not look for lost clusters: %s", first_line(exc))
            if self._stop.wait(self.period):
                return

    def stop(self) -> None:
        self._stop.set()


class ClusterIn(BaseModel):
    """``POST /v1/clusters`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)  # each value of its own JSON type: no "yes" or 0 for a bool
    account: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    user: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)  # an admin's; a member owns theirs
    name: str | None = Field(default=None, max_length=200)
    image: str | None = Field(default=None, max_length=2000)


router = APIRouter(tags=["clusters"])


@router.post("/v1/clusters", status_code=201)
def register_cluster(
    body: ClusterIn,
    request: Request,
    principal: Annotated[Principal, Depends(require("member", "admin", "gateway"))],
) -> dict[str, Any]:
    """Register a cluster of the caller's account, owned by the caller (an admin or a gateway names the owner;
    an admin may name none): its id, cluster token, ingest URL, intake public key and TLS credentials (none
    for a gateway, whose clusters use its own TLS)."""
    gateway = principal.kind == "gateway"
    if not principal.may_register(body.account):
        raise HTTPException(403, f"a {principal.kind} token may not register clusters of this account")
    if not (principal.sees_every_account or gateway) and not (body.user is None or same(body.user, principal.user)):
        raise HTTPException(403, "a member registers clusters for themselves only; an admin may name another user")
    if body.user is not None and not body.user.strip():
        raise HTTPException(400, "user: must not be blank")
    if gateway and body.user is None:
        raise HTTPException(400, "user: a gateway names the user who started the cluster")
    user = body.user if principal.sees_every_account or gateway else principal.user
    ingest_url = str(request.base_url).rstrip("/")
    registry: ClusterRegistry = request.app.state.clusters
    registration = registry.register(
        body.account,
        ingest_url,
        user=user,
        name=body.name,
        image=body.image,
        gateway_token_id=principal.token_id if gateway else None,
    )
    return registration.as_dict()


@router.post("/v1/clusters/{cluster_id}/close", status_code=204)
def close_cluster(
    cluster_id: str,
    request: Request,
    principal: Annotated[Principal, Depends(require("cluster", "member", "admin", "gateway"))],
) -> Response:
    """Close a cluster and revoke its token: its own plugin (everything delivered), its owner, an admin,
    or the gateway token that registered it.

    Its jobs still running are recorded with ``status: lost``.
    """
    registry: ClusterRegistry = request.app.state.clusters
    member = principal.kind == "member"
    found = registry.find(cluster_id, of_account=principal.account if member or principal.kind == "cluster" else None)
    if principal.kind == "cluster" and principal.cluster_id != cluster_id and found is not None:
        raise HTTPException(403, "a cluster token may close its own cluster only")  # another account's: 404 below
    others = principal.kind == "gateway" and registry.registered_by(cluster_id) != principal.token_id
    if found is None or others or (member and (found.account is None or not principal.may_read(found.account))):
        raise HTTPException(404, f"no cluster {cluster_id!r} of yours")
    if member and (found.owner is None or not same(found.owner, principal.user)):
        raise HTTPException(403, "only the cluster's owner or an admin may close it")  # listed to the account
    registry.close(cluster_id, found.token_id, actor=principal.actor)
    return Response(status_code=204)


@router.get("/v1/clusters")
def list_clusters(
    request: Request, principal: Annotated[Principal, Depends(require("member", "admin"))]
) -> list[dict[str, Any]]:
    """Clusters of the caller's account (admin: of every account)."""
    account = None if principal.sees_every_account else principal.account
    registry: ClusterRegistry = request.app.state.clusters
    return registry.list(account)
