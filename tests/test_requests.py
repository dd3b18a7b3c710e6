"""Deletion requests: erasure everywhere, crypto-shredding, receipts, resumption, deadlines."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import make_record, run
from sqlalchemy import select

from pipeline.db import deletion_requests
from pipeline.errors import KeyringError, StoreError, StoreUnavailable
from pipeline.records import utcnow
from pipeline.retention.lease import Leases
from pipeline.retention.requests import file_request, get_request, list_requests, process_pending
from pipeline.runtime import Pipeline
from pipeline.segments import open_segment
from pipeline.stores.localfiles import LocalFileStore

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def pipeline(settings) -> Pipeline:
    pipeline = Pipeline.open(settings, create=True)
    records = []
    for account, users in (("acme", ("ann", "bob")), ("globex", ("gil",))):
        for user in users:
            for day in range(3):
                at = T0 + timedelta(days=day)
                records += [
                    make_record("cluster_snapshot", account=account, user=user, observed_at=at, n_workers=day),
                    make_record("software_env", account=account, user=user, observed_at=at, env_id="e"),
                ]
        records.append(make_record("account", account=account, username=users[0], email=f"{users[0]}@example.com"))
    pipeline.write_records(records)
    return pipeline


def _accounts(pipeline: Pipeline, store: str) -> set[str]:
    return {r["account"] for r in pipeline.read_records(store)}


def _actions(pipeline: Pipeline, request_id: str) -> list[str]:
    return [e.action for e in pipeline.audit.entries() if e.details.get("request_id") == request_id]


def test_erasing_an_account_removes_it_everywhere_and_shreds_its_key(pipeline, home, tmp_path) -> None:
    acme = pipeline.keyring.subject_ref("acme")
    copied_aside = next(pipeline.stores["long_term"].scan(subject_ref=acme, data_type="account"))
    shutil.copytree(home / "logs", tmp_path / "backup")  # a backup of the logging store
    globex_before = sorted(r["record_id"] for r in pipeline.read_records("long_term", account="globex"))

    request = file_request(pipeline, "acme", reason="GDPR art. 17 request #4411")
    assert request.state == "pending"
    [done] = process_pending(pipeline)

    assert done.state == "completed" and done.error is None
    assert _accounts(pipeline, "long_term") == {"globex"}
    assert _accounts(pipeline, "cloud_logging") == {"globex"}
    assert sorted(r["record_id"] for r in pipeline.read_records("long_term", account="globex")) == globex_before
    assert pipeline.keyring.key_state(acme) == "destroyed"
    with pytest.raises(KeyringError):
        open_segment(pipeline.keyring, copied_aside)
    backup = list(LocalFileStore(f"file://{tmp_path}/backup").scan(subject_ref=acme))
    assert len(backup) == 12
    for segment in backup:
        with pytest.raises(KeyringError):
            open_segment(pipeline.keyring, segment)

    receipt = get_request(pipeline, request.request_id).receipt
    assert receipt["stores"]["long_term"]["segments"] == 2 * 3 * 2 + 1
    assert receipt["stores"]["long_term"]["records"] == 2 * 3 * 2 + 1
    assert receipt["stores"]["cloud_logging"]["records"] == 2 * 3 * 2
    assert receipt["key"]["state"] == "destroyed"
    assert _actions(pipeline, request.request_id) == [
        "erasure.pending",
        "erasure.in_progress",
        "store.erased",
        "store.erased",
        "key.destroyed",
        "erasure.completed",
    ]
    proven = {e.seq: e for e in pipeline.audit.entries()}
    assert proven[receipt["audit"]["completed"]].action == "erasure.completed"
    assert proven[receipt["stores"]["cloud_logging"]["audit_seq"]].details["records"] == 12
    assert proven[receipt["key"]["audit_seq"]].subject_ref == acme
    assert process_pending(pipeline) == []  # nothing left to do; a rerun changes nothing


def test_no_name_reason_or_email_reaches_any_file_at_rest(pipeline, home: Path) -> None:
    request = file_request(pipeline, "acme", "ann", reason="ticket from ann@example.com")
    assert get_request(pipeline, request.request_id).reason == "ticket from ann@example.com"
    process_pending(pipeline)
    for path in home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (b"acme", b"globex", b"ann@example.com", b"ticket"):
                assert secret not in data, f"{secret!r} found in {path}"


def test_erasing_one_user_shreds_that_users_key_and_keeps_the_account(pipeline) -> None:
    ann = pipeline.keyring.user_ref("acme", "ann")
    ann_segment = next(pipeline.stores["long_term"].scan(user_ref=ann))
    request = file_request(pipeline, "acme", "ann")
    [done] = process_pending(pipeline)
    assert done.state == "completed" and done.scope == "user"
    users = {(r["account"], r["user"]) for r in pipeline.read_records("cloud_logging")}
    assert users == {("acme", "bob"), ("globex", "gil")}
    acme = pipeline.keyring.subject_ref("acme")
    assert pipeline.keyring.key_state(acme, pipeline.keyring.user_ref("acme", "bob")) == "active"
    assert pipeline.keyring.key_state(acme, ann) == "destroyed"
    with pytest.raises(KeyringError):  # a copy of ann's segment kept anywhere opens nothing
        open_segment(pipeline.keyring, ann_segment)
    assert done.receipt["key"]["state"] == "destroyed" and done.receipt["key"]["keys_destroyed"] == 1
    assert done.receipt["stores"]["cloud_logging"]["records"] == 6
    assert "key.destroyed" in _actions(pipeline, request.request_id)


def test_an_unknown_account_completes_with_zero_counts_and_says_so(pipeline) -> None:
    request = file_request(pipeline, "initech")
    [done] = process_pending(pipeline)
    assert done.state == "completed"
    assert {s: (c["segments"], c["records"]) for s, c in done.receipt["stores"].items()} == {
        "long_term": (0, 0),
        "cloud_logging": (0, 0),
    }
    assert "no data was ever stored" in done.receipt["note"]
    assert done.receipt["key"] == {"state": "unknown", "keys_destroyed": 0}
    assert request.request_id == done.request_id


def test_requests_past_the_deadline_are_flagged_overdue(pipeline) -> None:
    request = file_request(pipeline, "acme", now=T0)
    assert request.deadline == T0 + timedelta(days=30)
    [listed] = list_requests(pipeline)
    assert not listed.overdue(T0 + timedelta(days=29))
    assert listed.overdue(T0 + timedelta(days=31))
    assert listed.as_dict(T0 + timedelta(days=31))["overdue"] is True


class _FailingErase:
    """A store whose next erase fails with ``error``: before erasing, or (``late``) just after."""

    def __init__(self, store, error: BaseException, *, late: bool = False) -> None:  # noqa: ANN001
        self._store, self._error, self._late = store, error, late

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._store, name)

    def erase(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        result = self._store.erase(*args, **kwargs) if self._late else None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return result or self._store.erase(*args, **kwargs)


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("before", StoreUnavailable("logs unreachable")),
        ("before", KeyboardInterrupt("killed")),
        ("after", KeyboardInterrupt("killed")),
    ],
    ids=["store-unavailable", "killed-between-stores", "killed-inside-the-store"],
)
def test_a_run_stopped_after_the_long_term_store_is_resumed_exactly_once(pipeline, how, error) -> None:
    real = pipeline.stores["cloud_logging"]
    pipeline.stores["cloud_logging"] = _FailingErase(real, error, late=how == "after")
    request = file_request(pipeline, "acme")

    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            process_pending(pipeline)
    else:
        [paused] = process_pending(pipeline)
        assert paused.state == "in_progress" and "logs unreachable" in paused.error
    stopped = get_request(pipeline, request.request_id)
    assert stopped.state == "in_progress"
    assert stopped.receipt["stores"]["long_term"]["records"] == 13
    assert "erased_at" not in stopped.receipt["stores"].get("cloud_logging", {})
    assert pipeline.keyring.key_state(stopped.subject_ref) == "active"

    [done] = process_pending(pipeline)
    assert done.state == "completed" and done.error is None
    swept = done.receipt["stores"]["long_term"]
    assert swept.pop("swept_at") > swept["erased_at"]  # swept once more after the key was shredded
    assert swept == stopped.receipt["stores"]["long_term"]  # not erased twice
    logged = done.receipt["stores"]["cloud_logging"]
    assert (logged["segments"], logged["records"]) == (12, 12)
    actions = _actions(pipeline, request.request_id)
    assert actions.count("erasure.completed") == actions.count("key.destroyed") == 1
    assert actions.count("store.erased") == 2
    assert _accounts(pipeline, "cloud_logging") == {"globex"}
    assert process_pending(pipeline) == []


@pytest.mark.parametrize("stopped", ["before its entry", "before its receipt"])
def test_a_run_stopped_after_destroying_the_key_is_resumed_with_the_true_count_and_one_entry(
    pipeline, monkeypatch, stopped
) -> None:  # noqa: ANN001
    """Killed after the destroy: the resumed run found no key live, and its receipt said 0 keys destroyed, citing
    a second key.destroyed entry (``keys: 0``) beside the first. Killed while writing the entry, the destruction
    commits with it or not at all: a destruction the trail did not hold was guessed from the keyring's times,
    and an erasure of the same subject beside it was counted as this one's (r45)."""
    from pipeline.retention import requests

    request = file_request(pipeline, "acme")
    append_within, save = pipeline.audit.append_within, requests._save

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt("killed")

    def append_unless_destroyed(conn, action: str, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return killed() if action == "key.destroyed" else append_within(conn, action, **kwargs)

    def save_unless_destroyed(pipeline, request):  # noqa: ANN001, ANN202
        return killed() if "key" in request.receipt else save(pipeline, request)

    if stopped == "before its entry":  # in the destruction's transaction
        monkeypatch.setattr(pipeline.audit, "append_within", append_unless_destroyed)
    else:
        monkeypatch.setattr(requests, "_save", save_unless_destroyed)
    with pytest.raises(KeyboardInterrupt):
        process_pending(pipeline)
    monkeypatch.undo()
    assert pipeline.keyring.key_state(request.subject_ref) == (
        "active" if stopped == "before its entry" else "destroyed"
    )

    [done] = process_pending(pipeline)
    assert done.state == "completed"
    assert done.receipt["key"]["keys_destroyed"] == 3  # acme's key, ann's and bob's
    assert _actions(pipeline, request.request_id).count("key.destroyed") == 1
    assert run("erase", "status", request.request_id).exit_code == 0


def test_a_run_stopped_while_completing_is_resumed_with_one_completion_and_one_rotation(pipeline, monkeypatch) -> None:  # noqa: ANN001
    """Killed after its erasure.completed entry, before the request's state: the trail said completed of a
    request in progress for 10 minutes, and the resumed run rotated and audited completion again."""
    from pipeline.retention import requests

    request = file_request(pipeline, "acme")
    save_on = requests._save_on

    def killed_when_completed(conn, request):  # noqa: ANN001, ANN202
        if request.state == "completed":
            raise KeyboardInterrupt("killed")
        return save_on(conn, request)

    monkeypatch.setattr(requests, "_save_on", killed_when_completed)
    with pytest.raises(KeyboardInterrupt):
        process_pending(pipeline)
    monkeypatch.undo()
    assert get_request(pipeline, request.request_id).state == "in_progress"
    assert "erasure.completed" not in _actions(pipeline, request.request_id)

    [done] = process_pending(pipeline)
    assert done.state == "completed"
    assert _actions(pipeline, request.request_id).count("erasure.completed") == 1
    assert [e.action for e in pipeline.audit.entries(actions=["key.rotated"])] == ["key.rotated"]
    assert run("erase", "status", request.request_id).exit_code == 0


def test_a_run_stopped_right_after_its_rotation_is_resumed_without_another(pipeline, monkeypatch) -> None:  # noqa: ANN001
    """Killed after the rotation committed and before the receipt noted it (activation, compaction), the
    resumed run rotated again: two key.rotated entries naming the request, a master version more."""
    request = file_request(pipeline, "acme")
    compact = pipeline.keyring.compact

    def killed_once_rotated() -> None:  # the key's destruction compacts too, before the rotation
        if pipeline.audit.last("key.rotated") is not None:
            raise KeyboardInterrupt("killed")
        compact()

    monkeypatch.setattr(pipeline.keyring, "compact", killed_once_rotated)
    with pytest.raises(KeyboardInterrupt):
        process_pending(pipeline)
    monkeypatch.undo()
    [done] = process_pending(pipeline)
    assert done.state == "completed"
    assert [e.details["after_erasures"] for e in pipeline.audit.entries(actions=["key.rotated"])] == [
        [request.request_id]
    ]
    assert run("erase", "status", request.request_id).exit_code == 0


def test_each_receipt_counts_the_keys_its_own_erasure_destroyed(pipeline) -> None:  # noqa: ANN001
    """Counted as keys destroyed since the filing, ann's and then acme's erasure said 1 and 3 of three keys,
    and a request filed on a host whose clock ran ahead said 0."""
    ann = file_request(pipeline, "acme", "ann")
    acme = file_request(pipeline, "acme", now=utcnow() + timedelta(minutes=1))  # the filing host's clock ahead
    process_pending(pipeline)
    assert get_request(pipeline, ann.request_id).receipt["key"]["keys_destroyed"] == 1
    assert get_request(pipeline, acme.request_id).receipt["key"]["keys_destroyed"] == 2  # acme's and bob's


def test_a_refiling_for_a_subject_erased_before_claims_no_destruction_of_its_own(pipeline) -> None:  # noqa: ANN001
    """Nothing stored since ann's erasure: the refiling wrote a ``key.destroyed`` entry of 0 keys, and its
    receipt said the key was destroyed at its own run's time. Its receipt still checks out."""
    from pipeline.retention.requests import receipt_disagreements

    first = file_request(pipeline, "acme", "ann")
    process_pending(pipeline)
    again = file_request(pipeline, "acme", "ann")
    [done] = process_pending(pipeline)
    assert done.state == "completed"
    [entry] = pipeline.audit.entries(actions=["key.destroyed"])  # the first request's: the refiling cites it
    assert entry.details["request_id"] == first.request_id
    assert done.receipt["key"] == {
        "state": "destroyed",
        "keys_destroyed": 0,
        "destroyed_at": entry.recorded_at.isoformat(),
        "audit_seq": entry.seq,
        "destroyed_by": first.request_id,
    }
    assert receipt_disagreements(pipeline, done) == []
    assert run("erase", "status", again.request_id).exit_code == 0
    # citing another subject's destruction as the one before it
    globex = file_request(pipeline, "globex")
    process_pending(pipeline)
    [_, globex_entry] = pipeline.audit.entries(actions=["key.destroyed"])
    elsewhere = get_request(pipeline, again.request_id)
    elsewhere.receipt["key"].update(audit_seq=globex_entry.seq, destroyed_by=globex.request_id)
    elsewhere.receipt["key"]["destroyed_at"] = globex_entry.recorded_at.isoformat()
    said = receipt_disagreements(pipeline, elsewhere)
    assert said == [
        f"it cites audit entry {globex_entry.seq} as its key's destruction, which destroyed another subject's"
    ]
    # a receipt of a request that did destroy keys, edited to claim none, still cites nothing of the trail's
    receipt = get_request(pipeline, first.request_id)
    receipt.receipt["key"] = {"state": "destroyed", "keys_destroyed": 0}
    assert "it cites no key.destroyed entry" in receipt_disagreements(pipeline, receipt)


def test_erasures_of_an_account_and_its_user_at_once_each_count_only_the_keys_they_destroyed(pipeline) -> None:  # noqa: ANN001
    """Counted as the keys destroyed since its filing, ann's erasure claimed (with an entry of its own) the key
    the account's erasure had destroyed just before: the trail vouched for 4 keys where 3 died (r45)."""
    from pipeline.retention.requests import receipt_disagreements

    acme = file_request(pipeline, "acme")
    ann = file_request(pipeline, "acme", "ann")
    process_pending(pipeline)
    receipts = {r.request_id: get_request(pipeline, r.request_id) for r in (acme, ann)}
    assert receipts[acme.request_id].receipt["key"]["keys_destroyed"] == 3  # acme's, ann's and bob's
    entries = list(pipeline.audit.entries(actions=["key.destroyed"]))
    assert [(e.details["request_id"], e.details["keys"]) for e in entries] == [(acme.request_id, 3)]
    ann_key = receipts[ann.request_id].receipt["key"]
    assert (ann_key["keys_destroyed"], ann_key["destroyed_by"], ann_key["audit_seq"]) == (
        0,
        acme.request_id,
        entries[0].seq,
    )
    assert all(receipt_disagreements(pipeline, r) == [] for r in receipts.values())


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            lambda r: r["stores"].update(
                long_term={"segments": 10, "records": 500, "erased_at": "2026-03-01T00:00:00"}
            ),
            "it cites no store.erased entry for long_term",
        ),
        (lambda r: r.update(key={"state": "destroyed", "keys_destroyed": 1}), "it cites no key.destroyed entry"),
        (lambda r: r.update(key={"state": "destroyed", "keys_destroyed": 0}), "it cites no key.destroyed entry"),
        (
            lambda r: r.update(key={"state": "destroyed", "keys_destroyed": 0, "destroyed_at": "2026-03-01T00:00:00"}),
            "it cites no key.destroyed entry",
        ),
        (lambda r: r["audit"].update(pending="x"), "it cites 'x' as erasure.pending, which is no audit entry's number"),
        (
            lambda r: r["audit"].update(pending=10**30),
            f"it cites {10**30} as erasure.pending, which is no audit entry's number",
        ),
    ],
)
def test_an_unfinished_requests_receipt_edited_to_claim_an_erasure_disagrees(pipeline, edit, named) -> None:  # noqa: ANN001
    """Only a completed receipt was checked for what it must cite: a pending one edited to say 500 records erased
    and the key destroyed checked out (and its run would then skip both as done); a number no audit entry can
    have was an error or a traceback, not a disagreement (r45)."""
    from pipeline.retention.requests import _save, receipt_disagreements

    request = file_request(pipeline, "acme", "ann")
    edit(request.receipt)
    assert named in receipt_disagreements(pipeline, request)
    if "pending" in named:  # not a claim of anything done
        return
    _save(pipeline, request)  # and its run takes none of it for done (r47: the key stayed live)
    [done] = process_pending(pipeline)
    assert done.state == "completed" and receipt_disagreements(pipeline, done) == []
    assert pipeline.keyring.key_state(request.subject_ref, request.user_ref) == "destroyed"
    assert done.receipt["key"]["keys_destroyed"] == 1
    assert (done.receipt["stores"]["long_term"]["records"], _accounts(pipeline, "long_term")) == (6, {"acme", "globex"})
    assert {r["user"] for r in pipeline.read_records("long_term", account="acme")} == {"bob", None}


def test_a_receipt_holding_a_rotation_its_trail_never_made_is_rotated_for_and_named(pipeline) -> None:  # noqa: ANN001
    """A pending receipt edited to hold a rotation kept its run from rotating the master key: a backup from before
    the erasure opened the shredded key for good, while the receipt said final (r48)."""
    from pipeline.retention.requests import _save, receipt_disagreements

    request = file_request(pipeline, "acme", "ann")
    request.receipt["rotation"] = {"master_key_version": 1, "final_at": "2026-03-02T00:00:00+00:00"}
    assert "it cites no key.rotated entry" in receipt_disagreements(pipeline, request)
    _save(pipeline, request)
    [done] = process_pending(pipeline)
    [rotation] = pipeline.audit.entries(actions=["key.rotated"])
    assert rotation.details["after_erasures"] == [request.request_id]
    assert done.receipt["rotation"]["audit_seq"] == rotation.seq and receipt_disagreements(pipeline, done) == []


def test_a_receipt_citing_a_destruction_not_its_own_is_named(pipeline) -> None:  # noqa: ANN001
    """Edits that passed (r48): keys counted beside another erasure's destruction; a destruction made after the
    request completed; an older one where the request's own entry records the keys it destroyed."""
    from pipeline.retention.requests import receipt_disagreements

    first = file_request(pipeline, "acme", "ann")
    process_pending(pipeline)
    refiled = file_request(pipeline, "acme", "ann")
    process_pending(pipeline)
    pipeline.write_records([make_record("cluster_snapshot", account="acme", user="ann", observed_at=utcnow())])
    again = file_request(pipeline, "acme", "ann")  # destroys ann's new key itself
    process_pending(pipeline)
    entries = {e.details["request_id"]: e for e in pipeline.audit.entries(actions=["key.destroyed"])}
    assert set(entries) == {first.request_id, again.request_id}

    def said(request: Any, **key: Any) -> list[str]:
        edited = get_request(pipeline, request.request_id)
        edited.receipt["key"].update(key)
        return receipt_disagreements(pipeline, edited)

    assert said(refiled) == []
    assert "it counts 7 keys destroyed, and cites another erasure's destruction" in said(refiled, keys_destroyed=7)
    later = entries[again.request_id]
    moved = said(
        refiled, audit_seq=later.seq, destroyed_by=again.request_id, destroyed_at=later.recorded_at.isoformat()
    )
    assert f"it cites audit entry {later.seq} as its key's destruction, made after it completed" in moved
    older = entries[first.request_id]
    hidden = said(
        again,
        keys_destroyed=0,
        audit_seq=older.seq,
        destroyed_by=first.request_id,
        destroyed_at=older.recorded_at.isoformat(),
    )
    assert f"it cites no key.destroyed entry of its own (audit entry {later.seq})" in hidden


def test_an_earlier_releases_erasure_killed_after_its_destruction_gets_its_entry(pipeline) -> None:  # noqa: ANN001
    """A release before this one destroyed the keys and wrote their entry in two transactions: resumed after a
    kill in between, the run found no key live, wrote no entry, and its receipt failed the check (r48)."""
    from pipeline.retention.requests import _save, receipt_disagreements

    request = file_request(pipeline, "acme", "ann")
    del request.receipt["key_at_filing"]  # filed as that release did, and begun: a store counted, then the keys
    request.receipt["stores"] = {"long_term": {"started_at": utcnow().isoformat(), "segments": 6, "records": 6}}
    _save(pipeline, request)
    assert pipeline.keyring.destroy(request.subject_ref, request.user_ref) == 1  # its run, killed here
    [done] = process_pending(pipeline)
    [entry] = pipeline.audit.entries(actions=["key.destroyed"])
    assert (entry.details["request_id"], entry.details["keys"]) == (request.request_id, 1)
    assert done.receipt["key"]["audit_seq"] == entry.seq and receipt_disagreements(pipeline, done) == []
    assert "note" not in done.receipt  # its stores held ann's records: not "nothing to erase"


def test_earlier_releases_receipts_keep_one_rotation_one_destruction_and_check_out(pipeline) -> None:  # noqa: ANN001
    """Receipts an earlier release wrote (r50): a rotation in the trail its killed run never noted was made a
    second time at `init` and failed the check until then; a user's erasure filed after her account's counted her
    key again with a second entry; a resumed run's second entry of its own was taken for another's."""
    from pipeline.retention.requests import _entry, _save, receipt_disagreements, rotate_for_unrotated

    acme, ann = file_request(pipeline, "acme"), file_request(pipeline, "acme", "ann")
    for request in (acme, ann):  # filed as that release did
        del request.receipt["key_at_filing"]
        _save(pipeline, request)
    process_pending(pipeline)
    destroyed = list(pipeline.audit.entries(actions=["key.destroyed"]))
    assert [(e.details["request_id"], e.details["keys"]) for e in destroyed] == [(acme.request_id, 3)]
    assert get_request(pipeline, ann.request_id).receipt["key"]["destroyed_by"] == acme.request_id

    done = get_request(pipeline, acme.request_id)
    del done.receipt["rotation"]  # killed after its rotation, before noting it
    _save(pipeline, done)
    assert rotate_for_unrotated(pipeline) == []
    rotations = list(pipeline.audit.entries(actions=["key.rotated"]))
    assert (
        len(rotations) == 1
        and get_request(pipeline, acme.request_id).receipt["rotation"]["audit_seq"] == rotations[0].seq
    )

    again = pipeline.audit.append(**_entry(done, "key.destroyed", keys=0))  # its resumed run's own second entry
    resumed = get_request(pipeline, acme.request_id)
    resumed.receipt["key"].update(keys_destroyed=0, audit_seq=again.seq, destroyed_at=again.recorded_at.isoformat())
    assert receipt_disagreements(pipeline, resumed) == []
    assert all(receipt_disagreements(pipeline, get_request(pipeline, r.request_id)) == [] for r in (acme, ann))


def test_a_store_that_refuses_fails_the_request_with_the_reason(pipeline) -> None:
    pipeline.stores["cloud_logging"] = _FailingErase(pipeline.stores["cloud_logging"], StoreError("disk is read-only"))
    request = file_request(pipeline, "acme")
    [failed] = process_pending(pipeline)
    assert failed.state == "failed"
    assert failed.error == "disk is read-only"
    assert _actions(pipeline, request.request_id)[-1] == "erasure.failed"
    assert process_pending(pipeline) == []  # failed requests are not retried behind anyone's back


def test_a_request_another_process_is_working_on_is_left_alone(pipeline) -> None:
    request = file_request(pipeline, "acme")
    other = Leases(pipeline.keyring.engine, holder="other-host:1")
    assert other.acquire(f"erasure:{request.request_id}", timedelta(minutes=10))
    assert process_pending(pipeline) == []
    other.release(f"erasure:{request.request_id}")
    assert [r.state for r in process_pending(pipeline)] == ["completed"]


def test_the_table_holds_refs_only(pipeline) -> None:
    request = file_request(pipeline, "acme", "ann", reason="because")
    with pipeline.keyring.engine.connect() as conn:
        row = conn.execute(select(deletion_requests)).one()
    assert row.subject_ref == pipeline.keyring.subject_ref("acme")
    assert row.user_ref == pipeline.keyring.user_ref("acme", "ann")
    assert "because" not in row.reason
    assert json.loads(row.receipt)["audit"]["pending"] >= 1
    assert request.reason == "because"
