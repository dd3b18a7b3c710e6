"""Tombstones: records of an erased subject observed before the erasure never come back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import make_record, sealed_batch
from sqlalchemy import update

from pipeline.cli import main
from pipeline.db import deletion_requests
from pipeline.principals import Principal
from pipeline.records import rows_from_table, table_from_rows
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline
from pipeline.tombstones import TombstoneNotFound, complete, drop_erased, lift

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)  # in the past: lifting and completing happen now
BEFORE, AFTER = T0 - timedelta(hours=1), T0 + timedelta(hours=1)


@pytest.fixture
def pipeline(settings) -> Pipeline:  # noqa: ANN001
    return Pipeline.open(settings, create=True)


def _drop(pipeline: Pipeline, records: list[dict]) -> tuple[list[dict], int]:
    tables = [table_from_rows("cluster_snapshot", records)]
    kept, dropped = drop_erased(pipeline.keyring.engine, tables, _refs(pipeline))
    return [r for t in kept for r in rows_from_table(t)], sum(dropped.values())


def _kept(pipeline: Pipeline, *records) -> list[tuple[str, str | None, datetime]]:  # noqa: ANN002
    return [(r["account"], r["user"], r["observed_at"]) for r in _drop(pipeline, list(records))[0]]


def _refs(pipeline: Pipeline):  # noqa: ANN202
    return lambda account, user: (pipeline.keyring.subject_ref(account), pipeline.keyring.user_ref(account, user))


def _file(pipeline: Pipeline, account: str, user: str | None = None, *, suppress: bool = False) -> str:
    """An erasure filed and completed at T0 (its tombstone, and the request's state, as the processing leaves them)."""
    request = file_request(pipeline, account, user, suppress=suppress, now=T0)
    complete(pipeline.keyring.engine, request.request_id, T0)
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(
            update(deletion_requests)
            .where(deletion_requests.c.request_id == request.request_id)
            .values(state="completed", completed_at=T0)
        )
    return request.request_id


def test_an_erased_accounts_records_from_before_the_erasure_are_dropped_later_ones_kept(pipeline) -> None:
    _file(pipeline, "acme")
    records = [
        make_record(account="acme", observed_at=BEFORE),
        make_record(account="acme", user="ann", observed_at=BEFORE),
        make_record(account="acme", observed_at=AFTER),
        make_record(account="globex", observed_at=BEFORE),
    ]
    kept, dropped = _drop(pipeline, records)
    assert [(r["account"], r["observed_at"]) for r in kept] == [("acme", AFTER), ("globex", BEFORE)]
    assert dropped == 2


def test_a_users_tombstone_drops_only_that_user(pipeline) -> None:
    _file(pipeline, "acme", "ann")
    assert _kept(
        pipeline,
        make_record(account="acme", user="ann", observed_at=BEFORE),
        make_record(account="acme", user="bob", observed_at=BEFORE),
        make_record(account="acme", observed_at=BEFORE),
    ) == [("acme", "bob", BEFORE), ("acme", None, BEFORE)]


def test_suppress_drops_later_records_until_lifted_and_never_the_old_ones(pipeline) -> None:
    request_id = _file(pipeline, "acme", suppress=True)
    assert _kept(pipeline, make_record(account="acme", observed_at=AFTER)) == []

    result = CliRunner().invoke(main, ["erase", "lift", request_id])
    assert result.exit_code == 0, result.stderr
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert _kept(pipeline, make_record(account="acme", observed_at=later)) == [("acme", None, later)]
    assert _kept(pipeline, make_record(account="acme", observed_at=BEFORE)) == []
    assert "erasure.lifted" in [e.action for e in pipeline.audit.entries()]

    again = CliRunner().invoke(main, ["erase", "lift", request_id])
    assert again.exit_code == 2
    assert again.stderr == f"error: no deletion request {request_id!r} filed with --suppress and not yet lifted\n"
    with pytest.raises(TombstoneNotFound):
        lift(pipeline.keyring.engine, "no-such-request", T0)


def test_the_tombstone_drops_all_until_the_erasure_completes_then_what_came_before(pipeline) -> None:
    pipeline.write_records([make_record(account="acme", observed_at=BEFORE)])
    request = file_request(pipeline, "acme", now=T0 - timedelta(days=2))
    now = datetime.now(UTC)
    assert _kept(pipeline, make_record(account="acme", observed_at=BEFORE)) == []  # pending: nothing is taken
    assert _kept(pipeline, make_record(account="acme", observed_at=now)) == []
    [done] = process_pending(pipeline)
    assert done.state == "completed" and done.request_id == request.request_id
    assert _kept(pipeline, make_record(account="acme", observed_at=now)) == []  # observed before completion
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert _kept(pipeline, make_record(account="acme", observed_at=later)) == [("acme", None, later)]


def test_a_record_taken_while_the_erasure_runs_does_not_outlive_it(pipeline, monkeypatch) -> None:  # noqa: ANN001
    """Between the key's destruction and the completion, the tombstone still stood at the filing time:
    a running scheduler's record of ann, observed then, was sealed under a new key and stayed readable."""
    pipeline.write_records([make_record(account="acme", user=u, observed_at=BEFORE) for u in ("ann", "bob")])
    file_request(pipeline, "acme", "ann")
    rotate = pipeline.keyring.rotate_master

    def rotate_while_ann_sends(recorded: Any) -> tuple[int, int]:  # her key is destroyed; the request is not done
        pipeline.write_records([make_record(account="acme", user="ann", n_workers=7)])
        return rotate(recorded)

    monkeypatch.setattr(pipeline.keyring, "rotate_master", rotate_while_ann_sends)
    [done] = process_pending(pipeline)
    assert done.state == "completed", done.error
    assert [r["user"] for r in pipeline.read_records("long_term", account="acme")] == ["bob"]


# -- on the one ingest path (issue 8, attacks 3 and 4) ---------------------------------------------


def test_replaying_a_spool_from_before_an_erasure_brings_nothing_back(pipeline) -> None:
    """Attack 3: a batch spooled before the erasure, replayed after it, with the receipt saying completed."""
    from conftest import embedded_emitter

    from pipeline.spool import Spool

    spool = Spool(pipeline.settings.spool_dir)
    ann = make_record("account", account="acme", user="ann", username="ann", email="ann@acme.test", observed_at=BEFORE)
    bob = make_record(account="acme", user="bob", observed_at=BEFORE)
    spool.append(*sealed_batch(pipeline, [ann, bob]))  # left by a scheduler that died before delivering
    pipeline.write_records([make_record(account="acme", user="ann", observed_at=BEFORE)])
    request = file_request(pipeline, "acme", "ann", now=T0 - timedelta(days=1))
    [done] = process_pending(pipeline)
    assert done.state == "completed"

    result = CliRunner().invoke(main, ["spool", "replay", "--timeout", "30"])
    assert result.exit_code == 0, result.stderr
    assert spool.pending_files() == []
    assert [(r["user"], r["kind"]) for r in pipeline.read_records("long_term", account="acme")] == [
        ("bob", "cluster_snapshot")
    ]
    [dropped] = [e for e in pipeline.audit.entries() if e.action == "ingest.dropped"]
    assert dropped.details["records"] == 1 and dropped.details["by_request"] == {request.request_id: 1}

    emitter = embedded_emitter(pipeline)  # a running scheduler sending ann's late records
    emitter.submit(
        [
            make_record(account="acme", user="ann", n_workers=5, observed_at=BEFORE),
            make_record(account="acme", user="ann", n_workers=6),  # observed now: ann may come back
        ]
    )
    assert emitter.close(30)
    assert [r["n_workers"] for r in pipeline.read_records("long_term", account="acme") if r["user"] == "ann"] == [6]


def test_a_scheduler_that_cached_the_key_seals_under_a_new_one_after_the_erasure(pipeline) -> None:
    """Attack 4 on the ingest path: the embedded scheduler's keyring cached ann's cipher before the erasure."""
    scheduler = Pipeline.open(pipeline.settings)
    acme = Principal.embedded_cluster("acme", None)
    scheduler.ingest(sealed_batch(scheduler, [make_record(account="acme", user="ann", observed_at=BEFORE)])[1], acme)
    file_request(pipeline, "acme", "ann", now=T0)
    [done] = process_pending(pipeline)
    assert done.state == "completed"

    records = [make_record(account="acme", user="ann", n_workers=n) for n in (1, 2)]
    scheduler.ingest(sealed_batch(scheduler, records)[1], acme)
    assert sorted(r["n_workers"] for r in Pipeline.open(pipeline.settings).read_records(account="acme")) == [1, 2]


def test_erasures_completed_are_reported_though_the_audit_checkpoint_then_fails(pipeline) -> None:
    """A tampered audit trail made the checkpoint after the erasures raise, and the pass reported none of
    the erasures it had just completed (`enforce` printed "requests": [])."""
    from sqlalchemy import delete, func, select

    from pipeline.db import audit_log

    pipeline.write_records([make_record(account="acme", user=u, observed_at=BEFORE) for u in ("ann", "bob")])
    pipeline.audit.checkpoint()
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(delete(audit_log).where(audit_log.c.seq == select(func.max(audit_log.c.seq)).scalar_subquery()))
    request = file_request(pipeline, "acme", "ann")
    [done] = process_pending(pipeline)
    assert (done.request_id, done.state) == (request.request_id, "completed")


def test_an_erased_accounts_batch_ids_go_with_it(pipeline) -> None:
    """One row a batch (ref, count, arrival) stayed after the account's erasure: a timeline of its activity."""
    from sqlalchemy import func, select

    from pipeline.db import ingested_batches

    acme = Principal.embedded_cluster("acme", None)
    for n in range(3):
        pipeline.ingest(sealed_batch(pipeline, [make_record(account="acme", n_workers=n)])[1], acme)
    pipeline.ingest(
        sealed_batch(pipeline, [make_record(account="globex")])[1], Principal.embedded_cluster("globex", None)
    )

    def batches(account: str) -> int:
        ref = pipeline.keyring.subject_ref(account)
        with pipeline.keyring.engine.connect() as conn:
            return conn.scalar(select(func.count()).where(ingested_batches.c.subject_ref == ref))

    assert (batches("acme"), batches("globex")) == (3, 1)
    file_request(pipeline, "acme")
    [done] = process_pending(pipeline)
    assert done.state == "completed", done.error
    assert (batches("acme"), batches("globex")) == (0, 1)


# -- an erasure filed while a batch is committed (two processes: serve and enforce) --------------------


def _ann_everywhere(pipeline: Pipeline) -> dict[str, int]:
    """Segments of ann in each store, readable or not (ciphertext under a destroyed key counts)."""
    ann = pipeline.keyring.user_ref("acme", "ann")
    return {
        name: sum(1 for s in store.scan(with_payload=False) if s.user_ref == ann)
        for name, store in pipeline.stores.items()
    }


def _right_after_the_tombstones_are_read(monkeypatch: pytest.MonkeyPatch, then: Any) -> None:
    """Run ``then`` once, right after the next read of tombstones: between a commit's read and its write."""
    from pipeline import tombstones

    load = tombstones.load

    def loading(engine, refs):  # noqa: ANN001, ANN202
        loaded = load(engine, refs)
        monkeypatch.setattr(tombstones, "load", load)
        then()
        return loaded

    monkeypatch.setattr(tombstones, "load", loading)


def _erased_meanwhile(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Ann's erasure filed and carried out right after the next read of tombstones; the requests it completed."""
    erased: list[Any] = []
    _right_after_the_tombstones_are_read(
        monkeypatch, lambda: (file_request(pipeline, "acme", "ann"), erased.extend(process_pending(pipeline)))
    )
    return erased


def test_a_batch_sealed_while_its_subject_is_erased_brings_nothing_back(database, monkeypatch) -> None:  # noqa: ANN001
    """The group commit read the tombstones, then sealed and wrote: an erasure filed and completed in between
    found nothing of the batch, which, sealed under a new key, brought ann's records from before it back."""
    pipeline = Pipeline.open(create=True)
    pipeline.write_records([make_record(account="acme", user="ann", observed_at=BEFORE)])
    erased = _erased_meanwhile(pipeline, monkeypatch)
    recent = datetime.now(UTC) - timedelta(minutes=5)  # within the logging store's limit: both stores take it
    late = [make_record(account="acme", user="ann", observed_at=recent + timedelta(minutes=m)) for m in (1, 2)]
    pipeline.ingest(sealed_batch(pipeline, late)[1], Principal.embedded_cluster("acme", None))
    assert [r.state for r in erased] == ["completed"]
    assert _ann_everywhere(pipeline) == {"long_term": 0, "cloud_logging": 0}


def test_records_written_while_their_subject_is_erased_come_back_nowhere(database, monkeypatch) -> None:  # noqa: ANN001
    """Jobs of a cluster found lost are written as records are: read the tombstones, seal, write. An erasure
    filed and completed in between left them readable under a new key."""
    pipeline = Pipeline.open(create=True)
    pipeline.write_records([make_record(account="acme", user="ann", observed_at=BEFORE)])
    erased = _erased_meanwhile(pipeline, monkeypatch)
    recent = datetime.now(UTC) - timedelta(minutes=5)
    assert pipeline.write_records([make_record("job", account="acme", user="ann", observed_at=recent)]) == {}
    assert [r.state for r in erased] == ["completed"]
    assert _ann_everywhere(pipeline) == {"long_term": 0, "cloud_logging": 0}


def test_an_erasure_filed_while_a_batch_commits_waits_and_finds_it(database, monkeypatch) -> None:  # noqa: ANN001
    """Filed and run while the commit wrote (PostgreSQL: nothing held them apart), the erasure swept before
    the batch's segments were committed: they stayed, ciphertext of ann in a store after her receipt."""
    import threading

    pipeline = Pipeline.open(create=True)
    logging_store = pipeline.stores["cloud_logging"]
    write, erased = logging_store.write, []
    eraser = threading.Thread(
        target=lambda: (file_request(pipeline, "acme", "ann"), erased.extend(process_pending(pipeline)))
    )

    def erase_meanwhile(segments):  # noqa: ANN001, ANN202
        monkeypatch.setattr(logging_store, "write", write)
        eraser.start()
        eraser.join(3)  # not a timing check: without the lock it is done well within; with it, it waits for us
        return write(segments)

    monkeypatch.setattr(logging_store, "write", erase_meanwhile)
    batch = [make_record(account="acme", user="ann", observed_at=datetime.now(UTC) - timedelta(minutes=5))]
    pipeline.ingest(sealed_batch(pipeline, batch)[1], Principal.embedded_cluster("acme", None))
    eraser.join(120)
    assert [r.state for r in erased] == ["completed"]
    assert _ann_everywhere(pipeline) == {"long_term": 0, "cloud_logging": 0}


def test_a_group_sealed_again_after_a_filing_audits_its_drop_once(database, monkeypatch) -> None:  # noqa: ANN001
    """The drop was audited as the group was sealed: sealed again (a request for bob filed meanwhile), the
    batch's one record of ann dropped made two ``ingest.dropped`` entries."""
    pipeline = Pipeline.open(create=True)
    file_request(pipeline, "acme", "ann")  # open: every record of ann is dropped
    _right_after_the_tombstones_are_read(monkeypatch, lambda: file_request(pipeline, "acme", "bob"))
    recent = datetime.now(UTC) - timedelta(minutes=5)
    records = [make_record(account="acme", user=u, observed_at=recent) for u in ("ann", "carl")]
    batch_id, sealed = sealed_batch(pipeline, records)
    pipeline.ingest(sealed, Principal.embedded_cluster("acme", None))
    dropped = [e.details for e in pipeline.audit.entries(actions=["ingest.dropped"])]
    assert [(d["batch_id"], d["records"]) for d in dropped] == [(batch_id, 1)]
    assert [r["user"] for r in pipeline.read_records("long_term", account="acme")] == ["carl"]


def test_a_clusters_records_of_an_erased_user_are_audited_a_hundred_batches_an_hour_then_counted(
    pipeline, monkeypatch
) -> None:  # noqa: ANN001
    """Each batch of a cluster whose user is being erased added an ``ingest.dropped`` entry: its code
    sending at the rate limit grew the trail every ``audit verify`` and report walks. An operator's
    replay (no cluster) is audited batch by batch still."""
    from pipeline import ingest_tally

    monkeypatch.setattr(ingest_tally, "REFUSALS_AUDITED_PER_HOUR", 3)
    file_request(pipeline, "acme", "ann", suppress=True)
    cluster = Principal("cluster", account="acme", user="ann", cluster_id="cluster-x")
    recent = datetime.now(UTC) - timedelta(minutes=5)
    for _ in range(5):
        ann = make_record(account="acme", user="ann", cluster_id="cluster-x", observed_at=recent)
        pipeline.ingest(sealed_batch(pipeline, [ann])[1], cluster)
    pipeline.ingest(sealed_batch(pipeline, [make_record(account="acme", user="ann")])[1], Principal("operator"))
    assert len(list(pipeline.audit.entries(actions=["ingest.dropped"]))) == 4
    pipeline._ingest_tally.summarise(final=True)
    [summary] = [e.details for e in pipeline.audit.entries(actions=["ingest.summary"])]
    assert summary["dropped_not_audited"] == {"cluster-x": 2}


def test_a_drop_counted_as_a_new_hour_begins_is_committed_and_the_last_hours_summary_written(database) -> None:  # noqa: ANN001
    """Counting a cluster's drop inside its commit, which holds the audit chain's lock, appended the hour
    that was over on another connection: on PostgreSQL that waited for the commit's own lock for ever, and
    every audit append of every process behind it. The drop's records are counted in the summary when they
    are past the share."""
    import threading

    from freezegun import freeze_time

    from pipeline import ingest_tally

    pipeline = Pipeline.open(create=True)
    request = file_request(pipeline, "acme", "ann", suppress=True)
    cluster = Principal("cluster", account="acme", user="ann", cluster_id="cluster-x")
    hour = datetime(2026, 6, 1, 12, tzinfo=UTC)
    with freeze_time(hour + timedelta(minutes=30)) as clock:
        pipeline.ingest(sealed_batch(pipeline, [make_record(account="acme", user="bob")])[1], Principal("operator"))
        clock.tick(timedelta(hours=1))
        ann = [make_record(account="acme", user="ann", cluster_id="cluster-x") for _ in range(3)]
        committed = threading.Thread(
            target=pipeline.ingest, args=(sealed_batch(pipeline, ann)[1], cluster), daemon=True
        )
        committed.start()
        committed.join(60)
        assert not committed.is_alive(), "the commit waits for its own audit lock"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ingest_tally, "REFUSALS_AUDITED_PER_HOUR", 0)  # past the share: counted, not audited
            pipeline.ingest(
                sealed_batch(pipeline, ann[:2] + [make_record(account="acme", user="ann", cluster_id="cluster-x")])[1],
                cluster,
            )
        pipeline._ingest_tally.summarise(final=True)
    summaries = [e.details for e in pipeline.audit.entries(actions=["ingest.summary"])]
    assert [s["hour"] for s in summaries] == [hour.isoformat(), (hour + timedelta(hours=1)).isoformat()]
    assert [d["records"] for d in (e.details for e in pipeline.audit.entries(actions=["ingest.dropped"]))] == [3]
    assert summaries[1]["dropped_not_audited"] == {"cluster-x": 1}
    assert summaries[1]["records_dropped_not_audited"] == {"cluster-x": 3}
    assert summaries[1]["by_request_not_audited"] == {request.request_id: 3}
