"""Pipeline.ingest, the one ingest path: scoping, idempotency, partial failures, bad input."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dask.config
import pytest
from conftest import make_record, sealed_batch
from freezegun import freeze_time
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.db import audit_log
from pipeline.errors import ForbiddenBatch, IntakeError, StoreUnavailable
from pipeline.ingest_tally import REFUSALS_AUDITED_PER_HOUR
from pipeline.principals import Principal
from pipeline.runtime import IngestResult, Pipeline

ACME_C1 = Principal("cluster", account="acme", cluster_id="cluster-test", token_id="tok-1")


@pytest.fixture
def pipeline(settings: Settings) -> Pipeline:
    return Pipeline.open(settings, create=True)


def _ids(pipeline: Pipeline, store: str) -> Counter[str]:
    return Counter(r["record_id"] for r in pipeline.read_records(store))


def test_a_batch_is_stored_in_every_routed_store(pipeline: Pipeline) -> None:
    records = [make_record(), make_record("account", username="ann", email="ann@acme.test")]
    operator = Principal("operator")  # account records come from the control plane's side, never from a cluster
    assert pipeline.ingest(sealed_batch(pipeline, records)[1], operator) == IngestResult(records=2, duplicate=False)
    assert sorted(_ids(pipeline, "long_term")) == sorted(r["record_id"] for r in records)
    assert list(_ids(pipeline, "cloud_logging")) == [records[0]["record_id"]]


def test_a_store_takes_no_segment_already_past_its_limit(pipeline: Pipeline) -> None:
    """A spool replayed after a month: its old days go to the long-term store only. The logging store
    took them, and its records past 30 days failed the report until the next pass."""
    now = datetime.now(UTC)
    old, recent = (make_record(observed_at=now - timedelta(days=days)) for days in (31, 29))
    assert pipeline.ingest(sealed_batch(pipeline, [old, recent])[1], Principal("operator")).records == 2
    assert len(_ids(pipeline, "long_term")) == 2
    assert list(_ids(pipeline, "cloud_logging")) == [recent["record_id"]]


@pytest.mark.parametrize(
    "forged",
    [{"account": "globex"}, {"user": "bob"}, {"cluster_id": "cluster-of-someone-else"}],
    ids=["account", "user", "cluster"],
)
def test_a_forged_batch_is_refused_whole_and_audited_without_names(pipeline: Pipeline, forged: dict) -> None:
    records = [make_record(), make_record(**forged), make_record()]
    batch_id, sealed = sealed_batch(pipeline, records)
    with pytest.raises(ForbiddenBatch, match=f"batch {batch_id} refused: 1 of 3 records name another account, user"):
        pipeline.ingest(sealed, ACME_C1)
    assert list(pipeline.read_records("long_term")) == [] and list(pipeline.read_records("cloud_logging")) == []
    (entry,) = [e for e in pipeline.audit.entries() if e.action == "ingest.rejected"]
    assert entry.actor == "cluster-token:tok-1"
    assert entry.subject_ref == pipeline.keyring.subject_ref("acme")
    assert entry.details["batch_id"] == batch_id and entry.details["records"] == 3
    with pipeline.keyring.engine.connect() as conn:
        stored = json.dumps([list(row) for row in conn.execute(select(audit_log))], default=str)
    assert "acme" not in stored and "globex" not in stored
    assert pipeline.audit.verify() >= 1


@pytest.mark.parametrize("kind", ["member", "admin"])
def test_only_a_cluster_may_ingest(pipeline: Pipeline, kind: str) -> None:
    principal = Principal(kind, account="acme" if kind == "member" else None)  # type: ignore[arg-type]
    with pytest.raises(ForbiddenBatch, match=f"a {kind} principal may not ingest"):
        pipeline.ingest(sealed_batch(pipeline, [make_record()])[1], principal)
    assert list(pipeline.read_records("long_term")) == []
    assert [e.action for e in pipeline.audit.entries()].count("ingest.rejected") == 1


def test_the_operator_replays_a_batch_of_one_account_only(pipeline: Pipeline) -> None:
    operator = Principal("operator")
    batch_id, sealed = sealed_batch(pipeline, [make_record(account="globex")])
    assert pipeline.ingest(sealed, operator) == IngestResult(1, duplicate=False)
    globex_cluster = Principal("cluster", account="globex", cluster_id="cluster-test")
    assert pipeline.ingest(sealed, globex_cluster) == IngestResult(1, duplicate=True)  # same batch, same scope
    with pytest.raises(ForbiddenBatch, match="records name 2 accounts; a batch holds one"):
        pipeline.ingest(sealed_batch(pipeline, [make_record(), make_record(account="globex")])[1], operator)


def test_a_replayed_batch_is_accepted_once(pipeline: Pipeline) -> None:
    batch_id, sealed = sealed_batch(pipeline, [make_record() for _ in range(3)])
    assert pipeline.ingest(sealed, ACME_C1, idempotency_key=batch_id) == IngestResult(3, duplicate=False)
    assert pipeline.ingest(sealed, ACME_C1, idempotency_key=batch_id) == IngestResult(3, duplicate=True)
    assert sorted(_ids(pipeline, "long_term").values()) == [1, 1, 1]
    assert sorted(_ids(pipeline, "cloud_logging").values()) == [1, 1, 1]


def test_another_account_reusing_a_batch_id_neither_skips_nor_shadows_it(pipeline: Pipeline) -> None:
    batch_id, acme = sealed_batch(pipeline, [make_record()])
    globex_record = make_record(account="globex")
    _, globex = sealed_batch(pipeline, [globex_record], batch_id=batch_id)
    globex_c1 = Principal("cluster", account="globex", cluster_id="cluster-test")
    assert pipeline.ingest(globex, globex_c1) == IngestResult(1, duplicate=False)
    assert pipeline.ingest(acme, ACME_C1) == IngestResult(1, duplicate=False)
    assert sorted(r["account"] for r in pipeline.read_records("long_term")) == ["acme", "globex"]


def test_a_retry_after_a_partial_failure_stores_every_record_exactly_once(home: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the logging store's folder should be")
    with dask.config.set({"pipeline.cloud-logging.url": f"file://{blocked}/logs"}):
        settings = Settings.from_config()
    pipeline = Pipeline.open(settings, create=True)
    records = [make_record(), make_record("job", job_id="j1"), make_record(user="ann")]
    batch_id, sealed = sealed_batch(pipeline, records)
    with pytest.raises(StoreUnavailable):
        pipeline.ingest(sealed, Principal("operator"), idempotency_key=batch_id)
    assert not _ids(pipeline, "long_term")  # the long-term transaction comes last: a failed commit left nothing there

    blocked.unlink()
    healed = Pipeline.open(Settings.from_config())
    assert healed.ingest(sealed, Principal("operator"), idempotency_key=batch_id) == IngestResult(3, duplicate=False)
    for store in ("long_term", "cloud_logging"):
        ids = _ids(healed, store)
        assert sorted(ids) == sorted(r["record_id"] for r in records) and max(ids.values()) == 1


def test_one_tokens_refusals_past_a_hundred_an_hour_are_counted_not_audited_one_by_one(pipeline: Pipeline) -> None:
    """A cluster sending garbage at its rate limit added an audit entry per batch (8.6 M a day, every
    ``audit verify`` and report walking them); accepted batches were always summarised hourly."""

    def refuse(count: int, principal: Principal = ACME_C1) -> None:
        for _ in range(count):
            with pytest.raises(IntakeError):
                pipeline.ingest(b"MPBATCH1 garbage", principal)

    def entries(action: str) -> list[dict]:
        return [e.details for e in pipeline.audit.entries(actions=[action])]

    hour = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    with freeze_time(hour + timedelta(minutes=5)):
        refuse(REFUSALS_AUDITED_PER_HOUR + 7)
        refuse(2, Principal("cluster", account="globex", cluster_id="cluster-g", token_id="tok-g"))
    assert len(entries("ingest.rejected")) == REFUSALS_AUDITED_PER_HOUR + 2
    with freeze_time(hour + timedelta(hours=1, minutes=5)):
        refuse(1)  # a new hour: audited again, and the last one summarised
    assert len(entries("ingest.rejected")) == REFUSALS_AUDITED_PER_HOUR + 3
    [summary] = entries("ingest.summary")
    assert summary == {"hour": hour.isoformat(), "records": {}, "refused_not_audited": {ACME_C1.actor: 7}}


def test_an_accounts_refusals_past_its_share_are_counted_whatever_number_of_clusters_send_them(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The share was per token, and a member registers clusters at will: 12 clusters' garbage added 1,200
    entries in 16 s. Another account's refusals keep their own share."""
    from pipeline import ingest_tally

    monkeypatch.setattr(ingest_tally, "REFUSALS_AUDITED_PER_HOUR", 3)
    monkeypatch.setattr(ingest_tally, "AUDITED_PER_ACCOUNT_HOUR", 5)
    clusters = [Principal("cluster", account="acme", cluster_id=f"c{n}", token_id=f"tok-{n}") for n in range(4)]
    globex = Principal("cluster", account="globex", cluster_id="g", token_id="tok-g")
    with freeze_time(datetime(2026, 6, 1, 12, 5, tzinfo=UTC)):
        for principal in [*clusters, *clusters, globex, globex]:  # acme's 6th, 7th and 8th are past its share
            with pytest.raises(IntakeError):
                pipeline.ingest(b"MPBATCH1 garbage", principal)
        pipeline._ingest_tally.summarise(final=True)
    audited = Counter(e.actor for e in pipeline.audit.entries(actions=["ingest.rejected"]))
    assert sum(n for actor, n in audited.items() if actor != globex.actor) == 5 and audited[globex.actor] == 2
    [summary] = [e.details for e in pipeline.audit.entries(actions=["ingest.summary"])]
    assert summary["refused_not_audited"] == {p.actor: 1 for p in clusters[1:]}


def test_an_idempotency_key_naming_another_batch_is_refused(pipeline: Pipeline) -> None:
    batch_id, sealed = sealed_batch(pipeline, [make_record()])
    with pytest.raises(IntakeError, match=f"does not match batch id {batch_id}"):
        pipeline.ingest(sealed, ACME_C1, idempotency_key="00000000000000000001-000000000000")
    assert list(pipeline.read_records("long_term")) == []


def test_garbage_is_an_intake_error(pipeline: Pipeline) -> None:
    with pytest.raises(IntakeError, match="not a sealed metadata batch"):
        pipeline.ingest(b'{"records": []}', ACME_C1)


@pytest.mark.parametrize(
    "principal", [Principal.embedded_cluster("acme", None), Principal("operator")], ids=["embedded", "operator"]
)
def test_bounds_hold_for_batches_of_no_registered_cluster_too(pipeline: Pipeline, principal: Principal) -> None:
    far = make_record(observed_at=datetime(9999, 12, 31, tzinfo=UTC))
    # the value named: a scheduler's clock ahead of the control plane's shows as a time in the future
    with pytest.raises(IntakeError, match=r"observed_at: 9999-12-31T00:00:00\+00:00 is outside the cluster's life"):
        pipeline.ingest(sealed_batch(pipeline, [make_record(), far])[1], principal)
    assert list(pipeline.read_records("long_term")) == []
    old = make_record(observed_at=datetime(1999, 12, 31, tzinfo=UTC))
    with pytest.raises(IntakeError, match=r"\(2000-01-01T00:00:00\+00:00 to "):
        pipeline.ingest(sealed_batch(pipeline, [old])[1], principal)


def test_a_batch_of_large_environments_is_admitted_without_a_python_object_per_package(pipeline: Pipeline) -> None:
    """Their ids were computed from every row turned into Python at once: a 7.7 MiB batch of 5,000
    environments of 150 packages took 187 MB of a ``serve``, two at once 290 MB (one account can send 8).
    What stays is the batch's decrypted bytes and their copies (about 3.5 times the batch)."""
    import tracemalloc

    packages = {f"p{n}": "1" for n in range(150)}
    envs = [
        make_record("software_env", account="acme", cluster_id="c", packages={**packages, "own": str(n)})
        for n in range(2_500)
    ]
    sealed = sealed_batch(pipeline, envs)[1]
    del envs
    tracemalloc.start()
    try:
        prepared = pipeline.prepare_ingest(sealed, Principal.embedded_cluster("acme", "c"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(sealed) * 5, f"{peak / 1e6:.0f} MB of Python objects for a batch of {len(sealed) / 1e6:.1f} MB"
    assert len(set(prepared.tables[0].column("env_id").to_pylist())) == 2_500
    assert pipeline.commit_ingest(prepared).records == 2_500
