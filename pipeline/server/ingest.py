"""``POST /v1/ingest``: one sealed batch from a cluster, written through ``Pipeline.ingest``.

The handler only applies the fair-share limits (:class:`IngestGate`) and counts;
the app's guard has authenticated the cluster and bounds the body; opening,
validating, scoping (account and cluster id come from the token, never from the
records), idempotency and writing are the one ingest path in the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from pipeline.errors import PipelineError
from pipeline.principals import Principal
from pipeline.runtime import Pipeline
from pipeline.server.auth import cluster_principal
from pipeline.server.limits import Concurrency, FairSlots, RateLimit, too_many
from pipeline.server.threads import in_thread

__all__ = ["BATCH_MEDIA_TYPE", "IngestGate", "router"]

BATCH_MEDIA_TYPE = "application/vnd.metadata-pipeline.batch"
_ACCEPTED = {
    "type": "object",
    "properties": {"records": {"type": "integer"}, "duplicate": {"type": "boolean"}},
    "required": ["records", "duplicate"],
}


class IngestGate:
    """Fair share of ingest: rates and concurrency per account and per token, write slots in turn.

    A request over a rate or concurrency limit is answered 429 before its body is read;
    an admitted one waits for a slot to be checked in, which goes to the waiting accounts
    in turn, then joins the next group commit, which seals and writes
    (:mod:`pipeline.group_commit`).
    """

    def __init__(self, pipeline: Pipeline) -> None:
        limits = pipeline.settings.limits
        self.rates = {
            "account": RateLimit(limits.ingest_rate_per_account),
            "token": RateLimit(limits.ingest_rate_per_token),
        }
        self.concurrency = {
            "account": Concurrency(limits.ingest_concurrency_per_account),
            "token": Concurrency(limits.ingest_concurrency_per_token),
        }
        self.slots = FairSlots(_write_slots(pipeline))

    @contextlib.asynccontextmanager
    async def admitted(self, principal: Principal) -> AsyncIterator[None]:
        """Hold the caller's places for the block.

        :raises HTTPException: 429 with ``Retry-After``, the account or token is over a limit
        """
        # the token's own limit first: a request it refuses must not spend the account's (one cluster's
        # flood would lock the account's other clusters out, other users' included)
        keys = {"token": str(principal.token_id), "account": str(principal.account)}
        for scope, key in keys.items():
            wait = self.rates[scope].take(key)
            if wait:
                raise too_many(f"this {scope} sends batches faster than the control plane accepts; retry later", wait)
        with (
            self.concurrency["account"].hold(keys["account"]) as by_account,
            self.concurrency["token"].hold(keys["token"]) as by_token,
        ):
            if not (by_account and by_token):
                scope = "account" if not by_account else "token"
                raise too_many(f"this {scope} has as many batches in flight as it may; retry later", 1)
            yield


def _write_slots(pipeline: Pipeline) -> int:
    """How many batches one process checks at once; the others wait their turn.

    Mostly CPU under one GIL, with one read of the metadata database (the cluster's row; what
    the whole group needs is read by its commit): with SQLite two slots (one reading while the
    other computes). PostgreSQL reads in parallel.
    """
    return 2 if pipeline.keyring.engine.dialect.name == "sqlite" else 8


#: the Idempotency-Key header, when sent, is the batch id: at most this long
MAX_IDEMPOTENCY_KEY = 128

router = APIRouter(tags=["ingest"])


# The handler asks FastAPI for nothing (no dependencies, no response model): resolving them cost
# the event loop more than the rest of the handler did, and a saturated serve is bound by its loop.
# The app's guard calls it directly (pipeline.server.app._ingest); the route gives it its schema.
@router.post(
    "/v1/ingest",
    status_code=202,
    response_model=None,
    openapi_extra={
        "security": [{"HTTPBearer": []}],
        "parameters": [
            {
                "name": "idempotency-key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {BATCH_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        "responses": {
            "202": {
                "description": "Accepted (or a replay of a batch accepted before)",
                "content": {"application/json": {"schema": _ACCEPTED}},
            }
        },
    },
)
async def ingest(request: Request) -> JSONResponse:
    """Accept one sealed batch (at most once per batch id): ``{records, duplicate}``."""
    state = request.app.state
    principal = await cluster_principal(request)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise HTTPException(400, f"idempotency-key: at most {MAX_IDEMPOTENCY_KEY} characters")
    pipeline: Pipeline = state.pipeline
    gate: IngestGate = state.ingest_gate
    try:
        async with gate.admitted(principal):
            sealed = await request.body()  # bounded by the app's guard (MAX_SEALED_BYTES)
            admit = functools.partial(state.clusters.admit, principal.cluster_id)
            async with gate.slots.slot(str(principal.account)):  # the checks: CPU, in turn
                prepared = await in_thread(
                    pipeline.prepare_ingest, sealed, principal, idempotency_key=idempotency_key, admit=admit
                )
            result = await asyncio.wrap_future(pipeline.queue_ingest(prepared))  # shared commit; no thread held
    except HTTPException as exc:
        state.metrics.rejected_batches.labels(str(exc.status_code)).inc()
        raise
    except PipelineError as exc:
        state.metrics.rejected_batches.labels(type(exc).__name__).inc()
        raise
    state.metrics.ingested_batches.labels(str(result.duplicate).lower()).inc()
    if not result.duplicate:
        state.metrics.ingested_records.inc(result.records)
    return JSONResponse({"records": result.records, "duplicate": result.duplicate}, status_code=202)
