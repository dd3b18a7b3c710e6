"""The retention pass: the 30-day rule, exact cuts at the limit, idempotence, audit."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import dask.config
import pandas  # noqa: F401 - pyarrow imports it lazily; it must not load under freezegun
import pytest
import yaml
from conftest import make_record
from freezegun import freeze_time

from pipeline.config import default_policy_path
from pipeline.errors import StoreError
from pipeline.retention.enforcer import enforce
from pipeline.runtime import Pipeline

DAY0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _day0_records(account: str = "acme") -> list[dict]:
    return [
        make_record("cluster_snapshot", account=account, n_workers=2),
        make_record("job", account=account, job_id="j1", tasks_total=10),
        make_record("software_env", account=account, env_id="e1", packages={"dask": "2026.8.0"}),
        make_record("account", account=account, username="ann", email="ann@example.com"),
    ]


def _kinds(pipeline: Pipeline, store: str) -> Counter:
    return Counter(r["kind"] for r in pipeline.read_records(store))


def test_logging_keeps_day_0_records_on_day_29_drops_them_on_day_31_long_term_keeps_them(settings) -> None:
    with freeze_time(DAY0) as clock:
        pipeline = Pipeline.open(settings, create=True)
        pipeline.write_records(_day0_records())
        logged = Counter({"cluster_snapshot": 1, "job": 1, "software_env": 1})

        clock.move_to(DAY0 + timedelta(days=29))
        report = enforce(pipeline)
        assert report.records == 0
        assert _kinds(pipeline, "cloud_logging") == logged

        clock.move_to(DAY0 + timedelta(days=31))
        report = enforce(pipeline)
        assert _kinds(pipeline, "cloud_logging") == Counter()
        assert report.removed["cloud_logging"]["cluster_jobs"].records == 2
        assert report.removed["cloud_logging"]["software_env"].records == 1
        assert report.now == DAY0 + timedelta(days=31)

        clock.move_to(DAY0 + timedelta(days=400))
        enforce(pipeline)
        assert _kinds(pipeline, "long_term") == logged + Counter({"account": 1})


def test_each_pass_is_audited_with_its_counts(settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    with freeze_time(DAY0):
        pipeline.write_records(_day0_records())
    now = DAY0 + timedelta(days=31)
    report = enforce(pipeline, now)
    entry = next(e for e in pipeline.audit.entries() if e.seq == report.audit_seq)
    assert entry.action == "retention.pass"
    assert entry.details["now"] == now.isoformat()
    assert entry.details["removed"]["cloud_logging"]["cluster_jobs"]["records"] == 2
    assert entry.details["policy_sha256"] == pipeline.policy.sha256
    assert pipeline.audit.verify() >= 1


@pytest.fixture(params=["cloud_logging", "long_term"])
def hourly_store(request, tmp_path, home):  # noqa: ANN001, ANN201
    """A store holding one day of hourly records under a 30-day limit (a custom policy for long_term)."""
    doc = yaml.safe_load(default_policy_path().read_text())
    doc["stores"]["long_term"]["cluster_jobs"] = "30d"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc))
    with dask.config.set({"pipeline.policy": str(policy)}):
        pipeline = Pipeline.open(create=True)
        hours = [DAY0.replace(hour=0) + timedelta(hours=h, minutes=30) for h in range(24)]
        pipeline.write_records(
            make_record(account=account, observed_at=t, n_workers=h)
            for account in ("acme", "globex")
            for h, t in enumerate(hours)
        )
        yield pipeline, request.param


def _observed(pipeline: Pipeline, store: str) -> list[tuple[str, datetime]]:
    return sorted((r["account"], r["observed_at"]) for r in pipeline.read_records(store, data_type="cluster_jobs"))


def test_a_partly_expired_day_is_cut_exactly_at_the_limit(hourly_store) -> None:
    pipeline, store = hourly_store
    now = DAY0 + timedelta(days=30)  # cutoff: day 0, 12:00
    before = _observed(pipeline, store)
    report = enforce(pipeline, now)
    kept = _observed(pipeline, store)
    assert kept == [(a, t) for a, t in before if t >= DAY0]  # nothing younger removed, nothing older left
    assert len(kept) == 24
    counts = report.removed[store]["cluster_jobs"]
    assert (counts.records, counts.rewritten) == (24, 2)
    segments = sorted(s.segment_id for s in pipeline.stores[store].scan())

    again = enforce(pipeline, now)  # a rerun changes nothing
    assert again.removed[store]["cluster_jobs"].records == 0
    assert _observed(pipeline, store) == kept
    assert sorted(s.segment_id for s in pipeline.stores[store].scan()) == segments


def test_a_pass_killed_between_rewrite_and_delete_is_completed_by_the_next(hourly_store, monkeypatch) -> None:
    pipeline, store = hourly_store
    now = DAY0 + timedelta(days=30)
    target = pipeline.stores[store]
    real_delete = target.delete

    def crash(ids):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt("killed after writing the cut segment")

    monkeypatch.setattr(target, "delete", crash)
    with pytest.raises(KeyboardInterrupt):
        enforce(pipeline, now)
    monkeypatch.setattr(target, "delete", real_delete)
    enforce(pipeline, now)
    kept = _observed(pipeline, store)
    assert len(kept) == len(set(kept)) == 24  # the cut segment was written once
    assert all(t >= DAY0 for _, t in kept)


@pytest.mark.parametrize("later", [timedelta(minutes=15), timedelta(hours=3)], ids=["cut-whole", "cut-straddles"])
def test_a_cut_whose_original_outlived_it_leaves_each_record_once(hourly_store, monkeypatch, later) -> None:  # noqa: ANN001
    """A cut's id named its cutoff: a pass that wrote the cut but failed to delete the original left both,
    and the next pass, at another cutoff, cut the original again under another id (and local compaction
    merged the two): every younger record twice, for good. Its cut straddling the new cutoff too, or not."""
    pipeline, store = hourly_store
    target = pipeline.stores[store]
    real_delete = target.delete
    originals = {s.segment_id for s in target.straddling("cluster_jobs", DAY0)}

    def failing(ids):  # noqa: ANN001, ANN202
        if originals & set(ids):
            raise StoreError("the original's delete failed")
        return real_delete(ids)

    monkeypatch.setattr(target, "delete", failing)
    first = enforce(pipeline, DAY0 + timedelta(days=30))  # cutoff: day 0, 12:00
    assert f"expire:{store}/cluster_jobs" in first.failed_steps
    monkeypatch.setattr(target, "delete", real_delete)

    now = DAY0 + timedelta(days=30) + later
    second = enforce(pipeline, now)
    assert not second.failed_steps
    kept = _observed(pipeline, store)
    hours = [DAY0.replace(hour=0) + timedelta(hours=h, minutes=30) for h in range(24)]
    assert kept == [(a, t) for a in ("acme", "globex") for t in hours if t >= now - timedelta(days=30)]
    assert second.removed[store]["cluster_jobs"].records == 48 - len(kept)  # each removal counted once


def _refusing_to_delete_acmes_straddling_segment(pipeline: Pipeline, store: str, monkeypatch) -> Any:  # noqa: ANN001
    """``store``, whose delete of acme's segment straddling day 0's noon is refused (a file made immutable)."""
    target = pipeline.stores[store]
    real_delete = target.delete
    acme = pipeline.keyring.subject_ref("acme")
    refused = {s.segment_id for s in target.straddling("cluster_jobs", DAY0) if s.subject_ref == acme}

    def failing(ids):  # noqa: ANN001, ANN202
        if refused & set(ids):
            raise StoreError("made immutable")
        return real_delete(ids)

    monkeypatch.setattr(target, "delete", failing)
    return target


def test_a_straddling_segment_its_store_refuses_to_delete_leaves_the_others_cut(hourly_store, monkeypatch) -> None:  # noqa: ANN001
    """The first refusal ended the step: every other subject's records older than the limit stayed."""
    pipeline, store = hourly_store
    _refusing_to_delete_acmes_straddling_segment(pipeline, store, monkeypatch)
    report = enforce(pipeline, DAY0 + timedelta(days=30))
    assert report.failed_steps[f"expire:{store}/cluster_jobs"].startswith("1 straddling segment(s) kept whole")
    assert report.removed[store]["cluster_jobs"].records == 12  # globex's, counted
    assert [t for a, t in _observed(pipeline, store) if a == "globex"] == [
        DAY0.replace(hour=0) + timedelta(hours=h, minutes=30) for h in range(12, 24)
    ]


def test_an_original_whose_delete_keeps_failing_is_never_cut_twice(hourly_store, monkeypatch) -> None:  # noqa: ANN001
    """Its cut was cut in turn at the next pass and deleted, freeing the cut's id: the pass after cut the
    original again, and every younger record gained a copy each second pass (3, then 4: the inventory grew)."""
    pipeline, store = hourly_store
    target = _refusing_to_delete_acmes_straddling_segment(pipeline, store, monkeypatch)
    acme = pipeline.keyring.subject_ref("acme")
    for hour in range(6):
        now = DAY0 + timedelta(days=30, hours=hour)
        report = enforce(pipeline, now)
        assert report.failed_steps[f"expire:{store}/cluster_jobs"].startswith("1 straddling segment(s) kept whole")
        held = [s.n_records for s in target.scan(data_type="cluster_jobs", with_payload=False) if s.subject_ref == acme]
        assert sorted(held) == [12, 24], f"pass {hour}"  # the original and its one cut, left as they are
        assert sorted(t for a, t in _observed(pipeline, store) if a == "globex") == [
            DAY0.replace(hour=0) + timedelta(hours=h, minutes=30) for h in range(24) if h >= 12 + hour
        ]


@pytest.mark.parametrize("hourly_store", ["cloud_logging"], indirect=True)  # the store that compacts
def test_a_cut_an_earlier_release_left_beside_its_original_leaves_each_record_once(hourly_store) -> None:  # noqa: ANN001
    """An earlier release named a cut by its cutoff: a pass of it killed between the cut's write and the
    original's delete left both, which this release's cut ids do not recognise; the original was cut
    again, and compaction merged the two cuts, every younger record twice for good. Compaction keeps one
    copy of each (stores that do not compact, SQL's, keep both until the day expires)."""
    import hashlib

    from pipeline.retention.enforcer import _resealed
    from pipeline.segments import open_segment

    pipeline, store = hourly_store
    target = pipeline.stores[store]
    earlier_cutoff = DAY0
    for original in list(target.straddling("cluster_jobs", earlier_cutoff)):  # the earlier release's cut
        table = open_segment(pipeline.keyring, original)
        kept = table.filter([t >= earlier_cutoff for t in table.column("observed_at").to_pylist()])
        old_id = hashlib.sha256(f"{original.segment_id}|{earlier_cutoff.isoformat()}".encode()).hexdigest()[:32]
        target.write([_resealed(pipeline, [original], kept, old_id)])
    now = DAY0 + timedelta(days=30, minutes=15)
    report = enforce(pipeline, now)
    assert not report.failed_steps
    kept = _observed(pipeline, store)
    hours = [DAY0.replace(hour=0) + timedelta(hours=h, minutes=30) for h in range(24)]
    assert kept == [(a, t) for a in ("acme", "globex") for t in hours if t >= now - timedelta(days=30)]


def test_compaction_keeps_two_records_a_cluster_sent_under_one_id(settings) -> None:  # noqa: ANN001
    """Ingest refuses an id twice within a batch, not across batches: compaction kept one record per id,
    and the other (another job) went, unsaid ("0 records removed")."""
    pipeline = Pipeline.open(settings, create=True)
    for cluster, tasks in (("c1", 5), ("c2", 7)):  # two batches
        pipeline.write_records(
            [make_record("job", record_id="ab" * 16, cluster_id=cluster, observed_at=DAY0, tasks_total=tasks)]
        )
    report = enforce(pipeline, DAY0 + timedelta(days=2))
    assert report.compacted["cloud_logging"].segments == 2
    jobs = sorted((r["cluster_id"], r["tasks_total"]) for r in pipeline.read_records("cloud_logging"))
    assert jobs == [("c1", 5), ("c2", 7)]


def test_a_straddling_segment_of_an_erased_subject_is_dropped(hourly_store) -> None:
    pipeline, store = hourly_store
    pipeline.keyring.destroy(pipeline.keyring.subject_ref("globex"))
    enforce(pipeline, DAY0 + timedelta(days=30))
    left = list(pipeline.stores[store].scan(subject_ref=pipeline.keyring.subject_ref("globex")))
    assert left == []
    assert {a for a, _ in _observed(pipeline, store)} == {"acme"}


def test_a_pass_of_a_long_running_service_applies_the_policy_as_edited_since(tmp_path, home) -> None:  # noqa: ANN001
    """serve read the policy once: a limit shortened, a deadline changed or a file made invalid since
    went unseen by every pass (audited with the old file's hash), and erasures got the old deadline."""
    from pipeline.retention.requests import file_request

    doc = yaml.safe_load(default_policy_path().read_text())
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc))
    with dask.config.set({"pipeline.policy": str(policy)}):
        pipeline = Pipeline.open(create=True)  # as serve opens it, once
        pipeline.write_records([make_record(observed_at=DAY0)])
        doc["stores"]["cloud_logging"]["cluster_jobs"] = "12h"
        doc["erasure"]["deadline"] = "2h"
        policy.write_text(yaml.safe_dump(doc))
        report = enforce(pipeline, DAY0 + timedelta(days=1))
        assert report.removed["cloud_logging"]["cluster_jobs"].records == 1 and not report.failed_steps
        [noted] = [e for e in pipeline.audit.entries() if e.action == "policy.loaded"][-1:]
        assert noted.details["sha256"] == pipeline.policy.sha256
        assert pipeline.audit.last("retention.pass").details["policy_sha256"] == pipeline.policy.sha256
        request = file_request(pipeline, "acme")
        assert request.deadline - request.created_at == timedelta(hours=2)

        policy.write_text("version: 1\nstores: {cloud_logging: {cluster_jobs: thirty days}}\n")
        failed = enforce(pipeline, DAY0 + timedelta(days=2))
        assert "thirty days" in failed.failed_steps["policy"] and str(policy) in failed.failed_steps["policy"]
        assert set(failed.failed_steps) == {"policy"}  # every other step ran, under the policy read before
        assert pipeline.audit.last("retention.pass").details["failed_steps"] == failed.failed_steps
        assert pipeline.policy.erasure_deadline == timedelta(hours=2)


def _policy_file(tmp_path) -> tuple[Any, dict]:  # noqa: ANN001
    doc = yaml.safe_load(default_policy_path().read_text())
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc))
    return policy, doc


def test_a_type_an_edit_took_off_a_stores_list_is_removed_from_it_by_the_next_pass(tmp_path, home) -> None:  # noqa: ANN001
    """The report counted such records overdue (``not allowed``, FAIL) while every pass left them and passed:
    an edit leaving the logging store software environments only kept its jobs there for ever."""
    policy, doc = _policy_file(tmp_path)
    with dask.config.set({"pipeline.policy": str(policy)}):
        with freeze_time(DAY0):
            pipeline = Pipeline.open(create=True)
            pipeline.write_records(_day0_records())
            ahead = DAY0 + timedelta(minutes=10)  # a scheduler's clock ahead, within the skew ingest allows
            pipeline.write_records([make_record("job", account="acme", job_id="j2", observed_at=ahead)])
        del doc["stores"]["cloud_logging"]["cluster_jobs"]
        policy.write_text(yaml.safe_dump(doc))
        report = enforce(pipeline, DAY0)
    assert _kinds(pipeline, "cloud_logging") == Counter({"software_env": 1}) and not report.failed_steps
    assert report.removed["cloud_logging"]["cluster_jobs"].records == 3
    assert "account" not in report.removed["cloud_logging"]  # a type it never held: no step to report
    assert _kinds(pipeline, "long_term") == Counter({"cluster_snapshot": 1, "job": 2, "software_env": 1, "account": 1})


def test_an_erasure_covers_a_store_the_policy_lists_as_holding_nothing(tmp_path, home) -> None:  # noqa: ANN001
    """A policy may list a store with no data types and leave it out of ``erasure.stores``: the store still
    held what it held before that edit, and an account's erasure completed with its records there."""
    from pipeline.retention.requests import file_request, process_pending

    policy, doc = _policy_file(tmp_path)
    with dask.config.set({"pipeline.policy": str(policy)}):
        pipeline = Pipeline.open(create=True)
        pipeline.write_records(_day0_records())
        doc["stores"]["cloud_logging"], doc["erasure"]["stores"] = {}, ["long_term"]
        policy.write_text(yaml.safe_dump(doc))
        pipeline.reload_policy()
        file_request(pipeline, "acme")
        [done] = process_pending(pipeline)
    assert done.state == "completed"
    assert done.receipt["stores"]["cloud_logging"]["records"] == 3
    assert _kinds(pipeline, "cloud_logging") == Counter() == _kinds(pipeline, "long_term")
