"""Test doubles for Google Cloud Logging, on loopback, spoken to by the real client.

``FakeLoggingREST`` serves the Logging v2 REST calls the client makes
(``entries:write``, ``entries:list``, ``DELETE projects/P/logs/L``) and keeps
entries per log, with two rules of the real service a store must survive:

* ``logs.delete`` acts on the ``_Default`` bucket only (entries a sink routed to
  a bucket of its own stay), and also drops entries received later with a
  timestamp before the delete ("Entries received after the delete operation with
  a timestamp before the operation will be deleted", Google's reference);
* listing is eventually consistent: an entry becomes listable ``listing_delay``
  seconds after it was written (``settle()`` ends every wait), and entries with
  the same ``insertId`` and timestamp show once in a listing.

Each entry is routed when written, as the Log Router does: to the ``_Default``
bucket unless an exclusion on the ``_Default`` sink matches it, and to every
bucket whose sink's filter matches it. ``entries:list`` on ``projects/P`` reads
the ``_Default`` bucket; on ``projects/P/locations/L/buckets/B/views/V`` that bucket.

``FakeConfigGRPC`` serves ConfigServiceV2 ``GetBucket``, ``CreateBucket``,
``UpdateBucket``, ``ListSinks``, ``CreateSink``, ``CreateExclusion`` and ``GetExclusion`` over
plaintext gRPC. Both check the shape of what they are sent (log names,
resources, entry size, filter grammar, the explicit timestamp range, field
masks, locked buckets) and answer with the API's error statuses, so a store
that sends something the real service would refuse fails here too.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import grpc
from google.cloud.logging_v2.types import (
    CreateBucketRequest,
    CreateExclusionRequest,
    CreateSinkRequest,
    GetBucketRequest,
    GetExclusionRequest,
    ListSinksRequest,
    ListSinksResponse,
    LogBucket,
    LogExclusion,
    LogSink,
    UpdateBucketRequest,
)

ENTRY_LIMIT = 256 * 1024
_LOG_NAME = re.compile(r"^projects/([a-z][a-z0-9-]{4,28}[a-z0-9])/logs/([A-Za-z0-9_.\-/]{1,512})$")
_CLAUSE = re.compile(r'^(logName|timestamp|insertId|severity|labels\.[a-z_]+|resource\.type)(>=|<=|=|<|>|:)"([^"]*)"$')
_VIEW = re.compile(r"^projects/([^/]+)/locations/[^/]+/buckets/[^/]+/views/[^/]+$")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    ":": lambda a, b: isinstance(a, str) and b in a,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        raise BadRequest(400, f"invalid timestamp {text!r}") from None


class FakeLoggingREST:
    """Logging v2 REST: entries per log name, the filter grammar the store uses."""

    def __init__(self, config: FakeConfigGRPC | None = None) -> None:
        self.config = config  # its sinks and exclusions route entries; without it all go to _Default
        self.lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body) as received
        self.unavailable = False
        #: seconds before a written entry shows in listings
        self.listing_delay = 0.0
        #: project -> entries.list calls left in its read quota (the service's: 60 a minute by default;
        #: unlimited here unless a test sets it); past it: 429 RESOURCE_EXHAUSTED
        self.read_quota: dict[str, int] = {}
        #: project -> (entries.list calls a window, the window in seconds): the quota refills each window,
        #: as the service's does each minute
        self.read_quota_refill: dict[str, tuple[int, float]] = {}  # its window starts at the next call
        self._quota_window: dict[str, float] = {}
        #: log name -> when it was deleted
        self.deleted: dict[str, datetime] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                    fake.requests.append((method, self.path, body))
                    if fake.unavailable:
                        raise BadRequest(503, "the service is currently unavailable")
                    path, _, query = self.path.partition("?")
                    if query not in ("", "prettyPrint=false"):
                        raise BadRequest(400, f"unexpected query {query!r}")
                    self._answer(200, fake.dispatch(method, path, body))
                except BadRequest as exc:
                    statuses = {
                        400: "INVALID_ARGUMENT",
                        404: "NOT_FOUND",
                        429: "RESOURCE_EXHAUSTED",
                        503: "UNAVAILABLE",
                    }
                    status = statuses[exc.status]
                    self._answer(exc.status, {"error": {"code": exc.status, "message": str(exc), "status": status}})

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeLoggingREST:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def dispatch(self, method: str, path: str, body: Any) -> dict[str, Any]:
        if method == "POST" and path == "/v2/entries:write":
            return self.write(body)
        if method == "POST" and path == "/v2/entries:list":
            return self.list(body)
        if method == "DELETE" and path.startswith("/v2/projects/"):
            return self.delete_log(unquote(path[len("/v2/") :]))
        raise BadRequest(404, f"no such method {method} {path}")

    def write(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("entries"):
            raise BadRequest(400, "entries must not be empty")
        accepted = []
        for i, entry in enumerate(body["entries"]):
            entry = {**entry}
            entry.setdefault("logName", body.get("logName"))
            entry.setdefault("resource", body.get("resource"))
            if not _LOG_NAME.match(entry["logName"] or ""):
                raise BadRequest(400, f"entry {i}: invalid log name {entry['logName']!r}")
            if not (entry["resource"] or {}).get("type"):
                raise BadRequest(400, f"entry {i}: a monitored resource with a type is required")
            entry.setdefault("timestamp", datetime.now(UTC).isoformat().replace("+00:00", "Z"))  # as the service
            _time(entry["timestamp"])
            entry.setdefault("insertId", uuid.uuid4().hex)  # the service makes one up when none is sent
            if not isinstance(entry["insertId"], str):
                raise BadRequest(400, f"entry {i}: insertId must be a string")
            if not all(isinstance(v, str) for v in entry.get("labels", {}).values()):
                raise BadRequest(400, f"entry {i}: label values must be strings")
            if len(json.dumps(entry)) > ENTRY_LIMIT:
                raise BadRequest(400, f"entry {i}: log entry is larger than 256 KB")
            entry["receiveTimestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            accepted.append(entry)
        listable_at = time.monotonic() + self.listing_delay
        with self.lock:
            for entry in accepted:
                deleted_at = self.deleted.get(entry["logName"])
                if deleted_at is not None and _time(entry["timestamp"]) < deleted_at:
                    continue  # accepted, then removed by the earlier delete
                self.entries.append({**entry, "_listable_at": listable_at, "_buckets": self.route(entry)})
        return {}

    def route(self, entry: dict[str, Any]) -> list[str]:
        """The buckets the Log Router puts an entry in."""
        project = _LOG_NAME.match(entry["logName"]).group(1)  # type: ignore[union-attr]
        default = f"projects/{project}/locations/global/buckets/_Default"
        if self.config is None:
            return [default]
        sinks, exclusions = self.config.routing(project)
        buckets = set() if any(matches(e.filter, entry) for e in exclusions) else {default}
        prefix = "logging.googleapis.com/"
        return sorted(buckets | {k.destination.removeprefix(prefix) for k in sinks if matches(k.filter, entry)})

    def settle(self) -> None:
        """Make every entry written so far listable (the service's delay has passed)."""
        with self.lock:
            for entry in self.entries:
                entry["_listable_at"] = 0.0

    def list(self, body: dict[str, Any]) -> dict[str, Any]:
        names = body.get("resourceNames") or []
        if len(names) != 1 or not (re.match(r"^projects/[^/]+$", names[0]) or _VIEW.match(names[0])):
            raise BadRequest(400, f"resourceNames must be [projects/P] or [a bucket's view], got {names!r}")
        project = names[0].split("/")[1]
        with self.lock:
            if project in self.read_quota_refill:
                calls, window = self.read_quota_refill[project]
                started = self._quota_window.get(project)
                if started is None or time.monotonic() - started >= window:
                    self.read_quota[project], self._quota_window[project] = calls, time.monotonic()
            if project in self.read_quota:
                if self.read_quota[project] <= 0:
                    raise BadRequest(429, "Quota exceeded for quota metric 'Read requests' of service logging")
                self.read_quota[project] -= 1
        if (
            self.config is not None
            and "/views/" in names[0]
            and names[0].rsplit("/views/")[0] not in self.config.buckets
        ):
            raise BadRequest(404, f"{names[0]} not found")
        bucket = (
            names[0].rsplit("/views/", 1)[0]
            if "/views/" in names[0]
            else f"projects/{project}/locations/global/buckets/_Default"
        )
        if body.get("orderBy", "timestamp asc") != "timestamp asc":
            raise BadRequest(400, f"unsupported orderBy {body.get('orderBy')!r}")
        size = int(body.get("pageSize", 50))
        if not 0 < size <= 1000:
            raise BadRequest(400, f"pageSize must be 1..1000, got {size}")
        match = self.compile_filter(body.get("filter", ""))
        now = time.monotonic()
        with self.lock:
            listable = [e for e in self.entries if e["_listable_at"] <= now and bucket in e["_buckets"]]
        unique = {
            (e["insertId"], e["timestamp"]): {k: v for k, v in e.items() if not k.startswith("_")}
            for e in listable
            if match(e)
        }
        found = sorted(unique.values(), key=lambda e: _time(e["timestamp"]))
        start = int(body.get("pageToken") or 0)
        page: dict[str, Any] = {"entries": found[start : start + size]}
        if start + size < len(found):
            page["nextPageToken"] = str(start + size)
        return page

    @staticmethod
    def compile_filter(text: str, *, ranged: bool = True) -> Callable[[dict[str, Any]], bool]:
        """``clause AND clause ...``; the real service's grammar, restricted to what the store sends.

        :param ranged: a listing's filter, which must carry an explicit timestamp range
        """
        tests: list[Callable[[dict[str, Any]], bool]] = []
        bounds: set[str] = set()
        for clause in text.split(" AND "):
            parsed = _CLAUSE.match(clause.strip())
            if parsed is None:
                raise BadRequest(400, f"unparsable filter clause {clause!r}")
            field, op, value = parsed.groups()
            if field == "timestamp":
                bounds.add(op[0])
                moment = _time(value)
                tests.append(lambda e, op=op, moment=moment: _COMPARE[op](_time(e["timestamp"]), moment))
            elif op not in ("=", ":"):
                raise BadRequest(400, f"{field} supports only = and :, got {clause!r}")
            else:
                path = field.split(".")
                tests.append(lambda e, path=path, op=op, value=value: _COMPARE[op](_get(e, path), value))
        if ranged and not {">", "<"} <= bounds:
            raise BadRequest(400, f"filter has no explicit timestamp range: {text!r}")
        return lambda e: all(t(e) for t in tests)

    def delete_log(self, log_name: str) -> dict[str, Any]:
        if not _LOG_NAME.match(log_name):
            raise BadRequest(400, f"invalid log name {log_name!r}")
        default = f"projects/{log_name.split('/')[1]}/locations/global/buckets/_Default"
        with self.lock:
            mine = [e for e in self.entries if e["logName"] == log_name and default in e["_buckets"]]
            if not mine:
                raise BadRequest(404, f"log {log_name} not found")
            for entry in mine:  # logs.delete reaches the _Default bucket only
                entry["_buckets"] = [b for b in entry["_buckets"] if b != default]
            self.entries = [e for e in self.entries if e["_buckets"]]
            self.deleted[log_name] = datetime.now(UTC)
        return {}

    def logs(self, project: str, bucket: str = "_Default") -> set[str]:
        """Log names with entries in a bucket of ``project``."""
        name = f"projects/{project}/locations/global/buckets/{bucket}"
        with self.lock:
            return {e["logName"] for e in self.entries if name in e["_buckets"]}


def matches(filter_: str, entry: dict[str, Any]) -> bool:
    """Whether a sink's or exclusion's filter selects an entry (an empty filter selects all)."""
    return not filter_ or FakeLoggingREST.compile_filter(filter_, ranged=False)(entry)


def _get(entry: dict[str, Any], path: list[str]) -> Any:
    value: Any = entry
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


class FakeConfigGRPC:
    """ConfigServiceV2 over plaintext gRPC: buckets, sinks and _Default exclusions kept by name.

    Every project has the ``_Default`` sink (no filter, into the ``_Default`` bucket), as on
    the real service; ``ListSinks`` shows it.
    """

    SERVICE = "google.logging.v2.ConfigServiceV2"

    def __init__(self) -> None:
        self.buckets: dict[str, LogBucket] = {}
        self.sinks: dict[str, LogSink] = {}  # full name projects/P/sinks/S -> sink
        self.exclusions: dict[str, LogExclusion] = {}  # projects/P/exclusions/E -> exclusion
        self.updates: list[UpdateBucketRequest] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        methods = {
            "GetBucket": (self.get_bucket, GetBucketRequest, LogBucket),
            "CreateBucket": (self.create_bucket, CreateBucketRequest, LogBucket),
            "UpdateBucket": (self.update_bucket, UpdateBucketRequest, LogBucket),
            "ListSinks": (self.list_sinks, ListSinksRequest, ListSinksResponse),
            "CreateSink": (self.create_sink, CreateSinkRequest, LogSink),
            "CreateExclusion": (self.create_exclusion, CreateExclusionRequest, LogExclusion),
            "GetExclusion": (self.get_exclusion, GetExclusionRequest, LogExclusion),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, request.deserialize, answer.serialize)
            for name, (fn, request, answer) in methods.items()
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.SERVICE, handlers),))
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def start(self) -> FakeConfigGRPC:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)

    def add_bucket(self, name: str, retention_days: int, *, locked: bool = False) -> None:
        self.buckets[name] = LogBucket(name=name, retention_days=retention_days, locked=locked)

    def routing(self, project: str) -> tuple[list[LogSink], list[LogExclusion]]:
        """The project's sinks (``_Default`` excluded: it is the default route) and its exclusions."""
        sinks = [v for k, v in self.sinks.items() if k.startswith(f"projects/{project}/")]
        exclusions = [v for k, v in self.exclusions.items() if k.startswith(f"projects/{project}/")]
        return sinks, exclusions

    def get_bucket(self, request: GetBucketRequest, context: grpc.ServicerContext) -> LogBucket:
        if request.name not in self.buckets:
            context.abort(grpc.StatusCode.NOT_FOUND, f"bucket {request.name} not found")
        return self.buckets[request.name]

    def create_bucket(self, request: CreateBucketRequest, context: grpc.ServicerContext) -> LogBucket:
        if not re.match(r"^projects/[^/]+/locations/[^/]+$", request.parent):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid parent {request.parent!r}")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", request.bucket_id) or request.bucket_id.startswith("_"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid bucket id {request.bucket_id!r}")
        name = f"{request.parent}/buckets/{request.bucket_id}"
        if name in self.buckets:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"bucket {name} already exists")
        if not 1 <= request.bucket.retention_days <= 3650:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "retention_days must be 1..3650")
        self.add_bucket(name, request.bucket.retention_days)
        self.buckets[name].description = request.bucket.description
        return self.buckets[name]

    def update_bucket(self, request: UpdateBucketRequest, context: grpc.ServicerContext) -> LogBucket:
        bucket = self.buckets.get(request.name)
        if bucket is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"bucket {request.name} not found")
        if list(request.update_mask.paths) != ["retention_days"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported update mask {request.update_mask.paths}")
        if bucket.locked:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the retention of a locked bucket cannot change")
        if not 1 <= request.bucket.retention_days <= 3650:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "retention_days must be 1..3650")
        self.updates.append(request)
        bucket.retention_days = request.bucket.retention_days
        return bucket

    def list_sinks(self, request: ListSinksRequest, context: grpc.ServicerContext) -> ListSinksResponse:
        project = request.parent.split("/")[1]
        default = LogSink(
            name="_Default",
            destination=f"logging.googleapis.com/projects/{project}/locations/global/buckets/_Default",
            exclusions=[e for k, e in self.exclusions.items() if k.startswith(f"projects/{project}/")],
        )
        return ListSinksResponse(sinks=[default, *self.routing(project)[0]])

    def create_sink(self, request: CreateSinkRequest, context: grpc.ServicerContext) -> LogSink:
        name = f"{request.parent}/sinks/{request.sink.name}"
        if name in self.sinks or request.sink.name == "_Default":
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"sink {name} already exists")
        bucket = request.sink.destination.removeprefix("logging.googleapis.com/")
        if bucket not in self.buckets:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"destination {request.sink.destination} does not exist")
        sink = request.sink
        self.sinks[name] = LogSink(name=sink.name, destination=sink.destination, filter=sink.filter)
        return self.sinks[name]

    def create_exclusion(self, request: CreateExclusionRequest, context: grpc.ServicerContext) -> LogExclusion:
        name = f"{request.parent}/exclusions/{request.exclusion.name}"
        if name in self.exclusions:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"exclusion {name} already exists")
        self.exclusions[name] = LogExclusion(name=request.exclusion.name, filter=request.exclusion.filter)
        return self.exclusions[name]

    def get_exclusion(self, request: GetExclusionRequest, context: grpc.ServicerContext) -> LogExclusion:
        if request.name not in self.exclusions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"exclusion {request.name} not found")
        return self.exclusions[request.name]
