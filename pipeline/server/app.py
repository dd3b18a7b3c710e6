"""The control plane's FastAPI application.

Every error leaves as RFC 9457 ``application/problem+json`` with a one-line
``detail`` and never a stack trace; a malformed request is 400 (FastAPI's 422
is folded into it), an unauthenticated one 401, a token of the wrong kind 403.
Pipeline errors are mapped to statuses here, at the boundary, and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.errors import (
    AuthenticationError,
    ForbiddenBatch,
    IntakeError,
    InvalidBinding,
    InvalidName,
    PipelineError,
    StoreUnavailable,
    UnknownAccountError,
)
from pipeline.intake import MAX_SEALED_BYTES
from pipeline.principals import Principal
from pipeline.redact import printable
from pipeline.retention.requests import RequestNotFound
from pipeline.server import clusters, envs, erasure, ingest, records
from pipeline.server.auth import PRINCIPAL, TokenStore, authenticated, bearer_token
from pipeline.server.metrics import Metrics
from pipeline.server.metrics import router as metrics_router
from pipeline.server.openapi import PROBLEM_JSON, openapi_document
from pipeline.server.threads import in_thread

if TYPE_CHECKING:
    from pipeline.runtime import Pipeline

__all__ = ["create_app", "problem", "problem_document"]

logger = logging.getLogger(__name__)

#: largest body any endpoint but ingest accepts (all of them take JSON)
MAX_JSON_BYTES = 64 * 1024
#: pipeline errors a client can cause or must wait out, by HTTP status; anything else is a 500
ERROR_STATUS: tuple[tuple[type[PipelineError], int], ...] = (
    (AuthenticationError, 401),
    (IntakeError, 400),
    (InvalidBinding, 400),
    (InvalidName, 400),
    (ForbiddenBatch, 403),
    (UnknownAccountError, 404),
    (RequestNotFound, 404),
    (StoreUnavailable, 503),
)


def problem_document(status: int, detail: str) -> dict[str, Any]:
    """The fields of an RFC 9457 problem document (the h11 protocol answers with them too, outside the app)."""
    return {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem document."""
    return JSONResponse(problem_document(status, detail), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def pipeline_problem(exc: PipelineError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer to a pipeline error, by :data:`ERROR_STATUS`; anything unmapped is a logged 500."""
    for error_type, status in ERROR_STATUS:
        if isinstance(exc, error_type):
            headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
            if status == 503:  # the reason names internal hosts: it goes to the log, not to the caller
                logger.warning("answered 503: %s", exc)
                return problem(503, "a store or the metadata database is unavailable; retry later", headers)
            return problem(status, str(exc), headers)
    logger.error("request failed: %s", exc, exc_info=exc)
    return problem(500, "internal error; the server log has the details", headers)


def _validation_detail(exc: RequestValidationError) -> str:
    """One line: a field name the client sent is shown with its control characters escaped."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
    return printable(f"{where}: {first.get('msg', 'invalid')}")


class _Guard:
    """Pure ASGI middleware: what every request passes before the app reads a byte of its body.

    - It is timed for the metrics; a client that hangs up mid-request is logged at DEBUG, not as an error.
    - Its body may not exceed :data:`MAX_SEALED_BYTES` on ``POST /v1/ingest``, :data:`MAX_JSON_BYTES`
      elsewhere: a declared length over it is 413 up front, and the streamed bytes are counted
      (chunked bodies too), 413 as soon as they pass it.
    - A request with a body is authenticated first: without a valid token it is 401 unread.
    - Each piece of a body must arrive within ``pipeline.server.body-timeout`` (408 otherwise).
    - ``POST /v1/ingest`` goes from here straight to its handler (:func:`_ingest`).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, tokens: TokenStore, body_timeout: float) -> None:
        self.app, self.metrics, self.tokens, self.body_timeout = app, metrics, tokens, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        route = "unmatched"
        served = {**scope, "method": "GET"} if scope["method"] == "HEAD" else scope  # GET's answer, no body
        try:
            refusal = await self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, observed)
            elif (scope["method"], scope["path"]) == _INGEST:
                route = _INGEST[1]
                await _ingest(scope, self._bounded(scope, receive), observed)
            else:
                await self.app(
                    served, self._bounded(scope, receive), observed if served is scope else _bodiless(observed)
                )
        except ClientDisconnect:
            status = 499  # nginx's code for it: the client left, nothing to answer
            logger.debug("client disconnected during %s %s", scope["method"], scope["path"])
        finally:
            route = getattr(served.get("route"), "path", route)
            self.metrics.observe(scope["method"], route, status, started)

    async def _refusal(self, scope: Scope) -> JSONResponse | None:
        """The answer to a request refused before its body is read; ``None`` to let it in."""
        if _CONTROL.search(scope["path"]):  # no id holds one, and PostgreSQL refuses NUL in a query (a 500)
            return problem(404, "Not Found")
        headers = dict(scope["headers"])
        if sum(name == b"authorization" for name, _value in scope["headers"]) > 1:  # one caller, or none known
            return problem(400, "more than one Authorization header; send one bearer token", _CLOSE)
        declared = headers.get(b"content-length", b"")
        if declared.strip(b"0") or b"transfer-encoding" in headers:  # who asks first, then how much
            token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
            try:
                if token is None:
                    raise AuthenticationError("missing bearer token: send Authorization: Bearer mp_...")
                principal = await in_thread(self.tokens.authenticate, token)
            except PipelineError as exc:  # 401, or 503 while the database is away
                return pipeline_problem(exc, _CLOSE)
            scope.setdefault("state", {})[PRINCIPAL] = principal
        limit = _body_limit(scope)
        if declared.isdigit() and int(declared) > limit:
            return problem(413, f"request body exceeds the limit: over {limit} bytes", _CLOSE)
        return None

    def _bounded(self, scope: Scope, receive: Receive) -> Receive:
        limit, received, complete = _body_limit(scope), 0, False

        async def bounded() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what follows is a wait for the disconnect, as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                detail = f"no part of the request body arrived for {self.body_timeout:g} s"
                raise HTTPException(408, detail, _CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if complete:
                    scope.setdefault("state", {})[_BODY_READ] = True
                if received > limit:
                    raise HTTPException(413, f"request body exceeds the limit: over {limit} bytes", _CLOSE)
            return message

        return bounded


def _bodiless(send: Send) -> Send:
    """``send`` for a HEAD request: the GET answer's status and headers (its length too), no body."""

    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headers_only


#: a control character in a (percent-decoded) path
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: a request refused before its body was read ends its connection: the unread rest is never read
_CLOSE = {"Connection": "close"}
#: the scope's state says a request's body was read to its end
_BODY_READ = "body_read"
#: the request a control plane answers most: every cluster, every few seconds
_INGEST = ("POST", "/v1/ingest")


async def _ingest(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/ingest`` straight to its handler, past FastAPI's routing and exception layers
    (a tenth of a saturated serve's CPU). Its errors answer as the app's handlers answer them;
    anything else propagates as from any route, to the app's 500."""
    try:
        response = await ingest.ingest(Request(scope, receive))
    except (StarletteHTTPException, PipelineError) as exc:
        response = _error_problem(exc)
        if not scope.get("state", {}).get(_BODY_READ):  # a 429 or a person's token: up to 8 MiB unread
            response.headers.update(_CLOSE)
    await response(scope, receive, send)


def _error_problem(exc: StarletteHTTPException | PipelineError) -> JSONResponse:
    """The answer to an HTTP or pipeline error raised by a handler."""
    if isinstance(exc, PipelineError):
        return pipeline_problem(exc)
    return problem(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _allowed(app: FastAPI, scope: Scope) -> list[str]:
    """Every method the path is served with (one route each), HEAD with GET (RFC 9110: a 405 lists them all)."""
    path = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", ""), "method": "GET"}
    methods = {m for route in app.state.routes if route.matches(dict(path))[0] != Match.NONE for m in route.methods}
    return sorted(methods | ({"HEAD"} if "GET" in methods else set()))


def _body_limit(scope: Scope) -> int:
    return MAX_SEALED_BYTES if scope["path"] == "/v1/ingest" else MAX_JSON_BYTES


def create_app(pipeline: Pipeline) -> FastAPI:
    """The API over an open pipeline (which must stay open while the app serves)."""
    app = FastAPI(
        title="metadata-pipeline control plane",
        version="1",
        description="Clusters write, people read their own accounts; see DESIGN.md Part 2.",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # its redirect named the Host header's host: /v1/health/ is 404, as any other path
    )
    app.openapi = functools.partial(openapi_document, app)  # type: ignore[method-assign]
    app.state.pipeline = pipeline
    app.state.tokens = TokenStore(pipeline)
    app.state.clusters = clusters.ClusterRegistry(pipeline, app.state.tokens)
    app.state.metrics = metrics = Metrics()
    app.state.ingest_gate = ingest.IngestGate(pipeline)
    app.state.record_streams = records.RecordStreams()
    app.state.erasure_filings = erasure.filing_limit(pipeline)
    app.state.environments = envs.EnvironmentIndex()
    routers = [module.router for module in (clusters, ingest, records, envs, erasure)] + [metrics_router]
    for router in routers:
        app.include_router(router)

    @app.get("/v1/health", tags=["health"])
    def health() -> dict[str, str]:
        """Liveness: answers while the process serves requests."""
        return {"status": "ok"}

    @app.get("/v1/whoami", tags=["health"])
    def whoami(principal: Annotated[Principal, Depends(authenticated)]) -> dict[str, Any]:
        """Whom the token speaks for (what ``login`` checks)."""
        return {k: getattr(principal, k) for k in ("kind", "account", "user", "cluster_id", "token_id")}

    # every route with its methods, for a 405's Allow (the app's own list nests the included routers)
    app.state.routes = [route for router in routers for route in router.routes] + [
        route for route in app.routes if isinstance(route, Route)
    ]
    app.add_middleware(
        _Guard, metrics=metrics, tokens=app.state.tokens, body_timeout=pipeline.settings.limits.body_timeout
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:  # Starlette's Allow names the first route's method of the path only
            exc.headers = {"Allow": ", ".join(_allowed(app, request.scope))}
        return _error_problem(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(400, _validation_detail(exc))

    @app.exception_handler(PipelineError)
    async def pipeline_error(_request: Request, exc: PipelineError) -> JSONResponse:
        return _error_problem(exc)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return problem(500, "internal error; the server log has the details")

    return app
