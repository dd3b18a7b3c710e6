"""The retention commands as a user runs them: enforce, serve, erase request|status|list."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import make_record

from pipeline.cli import main
from pipeline.runtime import Pipeline

DAY0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout


def _records(*args: str) -> list[dict]:
    return [json.loads(line) for line in cli("records", "--json", *args).splitlines()]


def _write(settings, **fields) -> Pipeline:  # noqa: ANN001, ANN003
    """Two accounts with one record of each kind (observed now unless ``observed_at`` says)."""
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records(
        make_record(kind, account=account, **fields)
        for account in ("acme", "globex")
        for kind in ("cluster_snapshot", "job", "software_env", "account")
    )
    return pipeline


@pytest.fixture
def pipeline(settings) -> Pipeline:
    return _write(settings)


def test_enforce_now_keeps_day_0_logs_on_day_29_removes_them_on_day_31(settings) -> None:
    _write(settings, observed_at=DAY0)
    day = lambda n: (DAY0 + timedelta(days=n)).isoformat()  # noqa: E731

    summary = json.loads(cli("enforce", "--now", day(29), "--json"))
    assert summary["retention"]["records_removed"] == 0
    assert len(_records("--store", "cloud_logging")) == 6

    summary = json.loads(cli("enforce", "--now", day(31), "--json"))
    removed = summary["retention"]["removed"]["cloud_logging"]
    assert (removed["cluster_jobs"]["records"], removed["software_env"]["records"]) == (4, 2)
    assert summary["retention"]["now"] == day(31)
    assert _records("--store", "cloud_logging") == []

    cli("enforce", "--now", day(400))
    assert len(_records()) == 8
    assert {r["data_type"] for r in _records()} == {"account", "cluster_jobs", "software_env"}


def test_erase_request_again_prints_the_open_request_of_the_subject(pipeline) -> None:
    """As the API answers: a subject has at most one open request, locally too."""
    first = cli("erase", "request", "--account", "acme", "--user", "ann").strip()
    again = CliRunner().invoke(main, ["erase", "request", "--account", "acme", "--user", "ann"])
    assert (again.exit_code, again.stdout.strip()) == (0, first)
    assert "has an open request" in again.stderr and "not filed again" in again.stderr
    account_wide = cli("erase", "request", "--account", "acme").strip()  # the account's own: another subject
    assert account_wide != first
    assert len(cli("erase", "list", "--json").splitlines()) == 2


def test_erase_request_with_suppress_for_an_open_request_without_it_makes_that_one_suppress(pipeline) -> None:
    """The refiling answered the open request and dropped --suppress without a word: once the erasure
    completed, the user's new records were stored again."""
    first = cli("erase", "request", "--account", "acme", "--user", "ann").strip()
    again = CliRunner().invoke(main, ["erase", "request", "--account", "acme", "--user", "ann", "--suppress"])
    assert (again.exit_code, again.stdout.strip()) == (0, first)
    assert "it now suppresses later records too" in again.stderr
    cli("enforce")
    assert json.loads(cli("erase", "status", first, "--json"))["receipt"]["suppress"] is True
    back = CliRunner().invoke(main, ["accounts", "add", "--account", "acme", "--username", "ann", "--email", "a@x"])
    assert back.exit_code == 2 and "erasure" in back.stderr
    assert [e.details["request_id"] for e in pipeline.audit.entries() if e.action == "erasure.suppressed"] == [first]


def test_a_refiling_with_suppress_while_the_erasure_runs_makes_no_key_and_the_receipt_keeps_it(
    pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """acme's key is destroyed; while globex's stores are erased in the same pass, acme is refiled with
    --suppress and a reason. Sealing that reason made acme a live key again, and the pass wrote back the
    receipt it had read, without suppress."""
    from pipeline.retention.requests import get_request, process_pending
    from pipeline.stores.localfiles import LocalFileStore

    acme = cli("erase", "request", "--account", "acme").strip()
    cli("erase", "request", "--account", "globex")
    erase = LocalFileStore.erase
    globex = pipeline.keyring.subject_ref("globex")

    def refiled_meanwhile(store: LocalFileStore, subject_ref: str, user_ref: str | None = None) -> Any:
        if subject_ref == globex:
            cli("erase", "request", "--account", "acme", "--suppress", "--reason", "again")
        return erase(store, subject_ref, user_ref)

    monkeypatch.setattr(LocalFileStore, "erase", refiled_meanwhile)
    assert {r.state for r in process_pending(pipeline)} == {"completed"}
    assert pipeline.keyring.key_state(pipeline.keyring.subject_ref("acme")) == "destroyed"
    assert get_request(pipeline, acme).receipt["suppress"] is True
    assert cli("erase", "status", acme)


def test_erase_request_with_suppress_after_a_lift_suppresses_again(pipeline) -> None:
    first = cli("erase", "request", "--account", "acme", "--user", "ann", "--suppress").strip()
    cli("erase", "lift", first)
    assert cli("erase", "request", "--account", "acme", "--user", "ann", "--suppress").strip() == first
    cli("enforce")
    back = CliRunner().invoke(main, ["accounts", "add", "--account", "acme", "--username", "ann", "--email", "a@x"])
    assert back.exit_code == 2, back.output
    assert [e.details["request_id"] for e in pipeline.audit.entries() if e.action == "erasure.suppressed"] == [first]


def test_erase_request_enforce_status_list(pipeline) -> None:
    request_id = cli("erase", "request", "--account", "acme", "--reason", "GDPR art. 17 request #4411").strip()
    [listed] = [json.loads(line) for line in cli("erase", "list", "--json").splitlines()]
    assert (listed["request_id"], listed["state"], listed["overdue"]) == (request_id, "pending", False)

    summary = json.loads(cli("enforce", "--json"))
    assert summary["requests"] == [{"request_id": request_id, "state": "completed", "error": None}]

    status = json.loads(cli("erase", "status", request_id, "--json"))
    assert status["state"] == "completed"
    assert status["reason"] is None  # shredded with the subject's key; its hash stays
    assert status["receipt"]["reason_sha256"] == hashlib.sha256(b"GDPR art. 17 request #4411").hexdigest()
    assert {s: r["records"] for s, r in status["receipt"]["stores"].items()} == {"long_term": 4, "cloud_logging": 3}
    assert all("erased_at" in r and "audit_seq" in r for r in status["receipt"]["stores"].values())
    assert status["receipt"]["key"]["state"] == "destroyed"
    text = cli("erase", "status", request_id)
    assert "completed" in text and "long_term" in text and "data key: destroyed" in text
    final = datetime.fromisoformat(status["final_at"])
    assert final - datetime.fromisoformat(status["completed_at"]) < timedelta(days=35, minutes=1)
    assert f"final on {final:%Y-%m-%d %H:%M} UTC" in text

    for store in ("long_term", "cloud_logging"):  # erased: the answer for an account never seen
        gone = CliRunner().invoke(main, ["records", "--account", "acme", "--store", store])
        assert (gone.exit_code, gone.stdout) == (2, "")
        assert gone.stderr == "error: unknown account 'acme': no records are stored for it\n"
    assert {r["account"] for r in _records()} == {"globex"}


def test_erase_status_checks_the_receipt_against_the_audit_entries_it_cites(pipeline) -> None:
    """A receipt edited in the database (500 records erased, where 4 were) showed as it said, while
    `audit verify` found the trail intact."""
    from sqlalchemy import func, update

    from pipeline.db import audit_log, deletion_requests

    request_id = cli("erase", "request", "--account", "acme").strip()
    cli("enforce")
    cli("erase", "status", request_id)  # it agrees: exit 0
    receipt = update(deletion_requests).where(deletion_requests.c.request_id == request_id)
    erased_entry = update(audit_log).where(audit_log.c.action == "store.erased")

    def status_after(edit: Any) -> Result:
        """``erase status`` once ``edit`` changed the database."""
        with pipeline.keyring.engine.begin() as conn:
            conn.execute(edit)
        return CliRunner().invoke(main, ["erase", "status", request_id])

    result = status_after(
        receipt.values(receipt=func.replace(deletion_requests.c.receipt, '"records": 4', '"records": 500'))
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"check failed: the receipt of {request_id} disagrees with the audit trail: ")
    assert "records 500, audit entry" in result.stderr and "says 4" in result.stderr

    # the cited entry edited the same way: its own hash and signature no longer hold (they were not checked)
    result = status_after(
        erased_entry.values(details=func.replace(audit_log.c.details, '"records": 4', '"records": 500'))
    )
    assert result.exit_code == 1, result.output
    assert "whose content does not match its hash (altered)" in result.stderr

    quoted = func.replace(deletion_requests.c.receipt, '"audit_seq": ', '"audit_seq": "7", "was": ')  # a traceback
    result = status_after(receipt.values(receipt=quoted))
    assert result.exit_code == 1, result.output
    assert "it cites '7' as store.erased, which is no audit entry's number" in result.stderr

    # one that no longer reads (a key twice, not JSON): a failed check too (it was exit 2, as bad input)
    result = status_after(
        erased_entry.values(details=func.replace(audit_log.c.details, '"records": 500', '"records": 4, "records": 4'))
    )
    assert result.exit_code == 1, result.output
    assert "the audit trail fails its check (audit entry " in result.stderr
    assert "details name a key twice (altered)), so no entry it cites can vouch for it" in result.stderr


@pytest.mark.parametrize("field", ["final_at", "rotated_at", "completed_at"])
def test_erase_status_names_a_time_of_the_receipt_edited_in_the_database(pipeline, field: str) -> None:  # noqa: ANN001
    """Of the rotation only its master key version was compared: a receipt edited to be final sooner than
    the old keys retire, or a completion moved before the filing (a negative time to complete in the
    report), showed as it said (exit 0)."""
    from sqlalchemy import select, update

    from pipeline.db import deletion_requests

    request_id = cli("erase", "request", "--account", "acme").strip()
    cli("enforce")
    cli("erase", "status", request_id)  # it agrees: exit 0
    forged = datetime(2026, 1, 1, tzinfo=UTC)
    this = deletion_requests.c.request_id == request_id
    with pipeline.keyring.engine.begin() as conn:
        receipt = json.loads(conn.scalar(select(deletion_requests.c.receipt).where(this)))
        if field == "completed_at":
            conn.execute(update(deletion_requests).where(this).values(completed_at=forged))
        else:
            receipt["rotation"][field] = forged.isoformat()
            conn.execute(update(deletion_requests).where(this).values(receipt=json.dumps(receipt)))
    result = CliRunner().invoke(main, ["erase", "status", request_id])
    assert result.exit_code == 1, result.output
    assert f"{field} '{forged.isoformat()}', audit entry " in result.stderr


@pytest.mark.parametrize("cut", ["audit_seq", "rotation"])
def test_erase_status_names_a_receipt_whose_rotation_no_longer_cites_its_entry(pipeline, cut: str) -> None:  # noqa: ANN001
    """With its citation (or the whole rotation) taken out, a receipt's final_at was only its own say: edited
    to a day before the completion, it passed (exit 0), and the report listed the erasure as final."""
    from sqlalchemy import select, update

    from pipeline.db import deletion_requests

    request_id = cli("erase", "request", "--account", "acme").strip()
    cli("enforce")
    this = deletion_requests.c.request_id == request_id
    with pipeline.keyring.engine.begin() as conn:
        receipt = json.loads(conn.scalar(select(deletion_requests.c.receipt).where(this)))
        if cut == "rotation":
            del receipt["rotation"]
        else:
            del receipt["rotation"]["audit_seq"]
            receipt["rotation"]["final_at"] = "2026-01-01T00:00:00+00:00"
        conn.execute(update(deletion_requests).where(this).values(receipt=json.dumps(receipt)))
    result = CliRunner().invoke(main, ["erase", "status", request_id])
    assert result.exit_code == 1, result.output
    assert "it cites no key.rotated entry, and the trail rotated the master key after it" in result.stderr


@pytest.mark.parametrize("when", ["before the request", "before, pending uncited", "after, before the erasure"])
def test_erase_status_names_a_receipt_citing_a_rotation_not_made_for_its_request(pipeline, when: str) -> None:  # noqa: ANN001
    """Only the cited rotation's figures were compared: a receipt edited to cite a rotation an operator made
    (its figures copied, final sooner) passed, and the report listed the erasure as final. Such a rotation
    re-wraps keys still alive, whether made before the request (its ``pending`` entry cited or removed) or
    after it but before the erasure destroyed the key."""
    from sqlalchemy import select, update

    from pipeline.db import deletion_requests
    from pipeline.retention.requests import _rotation

    if when != "after, before the erasure":
        cli("keys", "rotate")
    request_id = cli("erase", "request", "--account", "acme").strip()
    if when == "after, before the erasure":
        cli("keys", "rotate")
    (manual,) = pipeline.audit.entries(actions=("key.rotated",))
    cli("enforce")
    this = deletion_requests.c.request_id == request_id
    with pipeline.keyring.engine.begin() as conn:
        receipt = json.loads(conn.scalar(select(deletion_requests.c.receipt).where(this)))
        assert receipt["rotation"]["audit_seq"] > manual.seq
        receipt["rotation"] = {**_rotation(pipeline, manual), "audit_seq": manual.seq}
        if when == "before, pending uncited":
            del receipt["audit"]["pending"]
        conn.execute(update(deletion_requests).where(this).values(receipt=json.dumps(receipt)))
    result = CliRunner().invoke(main, ["erase", "status", request_id])
    assert result.exit_code == 1, result.output
    assert f"it cites audit entry {manual.seq} as its rotation, which was not made for it" in result.stderr


def test_erase_status_names_a_completion_forged_in_the_database_that_cites_no_audit_entry(pipeline) -> None:
    """A pending request edited into a completed one with a receipt that cites nothing: it had nothing to
    disagree with, so it showed completed (exit 0) while the data stayed readable."""
    from sqlalchemy import update

    from pipeline.db import deletion_requests

    request_id = cli("erase", "request", "--account", "acme").strip()
    at = "2026-12-07T01:00:00+00:00"
    receipt = {
        "scope": "account",
        "suppress": False,
        "stores": {"long_term": {"records": 4, "segments": 1, "started_at": at, "erased_at": at}},
        "key": {"state": "destroyed", "keys_destroyed": 1, "destroyed_at": at},
    }
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(
            update(deletion_requests)
            .where(deletion_requests.c.request_id == request_id)
            .values(state="completed", completed_at=datetime.fromisoformat(at), receipt=json.dumps(receipt))
        )
    result = CliRunner().invoke(main, ["erase", "status", request_id])
    assert result.exit_code == 1, result.output
    for missing in ("no erasure.completed entry", "no store.erased entry for long_term", "no key.destroyed entry"):
        assert missing in result.stderr


def test_erase_status_of_an_unknown_id_is_bad_input(pipeline) -> None:
    result = CliRunner().invoke(main, ["erase", "status", "no-such-id"])
    assert result.exit_code == 2
    assert result.stderr == "error: no deletion request with id 'no-such-id'\n"


@pytest.mark.parametrize(
    "command", [["enforce"], ["records", "--json"], ["audit", "verify"], ["erase", "list"], ["tokens", "list"]]
)
def test_a_command_before_init_says_what_to_do_and_makes_nothing(home, command) -> None:  # noqa: ANN001
    """It said so after making the metadata database, schema and all (r44)."""
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2
    assert result.stderr == f"error: metadata database {home}/metadata.db does not exist; run metadata-pipeline init\n"
    assert not home.exists() or not any(home.iterdir())


def test_enforce_exits_1_while_a_request_is_overdue(settings) -> None:  # noqa: ANN001
    from pipeline.retention.lease import Leases
    from pipeline.retention.requests import file_request

    pipeline = _write(settings)
    request = file_request(pipeline, "acme", now=DAY0)
    stuck = Leases(pipeline.keyring.engine, holder="other-host:1")  # another process holds it
    assert stuck.acquire(f"erasure:{request.request_id}", timedelta(minutes=10))
    day31 = (DAY0 + timedelta(days=31)).isoformat()
    result = CliRunner().invoke(main, ["enforce", "--now", day31, "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["overdue_requests"] == [request.request_id]
    assert result.stderr.strip() == "check failed: 0 deletion requests failed, 1 overdue"

    stuck.release(f"erasure:{request.request_id}")
    summary = json.loads(cli("enforce", "--now", day31, "--json"))  # done, late: nothing is overdue any more
    assert [r["state"] for r in summary["requests"]] == ["completed"] and summary["overdue_requests"] == []


def test_erase_retry_of_a_request_another_process_holds_names_it_and_until_when(settings) -> None:  # noqa: ANN001
    """It said "deletion request … is in_progress: None"."""
    from pipeline.retention.lease import Leases
    from pipeline.retention.requests import file_request

    pipeline = _write(settings)
    request = file_request(pipeline, "acme")
    held = Leases(pipeline.keyring.engine, holder="other-host:4242:ab12cd34")
    assert held.acquire(f"erasure:{request.request_id}", timedelta(minutes=10))
    result = CliRunner().invoke(main, ["erase", "retry", request.request_id])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: deletion request {request.request_id} is being carried out by other-host:4242")
