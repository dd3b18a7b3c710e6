"""A minimal stand-in for the control plane's ``POST /v1/ingest`` on loopback (the real one is pipeline.server).

It authenticates a bearer token to a principal, calls :meth:`Pipeline.ingest`
and maps errors the way the contract says (400/413/403/503). ``down`` makes it
answer 503; ``forced`` makes it answer a fixed status, to test the client.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.errors import ForbiddenBatch, IntakeError, StoreUnavailable
from pipeline.intake import MAX_SEALED_BYTES
from pipeline.principals import Principal
from pipeline.runtime import Pipeline


class IngestEndpoint:
    """``http://127.0.0.1:<port>`` serving ``POST /v1/ingest`` until ``close()``."""

    def __init__(self, pipeline: Pipeline | None, tokens: dict[str, Principal]) -> None:
        self.pipeline, self.tokens = pipeline, tokens
        self.down = False
        self.forced: tuple[int, dict[str, Any]] | None = None
        self.requests: list[dict[str, str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                endpoint.requests.append(dict(self.headers))
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(min(length, MAX_SEALED_BYTES + 1))
                status, answer = endpoint.answer(self.path, self.headers, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/problem+json" if status >= 400 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def answer(self, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if self.forced is not None:
            return self.forced
        if self.down:
            return 503, {"title": "Service Unavailable", "detail": "control plane down"}
        if path != "/v1/ingest":
            return 404, {"title": "Not Found"}
        principal = self.tokens.get(headers.get("Authorization", "").removeprefix("Bearer "))
        if principal is None:
            return 401, {"title": "Unauthorized", "detail": "missing or unknown token"}
        assert self.pipeline is not None
        try:
            result = self.pipeline.ingest(body, principal, idempotency_key=headers.get("Idempotency-Key"))
        except IntakeError as exc:
            return (413 if len(body) > MAX_SEALED_BYTES else 400), {"title": "Bad batch", "detail": str(exc)}
        except ForbiddenBatch as exc:
            return 403, {"title": "Forbidden", "detail": str(exc)}
        except StoreUnavailable as exc:
            return 503, {"title": "Service Unavailable", "detail": str(exc)}
        return 202, {"records": result.records, "duplicate": result.duplicate}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
