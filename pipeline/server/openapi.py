"""The OpenAPI document as the API behaves: every error is problem+json, none is FastAPI's 422.

A client generated from ``/openapi.json``, or a conformance check, relies on it: each
operation lists the errors the API answers (:data:`ERRORS`), with the one problem schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

__all__ = ["ERRORS", "PROBLEM_JSON", "openapi_document"]

PROBLEM_JSON = "application/problem+json"
_PROBLEM = {
    "type": "object",
    "description": "An RFC 9457 problem document.",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}
#: what any operation may answer besides its own success (a client's mistake is a 4xx, never a 500)
ERRORS = {
    "400": "Malformed request: a parameter, header or body the API refuses, named in the detail.",
    "401": "Missing, malformed, unknown, revoked or expired token.",
    "403": "The token may not do this.",
    "404": "No such thing, or none this token may see.",
    "408": "The body stalled for longer than pipeline.server.body-timeout.",
    "413": "The body exceeds its limit.",
    "429": "This tenant or token sent too much; retry after Retry-After seconds.",
    "503": "A store or the metadata database is unavailable; retry later.",
}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of ``app``, its 422s replaced by the problem+json errors (built once)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in ERRORS.items():
                    responses.setdefault(status, {"description": description, "content": problem})
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas["Problem"] = _PROBLEM
        app.openapi_schema = schema
    return app.openapi_schema
