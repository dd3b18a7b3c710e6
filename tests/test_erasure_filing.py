"""Filing an erasure: one open request per subject, even when several ``serve`` processes file at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from pipeline.retention.requests import file_unless_open, list_requests
from pipeline.runtime import Pipeline

FILERS = 4


def test_filings_for_one_subject_at_once_leave_one_open_request(pipeline: Pipeline) -> None:
    """Each thread stands for a ``serve`` process: no lock of this process orders them, only the database."""
    for round_ in range(8):
        start = threading.Barrier(FILERS)

        def file(_n: int, user: str = f"user-{round_}", start: threading.Barrier = start) -> tuple[str, bool]:
            start.wait()
            request, new = file_unless_open(pipeline, "acme", user)
            return request.request_id, new

        with ThreadPoolExecutor(FILERS) as pool:
            filings = list(pool.map(file, range(FILERS)))
        assert sum(new for _id, new in filings) == 1, filings
        assert len({request_id for request_id, _new in filings}) == 1, filings
    assert len(list_requests(pipeline, states=("pending",))) == 8


def test_a_request_and_its_audit_entry_are_filed_together(pipeline: Pipeline) -> None:
    request, new = file_unless_open(pipeline, "acme", "ann", "asked by mail")
    again, new_again = file_unless_open(pipeline, "acme", "ann")
    account_wide, new_account = file_unless_open(pipeline, "acme")  # the account's own: another subject
    assert (new, new_again, new_account) == (True, False, True)
    assert again.request_id == request.request_id != account_wide.request_id
    pending = [e for e in pipeline.audit.entries() if e.action == "erasure.pending"]
    assert [e.details["request_id"] for e in pending] == [request.request_id, account_wide.request_id]
    assert request.receipt["audit"]["pending"] == pending[0].seq
