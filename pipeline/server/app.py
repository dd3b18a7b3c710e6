"""The control plane's FastAPI application.

Every error leaves as RFC 9457 ``application/problem+json`` with a one-line
``detail`` and never a stack trace; a malformed request is 400 (FastAPI's 422
is folded into it), an unauthenticated one 401, a token of the wrong kind 403.
Pipeline errors are mapped to statuses here, at the boundary, and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import AuthenticationError, PipelineError, StoreUnavailable, UnknownAccountError
from pipeline.principals import Principal
from pipeline.retention.requests import RequestNotFound
from pipeline.server import clusters, envs, erasure, ingest, records
from pipeline.server.auth import TokenStore, authenticated
from pipeline.server.metrics import Metrics
from pipeline.server.metrics import router as metrics_router

if TYPE_CHECKING:
    from pipeline.runtime import Pipeline

__all__ = ["create_app", "problem"]

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: pipeline errors a client can cause or must wait out, by HTTP status; anything else is a 500
ERROR_STATUS: tuple[tuple[type[PipelineError], int], ...] = (
    (AuthenticationError, 401),
    (UnknownAccountError, 404),
    (RequestNotFound, 404),
    (StoreUnavailable, 503),
)


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


def create_app(pipeline: Pipeline) -> FastAPI:
    """The API over an open pipeline (which must stay open while the app serves)."""
    app = FastAPI(
        title="metadata-pipeline control plane",
        version="1",
        description="Clusters write, people read their own accounts; see DESIGN.md Part 2.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.pipeline = pipeline
    app.state.tokens = TokenStore(pipeline)
    app.state.clusters = clusters.ClusterRegistry(pipeline, app.state.tokens)
    app.state.metrics = metrics = Metrics()
    for module in (clusters, ingest, records, envs, erasure):
        app.include_router(module.router)
    app.include_router(metrics_router)

    @app.get("/v1/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: answers while the process serves requests."""
        return {"status": "ok"}

    @app.get("/v1/whoami", tags=["health"])
    def whoami(principal: Annotated[Principal, Depends(authenticated)]) -> dict[str, Any]:
        """Whom the token speaks for (what ``login`` checks)."""
        return {k: getattr(principal, k) for k in ("kind", "account", "user", "cluster_id", "token_id")}

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(request.method, getattr(route, "path", "unmatched"), response.status_code, start)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(400, _validation_detail(exc))

    @app.exception_handler(PipelineError)
    async def pipeline_error(_request: Request, exc: PipelineError) -> JSONResponse:
        for error_type, status in ERROR_STATUS:
            if isinstance(exc, error_type):
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return problem(status, str(exc), headers)
        logger.error("request failed: %s", exc, exc_info=exc)
        return problem(500, "internal error; the server log has the details")

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return problem(500, "internal error; the server log has the details")

    return app
