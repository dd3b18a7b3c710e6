"""Tombstones: records of an erased subject observed before the erasure never come back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from conftest import make_record

from pipeline.cli import main
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline
from pipeline.tombstones import TombstoneNotFound, complete, drop_erased, lift

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)  # in the past: lifting and completing happen now
BEFORE, AFTER = T0 - timedelta(hours=1), T0 + timedelta(hours=1)


@pytest.fixture
def pipeline(settings) -> Pipeline:  # noqa: ANN001
    return Pipeline.open(settings, create=True)


def _kept(pipeline: Pipeline, *records) -> list[tuple[str, str | None, datetime]]:  # noqa: ANN002
    kept, _dropped = drop_erased(pipeline.keyring.engine, records, _refs(pipeline))
    return [(r["account"], r["user"], r["observed_at"]) for r in kept]


def _refs(pipeline: Pipeline):  # noqa: ANN202
    return lambda account, user: (pipeline.keyring.subject_ref(account), pipeline.keyring.user_ref(account, user))


def _file(pipeline: Pipeline, account: str, user: str | None = None, *, suppress: bool = False) -> str:
    request = file_request(pipeline, account, user, suppress=suppress, now=T0)
    complete(pipeline.keyring.engine, request.request_id, T0)
    return request.request_id


def test_an_erased_accounts_records_from_before_the_erasure_are_dropped_later_ones_kept(pipeline) -> None:
    _file(pipeline, "acme")
    records = [
        make_record(account="acme", observed_at=BEFORE),
        make_record(account="acme", user="ann", observed_at=BEFORE),
        make_record(account="acme", observed_at=AFTER),
        make_record(account="globex", observed_at=BEFORE),
    ]
    kept, dropped = drop_erased(pipeline.keyring.engine, records, _refs(pipeline))
    assert [(r["account"], r["observed_at"]) for r in kept] == [("acme", AFTER), ("globex", BEFORE)]
    assert sum(dropped.values()) == 2


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


def test_the_tombstone_moves_to_the_completion_of_the_erasure(pipeline) -> None:
    pipeline.write_records([make_record(account="acme", observed_at=BEFORE)])
    request = file_request(pipeline, "acme", now=T0 - timedelta(days=2))
    assert _kept(pipeline, make_record(account="acme", observed_at=BEFORE)) == [("acme", None, BEFORE)]
    [done] = process_pending(pipeline)
    assert done.state == "completed" and done.request_id == request.request_id
    assert _kept(pipeline, make_record(account="acme", observed_at=BEFORE)) == []  # observed before completion
