"""Deletion requests over the API: admins for anyone, a member for their own user only.

Requests are filed and read through :mod:`pipeline.retention.requests`, the
same code ``erase request|status|list`` runs locally; the retention scheduler
of ``serve`` carries them out. A member sees only requests about their own
user; any other request id answers 404 exactly like an unknown one. Filing is
bounded: one open request per subject, and a filing rate per member.

Filing returns a ``receipt_token`` (shown once, only its SHA-256 kept): an erasure of
their own user ends a member's API token, and with the receipt token the requester
still follows the request to its end (``GET /v1/erasure-requests/{id}/receipt``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select

from pipeline.db import erasure_receipts, transaction
from pipeline.errors import PolicyError
from pipeline.principals import Principal
from pipeline.records import utcnow
from pipeline.retention.requests import (
    DeletionRequest,
    RequestNotFound,
    file_request,
    get_request,
    list_requests,
)
from pipeline.runtime import Pipeline
from pipeline.server.auth import current_pipeline, require, token_sha256
from pipeline.server.limits import RateLimit, too_many
from pipeline.subject_names import MAX_NAME_CHARS, same

__all__ = ["filing_limit", "router"]

RECEIPT_PREFIX = "mr_"

router = APIRouter(tags=["erasure"])
logger = logging.getLogger(__name__)
People = Annotated[Principal, Depends(require("member", "admin"))]


class ErasureIn(BaseModel):
    """``POST /v1/erasure-requests`` body: an account, or one user of it."""

    model_config = ConfigDict(extra="forbid", strict=True)  # each value of its own JSON type: no "yes" or 0 for a bool
    account: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    user: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    reason: str | None = Field(default=None, max_length=2000)
    suppress: bool = False  # also drop records of the subject observed later, until the request is lifted


def _visible(pipeline: Pipeline, principal: Principal, request: DeletionRequest) -> bool:
    if principal.sees_every_account:
        return True
    assert principal.account is not None and principal.user is not None  # member tokens are bound to both
    keyring = pipeline.keyring
    return (request.subject_ref, request.user_ref) == (
        keyring.subject_ref(principal.account),
        keyring.user_ref(principal.account, principal.user),
    )


def filing_limit(pipeline: Pipeline) -> RateLimit:
    """How many requests one member may file (``pipeline.server.erasure-filings-per-hour``)."""
    return RateLimit(pipeline.settings.limits.erasure_filings_per_hour, period=3600)


@router.post("/v1/erasure-requests", status_code=201, responses={200: {"description": "The subject's open request."}})
def file_erasure(
    body: ErasureIn,
    principal: People,
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
    request: Request,
    response: Response,
) -> dict[str, Any]:
    """File a request; a member may ask only for their own user of their own account.

    A subject (an account, or one user of it) has at most one open request: filing again
    answers 200 with the open one. A member may file ``erasure-filings-per-hour`` requests (429 after).
    """
    for what, value in (("account", body.account), ("user", body.user)):
        if value is not None and not value.strip():  # as a token or a cluster refuses it
            raise HTTPException(400, f"{what}: must not be blank")
    if not principal.sees_every_account and not (
        same(body.account, principal.account) and same(body.user, principal.user)
    ):
        raise HTTPException(403, "a member may request erasure of their own user only (give your account and user)")
    if not principal.sees_every_account:
        wait = request.app.state.erasure_filings.take(f"{principal.account}\0{principal.user}")
        if wait:
            raise too_many("you filed as many erasure requests as a member may this hour; retry later", wait)
    try:  # its deadline is the published policy's (serve runs for long)
        pipeline.reload_policy()
    except PolicyError as exc:  # the one in force stays: the next retention pass fails and names it
        logger.error("erasure filed under the policy read before: %s", exc)
    request_id = str(uuid.uuid4())
    filed = file_request(
        pipeline,
        body.account,
        body.user,
        body.reason,
        suppress=body.suppress,
        actor=principal.actor,
        unless_open=True,
        request_id=request_id,
    )
    if filed.request_id != request_id:
        response.status_code = 200  # the open one, with a receipt of the caller's own
    return {**filed.as_dict(), "receipt_token": _issue_receipt(pipeline, filed.request_id)}


def _issue_receipt(pipeline: Pipeline, request_id: str) -> str:
    """A new receipt token for ``request_id``; only its SHA-256 is kept."""
    receipt = RECEIPT_PREFIX + secrets.token_urlsafe(32)
    with transaction(pipeline.keyring.engine, "issuing an erasure receipt") as conn:
        conn.execute(
            insert(erasure_receipts).values(
                token_sha256=token_sha256(receipt), request_id=request_id, created_at=utcnow()
            )
        )
    return receipt


@router.get("/v1/erasure-requests")
def list_erasures(principal: People, pipeline: Annotated[Pipeline, Depends(current_pipeline)]) -> list[dict[str, Any]]:
    """Requests the caller may follow, oldest first."""
    return [r.as_dict() for r in list_requests(pipeline) if _visible(pipeline, principal, r)]


@router.get("/v1/erasure-requests/{request_id}")
def get_erasure(
    request_id: str, principal: People, pipeline: Annotated[Pipeline, Depends(current_pipeline)]
) -> dict[str, Any]:
    """State and receipt of one request."""
    request = get_request(pipeline, request_id)
    if not _visible(pipeline, principal, request):
        raise RequestNotFound(request_id)
    return request.as_dict()


@router.get("/v1/erasure-requests/{request_id}/receipt")
def get_erasure_by_receipt(
    request_id: str,
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
    receipt_token: Annotated[str, Header(max_length=200)],
) -> dict[str, Any]:
    """State and receipt of one request, for whoever holds its receipt token (no API token needed)."""
    with transaction(pipeline.keyring.engine, "reading an erasure receipt") as conn:
        kept = conn.execute(
            select(erasure_receipts.c.request_id).where(erasure_receipts.c.token_sha256 == token_sha256(receipt_token))
        ).scalar_one_or_none()
    if kept is None or not hmac.compare_digest(kept.encode(), request_id.encode()):  # str: ASCII only
        raise RequestNotFound(request_id)
    return get_request(pipeline, request_id).as_dict()
