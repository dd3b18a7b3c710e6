"""``GET /v1/records``: decrypted records as NDJSON, scoped to what the caller may see.

A member sees the accounts of their token only. Asking for another account's
records answers exactly like asking for an account that does not exist (the
same 404 body), so the API is no oracle for which accounts exist. A segment or record that
cannot be read is skipped and named in a ``{"skipped": ...}`` line at the end of the stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
from collections.abc import Generator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from pipeline.errors import UnknownAccountError
from pipeline.output import to_json
from pipeline.principals import Principal
from pipeline.records import DATA_TYPES, KINDS
from pipeline.retention.policy import STORES
from pipeline.runtime import Pipeline, Unreadable
from pipeline.server.auth import current_pipeline, require
from pipeline.server.limits import Concurrency, too_many
from pipeline.subject_names import MAX_NAME_CHARS, same

__all__ = ["RecordStreams", "StreamPlace", "router", "visible_account"]

router = APIRouter(tags=["records"])
logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
# the accepted values, as enums in the OpenAPI schema (built from the record and policy contracts)
DataType = Literal[DATA_TYPES]  # type: ignore[valid-type]
KindName = Literal[tuple(KINDS)]  # type: ignore[misc,valid-type]
StoreName = Literal[STORES]  # type: ignore[valid-type]


#: a number where a time belongs (seconds or milliseconds since 1970, to pydantic)
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
#: the one answer for an account the caller may not see or that does not exist: the same bytes
NOT_FOUND = "no such account, or not one your token may read"


def visible_account(pipeline: Pipeline, principal: Principal, account: str | None) -> str | None:
    """The account to read (``None``: every account, admins only).

    A member's own account is always visible, with or without records.

    :raises HTTPException: 404, identical for another account and an unknown one
    """
    if account is None and not principal.sees_every_account:
        account = principal.account
    if account is None or (principal.kind == "member" and same(account, principal.account)):
        return account
    if not principal.may_read(account):
        raise HTTPException(404, NOT_FOUND)
    try:
        pipeline.subject_ref(account)
    except UnknownAccountError:
        raise HTTPException(404, NOT_FOUND) from None
    return account


@router.get(
    "/v1/records",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}, "description": "One record (JSON object) a line."}},
)
def get_records(
    request: Request,
    principal: Annotated[Principal, Depends(require("member", "admin"))],
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
    account: Annotated[str | None, Query(min_length=1, max_length=MAX_NAME_CHARS)] = None,
    data_type: DataType | None = None,
    kind: KindName | None = None,  # type: ignore[valid-type]
    store: StoreName = "long_term",
    since: datetime | None = None,
    until: datetime | None = None,
) -> StreamingResponse:
    """Records of the caller's account (admin: of every account, or of ``account``)."""
    since, until = _utc("since", since, request), _utc("until", until, request)
    if since is not None and until is not None and since > until:
        raise HTTPException(400, f"since ({since.isoformat()}) is after until ({until.isoformat()}): an empty range")
    account = visible_account(pipeline, principal, account)
    if store not in pipeline.stores:
        raise HTTPException(404, f"store {store!r} is not configured on this control plane")
    streams: RecordStreams = request.app.state.record_streams
    place = streams.take(principal)
    unreadable: list[Unreadable] = []
    rows = pipeline.read_records(store, account=account, data_type=data_type, kind=kind, unreadable=unreadable)
    body = _ndjson(rows, since, until, unreadable, place)
    return StreamingResponse(body, media_type=NDJSON, background=BackgroundTask(_ended, body, place))


#: record streams at once per account, and in all: a stream holds one of the pool's 15 connections
STREAMS_PER_ACCOUNT = 3
STREAMS = 8


class RecordStreams:
    """Record streams in flight, per account (admin: per token) and in all.

    A stream holds a database connection for as long as its reader reads: a reader that hung up
    held it until the garbage collector found the stream, and a tenant's slow or abandoned readers
    took every connection of the pool, so every other tenant's requests waited and failed. A stream
    is closed as its response ends, whichever way; over a limit is 429.
    """

    def __init__(self, per_account: int = STREAMS_PER_ACCOUNT, total: int = STREAMS) -> None:
        self.per_account = Concurrency(per_account)
        self.total = threading.BoundedSemaphore(total)

    def take(self, principal: Principal) -> StreamPlace:
        """A place for the caller's stream.

        :raises HTTPException: 429, the account (or every account together) has as many streams as it may
        """
        reader = str(principal.account) if principal.kind == "member" else f"token {principal.token_id}"
        if not self.total.acquire(blocking=False):
            raise too_many("the control plane streams as many records as it may at once; retry later", 1)
        if not self.per_account.acquire(reader):
            self.total.release()
            raise too_many("this account has as many record streams open as it may; retry later", 1)
        return StreamPlace(self, reader)


class StreamPlace:
    """One stream's places, given back once: when its body ends (read to the end, failed part way, or
    closed), or after its response if the body never started."""

    def __init__(self, streams: RecordStreams, reader: str) -> None:
        self._streams, self._reader = streams, reader
        self._held = True
        self._lock = threading.Lock()

    def give_back(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._streams.per_account.release(self._reader)
            self._streams.total.release()


def _ended(body: Generator[str, None, None], place: StreamPlace) -> None:
    """After the response, however it ended (Starlette leaves a body its reader hung up on suspended): close
    the body, its database connection back to the pool, and give the place back."""
    try:
        body.close()
    finally:
        place.give_back()


def _utc(name: str, moment: datetime | None, request: Request) -> datetime | None:
    """A query's moment in UTC; 400 unless it is ISO 8601 with a time zone within the years 1 to 9999 in UTC
    (as sent: pydantic also takes a bare number, as seconds since 1970)."""
    if moment is None:
        return None
    if _NUMBER.fullmatch(request.query_params.get(name, "").strip()):
        raise HTTPException(400, f"{name}: give an ISO 8601 time with a time zone, e.g. 2026-11-30T12:00:00Z")
    if moment.tzinfo is None:
        raise HTTPException(400, f"{name}: give a time zone, e.g. 2026-11-30T12:00:00Z")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise HTTPException(400, f"{name}: out of range in UTC (years 1 to 9999)") from None


def _ndjson(
    rows: Generator[dict[str, Any], None, None],
    since: datetime | None,
    until: datetime | None,
    unreadable: list[Unreadable],
    place: StreamPlace,
) -> Generator[str, None, None]:
    """Record lines, then one ``{"skipped": {...}}`` line per segment or record that could not be read.

    The status line is sent before the first record, so what was skipped is named in the stream
    itself: one bad row never ends it part way. Closed, it closes the read (and its connection);
    ended, however, it gives its place back (a database gone part way ends it with an error).
    """
    try:
        with contextlib.closing(rows):
            for row in rows:
                observed = row["observed_at"]
                if (since is None or observed >= since) and (until is None or observed < until):
                    yield to_json(row) + "\n"
        for problem in unreadable:
            logger.warning("GET /v1/records skipped %s", problem)
            yield to_json({"skipped": dataclasses.asdict(problem)}) + "\n"
    except UnknownAccountError:  # a member's own account before its first record: nothing to stream
        return
    finally:
        place.give_back()
