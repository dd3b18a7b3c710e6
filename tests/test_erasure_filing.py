"""Filing an erasure: one open request per subject, even when several ``serve`` processes file at once."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from pipeline.retention.requests import file_request, list_requests
from pipeline.runtime import Pipeline

FILERS = 4


def test_filings_for_one_subject_at_once_leave_one_open_request(pipeline: Pipeline) -> None:
    """Each thread stands for a ``serve`` process: no lock of this process orders them, only the database."""
    for round_ in range(8):
        start = threading.Barrier(FILERS)

        def file(_n: int, user: str = f"user-{round_}", start: threading.Barrier = start) -> tuple[str, bool]:
            start.wait()
            return _filed(pipeline, "acme", user)

        with ThreadPoolExecutor(FILERS) as pool:
            filings = list(pool.map(file, range(FILERS)))
        assert sum(new for _id, new in filings) == 1, filings
        assert len({request_id for request_id, _new in filings}) == 1, filings
    assert len(list_requests(pipeline, states=("pending",))) == 8


def test_a_request_and_its_audit_entry_are_filed_together(pipeline: Pipeline) -> None:
    request = file_request(pipeline, "acme", "ann", "asked by mail", unless_open=True)
    again_id, new_again = _filed(pipeline, "acme", "ann")
    account_wide_id, new_account = _filed(pipeline, "acme")  # the account's own: another subject
    assert (new_again, new_account) == (False, True)
    assert again_id == request.request_id != account_wide_id
    pending = [e for e in pipeline.audit.entries() if e.action == "erasure.pending"]
    assert [e.details["request_id"] for e in pending] == [request.request_id, account_wide_id]
    assert request.receipt["audit"]["pending"] == pending[0].seq


def _filed(pipeline: Pipeline, account: str, user: str | None = None) -> tuple[str, bool]:
    """The id of the request a filing answers with, and whether it filed it (as the API tells 201 from 200)."""
    request_id = uuid.uuid4().hex
    request = file_request(pipeline, account, user, unless_open=True, request_id=request_id)
    return request.request_id, request.request_id == request_id


def test_a_reason_filed_for_a_subject_never_seen_does_not_make_the_receipt_claim_a_key(pipeline: Pipeline) -> None:
    """Sealing the reason makes the subject's key: the receipt then said one key destroyed, and no word
    that nothing had ever been stored. The same when refiled for a subject erased before."""
    from pipeline.retention.requests import process_pending

    file_request(pipeline, "nobody", "ghost", "typo in the form")
    [done] = process_pending(pipeline)
    assert done.receipt["note"] == "no data was ever stored for this subject: nothing to erase"
    file_request(pipeline, "nobody", "ghost", "asked again")
    [again] = process_pending(pipeline)
    assert again.receipt["note"] == "nothing was stored for this subject since its last erasure: nothing to erase"
