"""A cluster is open, closed or lost; its running jobs end with it (an injected clock moves time)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import dask.config
import pytest
from conftest import make_record
from sqlalchemy import func, select, text, update

from pipeline.config import Settings
from pipeline.db import clusters, ended_jobs, transaction
from pipeline.errors import ClusterLost, ForbiddenBatch, KeyringError
from pipeline.intake import OpenedBatch, load_public_key, seal_batch
from pipeline.records import tables_from_records, utcnow
from pipeline.runtime import Pipeline, PreparedBatch
from pipeline.server.auth import TokenStore
from pipeline.server.clusters import ClusterRegistry, Registration
from pipeline.server.listening import note_listening, sweep_period

LOST_AFTER = timedelta(minutes=10)  # the default of pipeline.server.cluster-lost-after


MICRO = timedelta(microseconds=1)


@pytest.fixture
def registry(home: Any) -> Iterator[ClusterRegistry]:
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    yield ClusterRegistry(pipeline)
    pipeline.close()


def batch(cluster: Registration, *records: dict[str, Any]) -> OpenedBatch:
    return OpenedBatch(f"b-{records[0]['record_id']}", tables_from_records(records))


def snapshot(cluster: Registration, at: datetime, **progress: int) -> dict[str, Any]:
    """A snapshot while one job (``job-1``) runs with these counts (none: no job running)."""
    running = [
        {
            "job_id": "job-1",
            "started_at": at - timedelta(seconds=30),
            "tasks_total": 10,
            "compute_seconds": 1.5,
            "peak_memory_bytes": 0,
            "task_prefixes": ["etl"],
            **progress,
        }
    ]
    return make_record(cluster_id=cluster.cluster_id, observed_at=at, jobs_running=running if progress else [])


def heard_from(registry: ClusterRegistry, cluster_id: str, batch: OpenedBatch, *, now: datetime) -> None:
    """Admit a batch and write its note of contact, as the group commit that writes it does."""
    _admitted, statements, _guard = registry.admit(cluster_id, batch, now=now)
    with transaction(registry.pipeline.keyring.engine, "noting a cluster's contact") as conn:
        for _key, statement, params in statements:
            conn.execute(statement, params)


def end_of_job_1_prepared(registry: ClusterRegistry) -> tuple[Registration, datetime, PreparedBatch]:
    """A cluster reported running job-1 (2 tasks done), when, and a batch with job-1's end prepared by the
    registry's pipeline (admitted, not committed)."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    principal = registry.tokens.authenticate(cluster.token)
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=2)), now=start)
    done = make_record("job", cluster_id=cluster.cluster_id, job_id="job-1", status="finished", observed_at=start)
    sealed = seal_batch(load_public_key(cluster.intake_public_key), "ends-job-1", [done])
    admit = functools.partial(registry.admit, cluster.cluster_id)
    return cluster, start, registry.pipeline.prepare_ingest(sealed, principal, admit=admit)


def jobs(registry: ClusterRegistry) -> list[dict[str, Any]]:
    return [r for r in registry.pipeline.read_records("long_term", account="acme") if r["kind"] == "job"]


def test_a_silent_cluster_is_lost_with_its_running_job_as_last_reported(registry: ClusterRegistry) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=2)), now=start)
    last = start + timedelta(seconds=5)
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, last, tasks_completed=6)), now=last)
    late = snapshot(cluster, start + timedelta(seconds=1), tasks_completed=3)  # delivered late: changes nothing
    heard_from(registry, cluster.cluster_id, batch(cluster, late), now=last)

    [open_] = registry.list(now=last + LOST_AFTER - timedelta(seconds=1))
    assert (open_["state"], open_["last_contact_at"]) == ("open", last)
    assert registry.sweep(now=last + LOST_AFTER) == [cluster.cluster_id]
    [lost] = registry.list(now=last + LOST_AFTER + timedelta(hours=1))
    assert (lost["state"], lost["lost_at"], lost["last_contact_at"]) == ("lost", last + LOST_AFTER, last)
    [job] = jobs(registry)
    assert (job["status"], job["tasks_total"], job["tasks_completed"], job["finished_at"]) == ("lost", 10, 6, None)
    assert (job["job_id"], job["task_prefixes"], job["observed_at"]) == ("job-1", ["etl"], last)  # as last reported
    assert registry.sweep(now=last + LOST_AFTER * 3) == []  # lost once
    assert len(jobs(registry)) == 1

    # its token may still deliver what it observed before the loss (spool replay), nothing newer
    before = snapshot(cluster, last + LOST_AFTER - timedelta(seconds=1))
    heard_from(registry, cluster.cluster_id, batch(cluster, before), now=last + LOST_AFTER * 2)
    after = snapshot(cluster, last + LOST_AFTER + timedelta(seconds=1))
    with pytest.raises(ForbiddenBatch, match="was lost at .* register the cluster again"):
        heard_from(registry, cluster.cluster_id, batch(cluster, after), now=last + LOST_AFTER * 2)
    assert registry.list()[0]["last_contact_at"] == last  # a lost cluster stays lost


def test_a_batch_that_says_nothing_of_jobs_notes_the_contact_and_leaves_the_running_jobs_as_sealed(
    registry: ClusterRegistry,
) -> None:
    """Every batch opened the cluster's running jobs and sealed them again: with 10,000 running, each
    environment batch of 2 KB cost 0.3 s inside the group commit that other accounts' batches share."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=2)), now=start)
    sealed = registry._row(cluster.cluster_id).running
    environment = make_record("software_env", cluster_id=cluster.cluster_id, observed_at=start, env_id="e1")
    later = start + timedelta(seconds=5)
    heard_from(registry, cluster.cluster_id, batch(cluster, environment), now=later)
    row = registry._row(cluster.cluster_id)
    assert (row.running, row.last_contact_at) == (sealed, later)
    assert registry.sweep(now=start + LOST_AFTER) == []  # heard from later: not lost
    registry.sweep(now=later + LOST_AFTER)
    [job] = jobs(registry)
    assert (job["job_id"], job["status"], job["tasks_completed"]) == ("job-1", "lost", 2)


def test_a_cluster_heard_of_after_its_silence_is_lost_without_a_sweep(registry: ClusterRegistry) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=1)), now=start)
    now = start + LOST_AFTER * 2
    with pytest.raises(ForbiddenBatch):
        heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, now)), now=now)
    assert [j["status"] for j in jobs(registry)] == ["lost"]


def test_closing_a_cluster_revokes_its_token_and_records_its_running_job_lost(registry: ClusterRegistry) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    now = utcnow()
    finished = make_record("job", cluster_id=cluster.cluster_id, job_id="job-0", status="finished", observed_at=now)
    heard_from(
        registry, cluster.cluster_id, batch(cluster, snapshot(cluster, now, tasks_completed=4), finished), now=now
    )
    registry.close(cluster.cluster_id, cluster.token_id, now=now + timedelta(minutes=1))
    [closed] = registry.list()
    assert (closed["state"], closed["closed_at"]) == ("closed", now + timedelta(minutes=1))
    assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 4)]
    assert TokenStore(registry.pipeline).list()[-1].revoked_at is not None
    for _ in range(3):  # idempotent: nothing recorded or audited twice
        registry.close(cluster.cluster_id, cluster.token_id)
    assert len(jobs(registry)) == 1
    audited = [e.action for e in registry.pipeline.audit.entries() if e.action in ("cluster.closed", "token.revoked")]
    assert sorted(audited) == ["cluster.closed", "token.revoked"]


def test_a_job_that_finished_is_not_recorded_lost(registry: ClusterRegistry) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    now = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, now, tasks_completed=4)), now=now)
    done = make_record("job", cluster_id=cluster.cluster_id, job_id="job-1", status="finished", observed_at=now)
    heard_from(registry, cluster.cluster_id, batch(cluster, done), now=now)
    with dask.config.set({"pipeline.server.cluster-lost-after": "1m"}):
        short = Pipeline.open(Settings.from_config())
        assert ClusterRegistry(short).sweep(now=now + timedelta(minutes=1)) == [cluster.cluster_id]
        short.close()
    assert jobs(registry) == []


def test_a_cluster_never_heard_of_stays_open_until_its_token_expires(registry: ClusterRegistry) -> None:
    """Its files may wait for their hosts: only silence after contact makes a cluster lost. Once its token
    expired it can never deliver, and it was listed open for good."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    assert registry.sweep(now=utcnow() + LOST_AFTER * 100) == []
    assert [c["state"] for c in registry.list(now=utcnow() + LOST_AFTER * 100)] == ["open"]
    assert cluster.expires_at is not None
    expired = cluster.expires_at + timedelta(seconds=1)
    registry.sweep(now=expired)
    [listed] = registry.list(now=expired)
    assert (listed["state"], listed["closed_at"], listed["last_contact_at"]) == ("closed", cluster.expires_at, None)
    assert ends(registry) == ["cluster.closed"]


def ends(registry: ClusterRegistry) -> list[str]:
    return [e.action for e in registry.pipeline.audit.entries() if e.action in ("cluster.lost", "cluster.closed")]


def test_two_processes_ending_one_cluster_at_once_end_it_and_record_its_job_once(registry: ClusterRegistry) -> None:
    """Two ``serve`` processes each read the cluster open (a sweep in each, or a sweep and the plugin's
    close), then each ends it: one ends it, records the running job and audits; the other does nothing."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=2)), now=start)
    other = Pipeline.open(Settings.from_config())
    try:
        row = registry._row(cluster.cluster_id)  # read open by both before either ends it
        registry._end(row, "lost", start + LOST_AFTER)
        ClusterRegistry(other)._end(row, "closed", start + LOST_AFTER + timedelta(seconds=1))
    finally:
        other.close()
    assert ends(registry) == ["cluster.lost"]
    assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 2)]
    assert registry.list(now=start + LOST_AFTER * 2)[0]["state"] == "lost"


@pytest.mark.parametrize("end", ["closed", "lost"])
def test_a_job_ended_in_a_batch_committed_after_another_process_ended_its_cluster_is_stored_once(
    database: str, end: str
) -> None:
    """Two ``serve`` replicas: one admits the batch with job-1's end, the other closes the cluster (or finds
    it lost) and records job-1 lost, then the first commits. The job is stored once, as the end recorded it;
    before, it was stored twice, ``lost`` and ``finished``."""
    plane, other = Pipeline.open(Settings.from_config(), create=True), Pipeline.open(Settings.from_config())
    try:
        registry = ClusterRegistry(plane)
        cluster, start, prepared = end_of_job_1_prepared(registry)
        ending = ClusterRegistry(other)
        ending._end(ending._row(cluster.cluster_id), end, start + timedelta(seconds=1))
        assert plane.commit_ingest(prepared).duplicate is False

        assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 2)]
        assert [r["status"] for r in plane.read_records("cloud_logging", account="acme") if r["kind"] == "job"] == [
            "lost"
        ]
        [dropped] = [e for e in plane.audit.entries() if e.action == "ingest.dropped"]
        assert dropped.details["records"] == 1
    finally:
        other.close()
        plane.close()


def test_a_batch_admitted_again_after_its_cluster_was_found_lost_is_refused_alone(registry: ClusterRegistry) -> None:
    """Admitted while the cluster was open; another process found it lost before the commit, as of a time
    before the batch's newest record: admitted again, the batch is refused as it would have been at once."""
    pipeline = registry.pipeline
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=2)), now=start)
    later = start + timedelta(seconds=2)
    done = make_record("job", cluster_id=cluster.cluster_id, job_id="job-1", status="finished", observed_at=later)
    sealed = seal_batch(load_public_key(cluster.intake_public_key), "ends-job-1", [done])
    principal = registry.tokens.authenticate(cluster.token)
    prepared = pipeline.prepare_ingest(sealed, principal, admit=functools.partial(registry.admit, cluster.cluster_id))
    registry._end(registry._row(cluster.cluster_id), "lost", start + timedelta(seconds=1))
    with pytest.raises(ClusterLost, match="ends-job-1 refused"):
        pipeline.commit_ingest(prepared)
    assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 2)]


def test_running_jobs_left_by_a_process_stopped_mid_end_are_recorded_by_the_next_sweep(
    registry: ClusterRegistry,
) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=3)), now=start)
    with transaction(registry.pipeline.keyring.engine, "ending as a stopped process did") as conn:
        conn.execute(update(clusters).where(clusters.c.cluster_id == cluster.cluster_id).values(closed_at=start))
    assert jobs(registry) == []  # stopped after marking the cluster, before recording its job
    registry.sweep(now=start + timedelta(seconds=1))  # too soon: the process ending it may be at it now
    assert jobs(registry) == []
    assert registry.sweep(now=start + LOST_AFTER) == []  # not lost: it was closed
    assert [(j["status"], j["tasks_completed"], j["observed_at"]) for j in jobs(registry)] == [("lost", 3, start)]
    registry.sweep(now=start + LOST_AFTER * 2)
    assert len(jobs(registry)) == 1  # recorded once


def test_running_jobs_recorded_by_a_process_stopped_before_clearing_them_are_not_recorded_again(
    registry: ClusterRegistry,
) -> None:
    """The process that ended the cluster wrote its running job as lost, then stopped before clearing
    it from the cluster's row: the next sweep finds the job still there and writes it again."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=3)), now=start)
    running = registry._row(cluster.cluster_id).running
    registry.close(cluster.cluster_id, cluster.token_id, now=start)
    with transaction(registry.pipeline.keyring.engine, "leaving the running jobs as a stopped process did") as conn:
        conn.execute(update(clusters).where(clusters.c.cluster_id == cluster.cluster_id).values(running=running))
    registry.sweep(now=start + LOST_AFTER)
    assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 3)]
    assert registry._row(cluster.cluster_id).running is None


def test_two_sweeps_finding_one_stranded_cluster_record_its_job_once(registry: ClusterRegistry) -> None:
    """Two ``serve`` processes' sweeps read the same ended cluster with its jobs not yet recorded, and
    each records them: the second writes what the first wrote, and nothing is stored twice."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=5)), now=start)
    with transaction(registry.pipeline.keyring.engine, "ending as a stopped process did") as conn:
        conn.execute(update(clusters).where(clusters.c.cluster_id == cluster.cluster_id).values(closed_at=start))
    row = registry._row(cluster.cluster_id)  # read stranded by both sweeps before either records it
    other = Pipeline.open(Settings.from_config())
    try:
        assert registry._record_lost_jobs(row, start) == 1
        assert ClusterRegistry(other)._record_lost_jobs(row, start) == 1
    finally:
        other.close()
    assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 5)]
    logged = [r for r in registry.pipeline.read_records("cloud_logging", account="acme") if r["kind"] == "job"]
    assert [(j["status"], j["tasks_completed"]) for j in logged] == [("lost", 5)]


def listened(registry: ClusterRegistry, start: datetime, end: datetime) -> None:
    """A ``serve`` noting every sweep period from ``start`` to ``end`` that it listens (as its sweeper does)."""
    step = timedelta(seconds=sweep_period(registry.pipeline.settings.cluster_lost_after))
    at = start
    while at < end:
        note_listening(registry.pipeline.keyring.engine, "serve", at, registry._gap)
        at += step
    note_listening(registry.pipeline.keyring.engine, "serve", end, registry._gap)


def test_an_outage_of_the_control_plane_longer_than_lost_after_loses_no_live_cluster(registry: ClusterRegistry) -> None:
    """Nothing is heard while no ``serve`` listens: silence counts from its restart, and the batches the
    plugin spooled meanwhile are taken, not refused as observed after a loss."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    listened(registry, start, start)
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=1)), now=start)
    restart = start + LOST_AFTER * 6  # serve was down since just after start
    assert registry.list(now=restart)[0]["state"] == "open"  # `clusters list` during the outage finds none lost
    listened(registry, restart, restart + timedelta(seconds=1))
    assert registry.sweep(now=restart + timedelta(seconds=1)) == []
    spooled = snapshot(cluster, start + LOST_AFTER * 3, tasks_completed=5)  # observed while serve was down
    heard_from(registry, cluster.cluster_id, batch(cluster, spooled), now=restart + timedelta(seconds=2))
    assert registry.list(now=restart + timedelta(seconds=3))[0]["state"] == "open"
    assert jobs(registry) == []

    later = restart + timedelta(seconds=2) + LOST_AFTER  # then silent while serve listens: lost
    listened(registry, restart, later)
    assert registry.sweep(now=later) == [cluster.cluster_id]
    [lost] = registry.list(now=later)
    assert (lost["state"], lost["lost_at"]) == ("lost", later)
    assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("lost", 5)]


def test_a_cluster_silent_since_before_an_outage_is_lost_a_full_lost_after_past_the_restart(
    registry: ClusterRegistry,
) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    listened(registry, start, start)
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start)), now=start)
    restart = start + LOST_AFTER * 6
    too_soon = restart + LOST_AFTER - timedelta(seconds=1)
    listened(registry, restart, too_soon)
    assert registry.sweep(now=too_soon) == []
    listened(registry, too_soon, restart + LOST_AFTER)
    assert registry.sweep(now=restart + LOST_AFTER) == [cluster.cluster_id]
    assert registry.list(now=restart + LOST_AFTER)[0]["lost_at"] == restart + LOST_AFTER


def test_a_late_batch_of_a_closed_cluster_is_stored_and_leaves_the_cluster_as_it_ended(
    registry: ClusterRegistry,
) -> None:
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start)), now=start)
    registry.close(cluster.cluster_id, cluster.token_id, now=start + timedelta(seconds=5))
    replayed = snapshot(cluster, start + timedelta(seconds=1), tasks_completed=1)  # a spool replayed after close
    assert registry.admit(cluster.cluster_id, batch(cluster, replayed), now=start + timedelta(seconds=9))[1] == ()
    registry.sweep(now=start + timedelta(seconds=10))
    [closed] = registry.list()
    assert (closed["state"], closed["last_contact_at"]) == ("closed", start)
    assert jobs(registry) == []  # its progress names no job left running


def test_a_batch_of_a_closed_cluster_observed_after_its_close_is_refused(registry: ClusterRegistry) -> None:
    """A request authenticated before the close, its body trickled in after (within the body timeout, for
    as long as it liked), wrote records observed after the close: the closed cluster's token still wrote."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start)), now=start)
    closed_at = start + timedelta(seconds=5)
    registry.close(cluster.cluster_id, cluster.token_id, now=closed_at)
    after = make_record("job", cluster_id=cluster.cluster_id, job_id="after-close", observed_at=closed_at + MICRO)
    with pytest.raises(ForbiddenBatch, match="was closed at .* and this batch was observed after"):
        registry.admit(cluster.cluster_id, batch(cluster, after), now=closed_at + timedelta(minutes=1))


@pytest.mark.parametrize("suppress", [False, True])
@pytest.mark.parametrize("end", ["closed", "lost"])
def test_a_running_job_of_a_user_erased_since_does_not_come_back_when_the_cluster_ends(
    registry: ClusterRegistry, end: str, suppress: bool
) -> None:
    """The job was reported before ann's erasure; her cluster's end would have written it back, with her name."""
    from pipeline.retention.requests import file_request, process_pending

    cluster = registry.register("acme", "http://control-plane.invalid", user="ann")
    start = utcnow()
    report = snapshot(cluster, start, tasks_completed=3) | {"user": "ann"}
    report["jobs_running"][0]["task_prefixes"] = ["ann_medical_etl"]
    heard_from(registry, cluster.cluster_id, batch(cluster, report), now=start)
    file_request(registry.pipeline, "acme", "ann", suppress=suppress)
    [done] = process_pending(registry.pipeline)
    assert done.state == "completed", done.error
    if end == "closed":
        registry.close(cluster.cluster_id, cluster.token_id, now=start + timedelta(minutes=1))
    else:
        registry.sweep(now=start + LOST_AFTER * 2)
    assert registry.list(now=start + LOST_AFTER * 2)[0]["state"] == end
    for store in registry.pipeline.stores:
        assert [r for r in registry.pipeline.read_records(store, account="acme") if r["kind"] == "job"] == []


def test_an_erasure_shreds_the_running_jobs_of_a_cluster_that_runs_on(registry: ClusterRegistry) -> None:
    """The cluster row keeps its running jobs, with ann's name and her functions' prefixes, until the
    cluster ends; sealed under the account's key, they stayed readable after her erasure (by anyone
    holding the database and the account's key, which her erasure leaves alive)."""
    from pipeline.retention.requests import file_request, process_pending

    cluster = registry.register("acme", "http://control-plane.invalid", user="ann")
    start = utcnow()
    report = snapshot(cluster, start, tasks_completed=3) | {"user": "ann"}
    report["jobs_running"][0]["task_prefixes"] = ["ann_medical_etl"]
    heard_from(registry, cluster.cluster_id, batch(cluster, report), now=start)
    row = registry._row(cluster.cluster_id)
    assert [job["user"] for job in registry._running(row)["jobs"].values()] == ["ann"]
    file_request(registry.pipeline, "acme", "ann")
    [done] = process_pending(registry.pipeline)
    assert done.state == "completed", done.error
    row = registry._row(cluster.cluster_id)
    assert registry._running(row) == {}
    assert _opened_with_the_account_key(registry, row) is None  # alive, it does not open them either
    later = snapshot(cluster, start + timedelta(seconds=5), tasks_completed=4) | {"user": "ann"}
    heard_from(registry, cluster.cluster_id, batch(cluster, later), now=start + timedelta(seconds=5))
    assert registry._row(cluster.cluster_id).running is None  # nothing of hers is sealed again


def test_a_job_of_a_scheduler_killed_and_started_again_is_recorded_lost_as_last_reported(
    registry: ClusterRegistry,
) -> None:
    """The new scheduler (same ``scheduler.yaml``) knows nothing of the old one's job: its first snapshot
    replaced the running set, and the job was never recorded, neither lost nor finished."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, start, tasks_completed=12)), now=start)
    restarted = start + timedelta(seconds=30)
    second = snapshot(cluster, restarted, tasks_completed=1)
    second["jobs_running"][0]["job_id"] = "job-2"  # the new scheduler's own job
    heard_from(registry, cluster.cluster_id, batch(cluster, second), now=restarted)
    assert [(j["job_id"], j["status"], j["tasks_completed"], j["observed_at"]) for j in jobs(registry)] == [
        ("job-1", "lost", 12, start)
    ]
    registry.close(cluster.cluster_id, cluster.token_id, now=restarted + timedelta(seconds=1))  # the same day
    assert sorted((j["job_id"], j["status"]) for j in jobs(registry)) == [("job-1", "lost"), ("job-2", "lost")]


def test_two_schedulers_started_with_one_clusters_files_record_a_job_lost_once(registry: ClusterRegistry) -> None:
    """Scheduler A runs job-1, scheduler B (same ``scheduler.yaml``) runs nothing: their snapshots alternate.
    The job was running, lost, running again and lost again, written each time with other counts: the logging
    store held eight records of one id, the long-term store one."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    for n in range(4):
        at = start + timedelta(seconds=10 * n)
        heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, at, tasks_completed=n + 1)), now=at)
        idle = at + timedelta(seconds=5)
        heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, idle)), now=idle)
    registry.close(cluster.cluster_id, cluster.token_id, now=start + timedelta(minutes=1))
    logged = [r for r in registry.pipeline.read_records("cloud_logging", account="acme") if r["kind"] == "job"]
    assert [(j["job_id"], j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("job-1", "lost", 1)]
    assert [(j["job_id"], j["status"], j["tasks_completed"]) for j in logged] == [("job-1", "lost", 1)]


def test_a_job_that_ends_is_never_recorded_lost_when_the_next_snapshot_omits_it(registry: ClusterRegistry) -> None:
    """The plugin sends a job's end before the first snapshot without it: in an earlier batch, or the same."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    for n, together in enumerate((False, True)):
        at = start + timedelta(minutes=n)
        heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, at, tasks_completed=3)), now=at)
        end = make_record("job", cluster_id=cluster.cluster_id, job_id="job-1", status="finished", observed_at=at)
        later = snapshot(cluster, at + timedelta(seconds=5))
        if together:
            heard_from(registry, cluster.cluster_id, batch(cluster, end, later), now=at)
        else:
            heard_from(registry, cluster.cluster_id, batch(cluster, end), now=at)
            heard_from(registry, cluster.cluster_id, batch(cluster, later), now=at)
    assert jobs(registry) == []


@contextlib.contextmanager
def _two_replicas() -> Iterator[tuple[Pipeline, Pipeline, ClusterRegistry, ClusterRegistry, Registration, Any]]:
    """Two ``serve`` replicas of the configured home and database, their registries, a cluster registered with the
    first and its principal."""
    plane, other = Pipeline.open(Settings.from_config(), create=True), Pipeline.open(Settings.from_config())
    try:
        here = ClusterRegistry(plane)
        cluster = here.register("acme", "http://control-plane.invalid")
        yield plane, other, here, ClusterRegistry(other), cluster, here.tokens.authenticate(cluster.token)
    finally:
        other.close()
        plane.close()


@pytest.mark.parametrize(
    "race", ["a late copy of a snapshot", "the ends of two jobs on two replicas", "a late copy after a loss"]
)
def test_a_job_settled_while_another_replica_admits_from_the_row_before_is_stored_once(
    database: str, race: str
) -> None:
    """Two ``serve`` replicas admit batches of one cluster from its row as each read it, and the later commit's
    running jobs stand: a late copy of an older snapshot, or the end of another job, listed a job running again
    after its end was stored. The next snapshot then recorded it lost too (r21, r22): stored twice."""
    with _two_replicas() as (plane, other, here, there, cluster, principal):
        start = utcnow()

        def prepared(replica: Pipeline, registry: ClusterRegistry, name: str, *records: dict[str, Any]) -> Any:
            sealed = seal_batch(load_public_key(cluster.intake_public_key), name, list(records))
            return replica.prepare_ingest(
                sealed, principal, admit=functools.partial(registry.admit, cluster.cluster_id)
            )

        def running(seconds: int, *job_ids: str) -> dict[str, Any]:
            at = start + timedelta(seconds=seconds)
            listed = [{"job_id": j, "started_at": start, "tasks_total": 10, "tasks_completed": 2} for j in job_ids]
            return make_record(cluster_id=cluster.cluster_id, observed_at=at, jobs_running=listed)

        def ended(seconds: int, job_id: str) -> dict[str, Any]:
            at = start + timedelta(seconds=seconds)
            return make_record("job", cluster_id=cluster.cluster_id, job_id=job_id, status="finished", observed_at=at)

        if race == "a late copy of a snapshot":
            plane.commit_ingest(prepared(plane, here, "s0", running(0, "job-1")))
            late = prepared(other, there, "s1", running(1, "job-1"))  # admitted from the row: job-1 running
            plane.commit_ingest(prepared(plane, here, "end", ended(2, "job-1"), running(3)))
            other.commit_ingest(late)  # its running jobs stand: job-1 again, as of second 1
        elif race == "a late copy after a loss":  # r28: job-1 recorded lost, then lost again with job-2
            plane.commit_ingest(prepared(plane, here, "s0", running(0, "job-1", "job-2")))
            late = prepared(other, there, "s1", running(1, "job-1", "job-2"))
            plane.commit_ingest(prepared(plane, here, "s2", running(2, "job-2")))  # job-1 vanished: lost
            other.commit_ingest(late)  # job-1 listed running again: lost again below, with job-2
        else:
            plane.commit_ingest(prepared(plane, here, "s0", running(0, "job-1", "job-2")))
            first = prepared(plane, here, "end-1", ended(1, "job-1"))  # both read job-1 and job-2 running
            second = prepared(other, there, "end-2", ended(1, "job-2"))
            plane.commit_ingest(first)
            other.commit_ingest(second)  # its running jobs stand: job-1, whose end is stored
        plane.commit_ingest(prepared(plane, here, "s4", running(4)))  # job-1 no longer listed
        assert _ended_noted(plane) == {"a late copy of a snapshot": 1, "the ends of two jobs on two replicas": 2}.get(
            race, 0
        )
        here.close(cluster.cluster_id, cluster.token_id, now=start + timedelta(seconds=5))
        assert _ended_noted(plane) == 0  # kept while the cluster runs, no longer

        stored = sorted((j["job_id"], j["status"]) for j in jobs(here))
        assert (
            stored
            == {
                "a late copy of a snapshot": [("job-1", "finished")],
                "the ends of two jobs on two replicas": [("job-1", "finished"), ("job-2", "finished")],
                "a late copy after a loss": [("job-1", "lost"), ("job-2", "lost")],
            }[race]
        )


def test_a_job_ended_in_a_commit_under_way_is_not_recorded_lost_by_a_snapshot_admitted_meanwhile(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite (one ``serve``), a newer snapshot admitted while the commit storing a job's end ran read the
    jobs ended before that commit, then recorded the job lost too (r28): a row lock SQLite does not have."""
    import threading
    import time

    pipeline = Pipeline.open(Settings.from_config(), create=True)
    try:
        registry = ClusterRegistry(pipeline)
        cluster, start, prepared = end_of_job_1_prepared(registry)
        logging_store, writing = pipeline.stores["cloud_logging"], threading.Event()
        write = logging_store.write

        def slow_write(segments: Any) -> Any:  # in the commit's transaction, as a Cloud Logging call is
            writing.set()
            time.sleep(1)
            return write(segments)

        monkeypatch.setattr(logging_store, "write", slow_write)
        committing = threading.Thread(target=pipeline.commit_ingest, args=(prepared,))
        committing.start()
        assert writing.wait(30)
        later = start + timedelta(seconds=5)  # no job running: job-1 vanished, unless its end is seen
        heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, later)), now=later)
        committing.join(30)
        assert [(j["status"], j["tasks_completed"]) for j in jobs(registry)] == [("finished", None)]
    finally:
        pipeline.close()


def test_an_end_committed_after_its_cluster_ended_leaves_no_note_behind(registry: ClusterRegistry) -> None:
    """Admitted while the cluster was open, committed after its end had cleared the cluster's notes of jobs
    ended: the note was left for good (r28)."""
    cluster = registry.register("acme", "http://control-plane.invalid")
    start = utcnow()
    done = make_record("job", cluster_id=cluster.cluster_id, job_id="job-1", status="finished", observed_at=start)
    _admitted, statements, _guard = registry.admit(cluster.cluster_id, batch(cluster, done), now=start)
    registry.close(cluster.cluster_id, cluster.token_id, now=start + timedelta(seconds=1))
    with transaction(registry.pipeline.keyring.engine, "committing the batch") as conn:
        for _key, statement, params in statements:
            conn.execute(statement, params)
    assert _ended_noted(registry.pipeline) == 0


def _ended_noted(pipeline: Pipeline) -> int:
    with pipeline.keyring.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(ended_jobs)).scalar_one()


def _opened_with_the_account_key(registry: ClusterRegistry, row: Any) -> dict[str, Any] | None:
    """The running jobs as the account's key opens them, at the version they name (``None``: it does not)."""
    from pipeline.server.names import NameBox

    version = int(row.running.partition(":")[0])
    try:
        return NameBox(registry.pipeline.keyring).open_at(
            f"{row.cluster_id}/running", row.running, subject_ref=row.subject_ref, user_ref=None, live_version=version
        )
    except KeyringError:
        return None


def test_an_owners_erasure_shreds_her_clusters_name_and_image_and_keeps_its_account(registry: ClusterRegistry) -> None:
    """The name and image were sealed under the account's key: after ann's erasure every member of acme
    still listed "ann-secret-project" and her image."""
    from pipeline.retention.requests import file_request, process_pending

    registry.register("acme", "http://control-plane.invalid", user="ann", name="ann-secret-project", image="ann/img:1")
    registry.register("acme", "http://control-plane.invalid", name="shared", image="team/img:2")  # the account's
    shown = [(c["account"], c["name"], c["image"]) for c in registry.list("acme")]
    assert shown == [("acme", "ann-secret-project", "ann/img:1"), ("acme", "shared", "team/img:2")]
    file_request(registry.pipeline, "acme", "ann")
    [done] = process_pending(registry.pipeline)
    assert done.state == "completed", done.error
    shown = [(c["account"], c["name"], c["image"]) for c in registry.list("acme")]
    assert shown == [("acme", None, None), ("acme", "shared", "team/img:2")]


def test_a_registration_whose_credentials_fail_leaves_no_open_cluster_or_token(
    registry: ClusterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS credentials were made last: a failure there (a validity past the year 9999 was one) left an
    open cluster, never heard of, and an active cluster token nobody received."""
    from pipeline.server import clusters

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(clusters, "issue_credentials", failing)
    with pytest.raises(OverflowError):
        registry.register("acme", "http://control-plane.invalid")
    assert registry.list() == []
    assert [t for t in registry.tokens.list() if t.kind == "cluster"] == []


def test_a_group_whose_ends_name_more_jobs_than_one_query_takes_is_checked_in_parts(pipeline: Pipeline) -> None:
    """Seven batches of 5,000 job ends in one group were 70,000 parameters in one query, over PostgreSQL's
    65,535: the whole group failed, other accounts' batches with it."""
    from pipeline.db import insert_ignoring_duplicates, lost_jobs
    from pipeline.runtime import PreparedBatch, _stale_admissions
    from pipeline.server.clusters import _RECORDED_LOST_PAIRS, _lost_record_id

    pairs = tuple(("c-1", _lost_record_id("c-1", f"job-{n}")) for n in range(40_000))
    ends, other = (
        PreparedBatch("s", "b-1", 0, [], guards=((_RECORDED_LOST_PAIRS, pairs),)),
        PreparedBatch("s", "b-2", 0, []),
    )
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(
            insert_ignoring_duplicates(pipeline.keyring.engine, lost_jobs),
            [dict(zip(("cluster_id", "record_id"), pairs[-1], strict=True))],
        )
        assert _stale_admissions(conn, [ends, other]) == {id(ends)}


def test_a_lost_jobs_end_sent_again_and_again_is_audited_a_hundred_times_an_hour_then_counted(
    registry: ClusterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch carrying the end of a job recorded lost added an ``ingest.dropped`` entry: a cluster's code
    sending it at the rate limit grew the trail every ``audit verify`` and report walks, 1.6 M entries a day."""
    from pipeline import ingest_tally

    monkeypatch.setattr(ingest_tally, "REFUSALS_AUDITED_PER_HOUR", 3)
    cluster = registry.register("acme", "http://control-plane.invalid")
    now = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, now, tasks_completed=4)), now=now)
    registry.close(cluster.cluster_id, cluster.token_id, now=now + timedelta(minutes=1))
    for n in range(5):
        done = make_record("job", cluster_id=cluster.cluster_id, job_id="job-1", status="finished", observed_at=now)
        heard_from(registry, cluster.cluster_id, batch(cluster, done), now=now + timedelta(minutes=2, seconds=n))
    pipeline = registry.pipeline
    assert len(list(pipeline.audit.entries(actions=["ingest.dropped"]))) == 3
    pipeline._ingest_tally.summarise(final=True)
    [summary] = [e.details for e in pipeline.audit.entries(actions=["ingest.summary"])]
    assert summary["dropped_not_audited"] == {cluster.cluster_id: 2}


def test_jobs_recorded_lost_and_dropped_by_an_open_erasure_are_audited_within_the_clusters_share(
    registry: ClusterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an erasure of its account was open, each snapshot naming a new job in place of the last one made
    the control plane record that job lost, which the tombstone dropped: one ``ingest.dropped`` entry a batch,
    past the cluster's hourly share (r24: 1,589 in one hour)."""
    from pipeline import ingest_tally
    from pipeline.retention.requests import file_request

    monkeypatch.setattr(ingest_tally, "REFUSALS_AUDITED_PER_HOUR", 3)
    cluster = registry.register("acme", "http://control-plane.invalid")
    now = utcnow()
    heard_from(registry, cluster.cluster_id, batch(cluster, snapshot(cluster, now, tasks_completed=1)), now=now)
    file_request(registry.pipeline, "acme")
    for n in range(1, 6):
        at = now + timedelta(seconds=n)
        job = {"job_id": f"job-{n + 1}", "started_at": now, "tasks_total": 10, "tasks_completed": 1}
        record = make_record(cluster_id=cluster.cluster_id, observed_at=at, jobs_running=[job])
        heard_from(registry, cluster.cluster_id, batch(cluster, record), now=at)
    pipeline = registry.pipeline
    dropped = [e.details for e in pipeline.audit.entries(actions=["ingest.dropped"])]
    assert len(dropped) == 3 and all(d["written_as"].startswith("lost-jobs/") for d in dropped)
    pipeline._ingest_tally.summarise(final=True)
    [summary] = [e.details for e in pipeline.audit.entries(actions=["ingest.summary"])]
    assert summary["dropped_not_audited"] == {cluster.cluster_id: 2}
    assert summary["records_dropped_not_audited"] == {cluster.cluster_id: 2}


def test_a_copy_of_a_batch_another_replica_takes_meanwhile_is_written_to_no_store(home: Any, postgres_url: str) -> None:
    """Two ``serve`` replicas on one PostgreSQL, each given a copy of one batch id whose records differ (a
    cluster's code seals what it likes): the later commit learnt that the other had taken the id only after it
    had written its copy to the logging store, which then held both copies, the long-term store one (r36)."""
    with dask.config.set({"pipeline.long-term.url": postgres_url}), _two_replicas() as replicas:
        plane, other, here, there, cluster, principal = replicas
        start = utcnow()

        def copy(seconds: int) -> bytes:
            record = snapshot(cluster, start + timedelta(seconds=seconds))
            return seal_batch(load_public_key(cluster.intake_public_key), "b-1", [record])

        late = other.prepare_ingest(copy(1), principal, admit=functools.partial(there.admit, cluster.cluster_id))
        with plane.keyring.engine.connect() as blocker, ThreadPoolExecutor(1) as committer:
            # the cluster's row, which the late copy's commit locks to note the contact, held: it waits there,
            # after it found the batch id free
            blocker.execute(select(clusters).where(clusters.c.cluster_id == cluster.cluster_id).with_for_update())
            pid = blocker.execute(select(func.pg_backend_pid())).scalar()
            answer = committer.submit(other.commit_ingest, late)
            blocked = text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
            with plane.keyring.engine.connect() as watcher:
                for _ in range(500):
                    if watcher.execute(blocked, {"pid": pid}).scalar():
                        break
                    time.sleep(0.01)
                else:
                    pytest.fail("the late copy's commit never waited for the cluster's row")
            assert not plane.ingest(copy(2), principal).duplicate  # the other replica takes the batch id meanwhile
            blocker.rollback()
            assert answer.result(timeout=60).duplicate
        for store in ("long_term", "cloud_logging"):
            stored = [r["observed_at"] for r in plane.read_records(store)]
            assert stored == [start + timedelta(seconds=2)], store
