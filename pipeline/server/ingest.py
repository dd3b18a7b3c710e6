"""``POST /v1/ingest``: one sealed batch from a cluster, written through ``Pipeline.ingest``.

The handler only bounds the body, authenticates the cluster and counts; opening,
validating, scoping (account and cluster id come from the token, never from the
records), idempotency and writing are the one ingest path in the pipeline.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from pipeline.errors import PipelineError
from pipeline.intake import MAX_SEALED_BYTES
from pipeline.principals import Principal
from pipeline.runtime import Pipeline
from pipeline.server.auth import current_pipeline, require

__all__ = ["BATCH_MEDIA_TYPE", "ingest_slots", "router"]

BATCH_MEDIA_TYPE = "application/vnd.metadata-pipeline.batch"


def ingest_slots(pipeline: Pipeline) -> asyncio.Semaphore:
    """How many batches one process writes at once; the others wait their turn in arrival order.

    SQLite takes one writer at a time and makes the others poll with growing sleeps, so
    many concurrent writers only lose throughput and starve some requests for seconds:
    two slots (one writing while the other seals or syncs files). PostgreSQL writes in parallel.
    """
    return asyncio.Semaphore(2 if pipeline.keyring.engine.dialect.name == "sqlite" else 8)


router = APIRouter(tags=["ingest"])


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    too_large = HTTPException(413, f"sealed batch exceeds the limit of {limit} bytes; split it")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


@router.post(
    "/v1/ingest",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {BATCH_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def ingest(
    request: Request,
    principal: Annotated[Principal, Depends(require("cluster"))],
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> dict[str, Any]:
    """Accept one sealed batch (at most once per batch id): ``{records, duplicate}``."""
    metrics = request.app.state.metrics
    try:
        sealed = await _bounded_body(request, MAX_SEALED_BYTES)
        async with request.app.state.ingest_slots:  # in arrival order: none starves behind the write lock
            admit = functools.partial(request.app.state.clusters.heard_from, principal.cluster_id)
            result = await run_in_threadpool(
                pipeline.ingest, sealed, principal, idempotency_key=idempotency_key, admit=admit
            )
    except HTTPException as exc:
        metrics.rejected_batches.labels(str(exc.status_code)).inc()
        raise
    except PipelineError as exc:
        metrics.rejected_batches.labels(type(exc).__name__).inc()
        raise
    metrics.ingested_batches.labels(str(result.duplicate).lower()).inc()
    if not result.duplicate:
        metrics.ingested_records.inc(result.records)
    return {"records": result.records, "duplicate": result.duplicate}
