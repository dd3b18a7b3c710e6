"""Prometheus metrics of one app: ingested records, rejected batches, request latency.

Each app has its own registry, so several apps in one process (tests, the
benchmark) count separately.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from pipeline.principals import Principal
from pipeline.server.auth import require

__all__ = ["Metrics", "router"]


class Metrics:
    """The counters and the latency histogram the API updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ingested_records = Counter(
            "pipeline_ingested_records", "Records accepted through POST /v1/ingest.", registry=self.registry
        )
        self.ingested_batches = Counter(
            "pipeline_ingested_batches",
            "Batches accepted (duplicates included).",
            ["duplicate"],
            registry=self.registry,
        )
        self.rejected_batches = Counter(
            "pipeline_rejected_batches", "Batches refused, by reason.", ["reason"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "pipeline_request_seconds",
            "Time to answer an API request.",
            ["method", "route", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        """Time one request; a method no route answers is ``OTHER``: a label takes only bounded values (each
        new one is a series kept for good, and anyone may send any method name)."""
        method = method if method in _METHODS else "OTHER"
        self.request_seconds.labels(method, route, str(status)).observe(time.perf_counter() - started)


#: the methods a label keeps as sent
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(request: Request, _admin: Annotated[Principal, Depends(require("admin"))]) -> Response:
    """Prometheus text format; admin tokens only (counts reveal activity per route)."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
