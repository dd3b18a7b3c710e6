"""``serve``: the API on uvicorn and the retention scheduler, started and stopped together.

uvicorn runs on the main thread and owns SIGTERM/SIGINT: the first signal stops
accepting requests, lets requests in flight finish, then stops the retention
scheduler (which finishes a pass in progress). The process then returns
normally instead of re-raising the signal, so ``serve`` exits 0 after a clean stop.

What a connection may take is bounded here (``pipeline.server.max-connections``,
``header-timeout``, 16 KiB of headers); bodies are bounded by the app's guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import resource
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from pipeline.config import ServerLimits, Settings, base_url
from pipeline.errors import ConfigError, PipelineError
from pipeline.redact import first_line
from pipeline.server.app import create_app, problem_document
from pipeline.server.openapi import PROBLEM_JSON

if TYPE_CHECKING:
    from pipeline.retention.service import RetentionService
    from pipeline.runtime import Pipeline

__all__ = ["ControlPlaneServer", "run_control_plane", "serving_in_thread", "uvicorn_config"]

logger = logging.getLogger(__name__)

#: idle connections stay open this long: longer than a plugin's delivery period, so a cluster
#: keeps one connection instead of racing the server's close on every post (uvicorn's default: 5 s)
KEEP_ALIVE_SECONDS = 75
#: a request line and headers larger than this are refused (400) before they are parsed further
MAX_HEADER_BYTES = 16 * 1024


#: open files kept for everything but client connections (database, stores, logs, keys)
_SPARE_FILES = 64
#: connections the kernel queues for accepting (uvicorn's default is 2048)
_BACKLOG = 128
#: the blank line that ends a request's head, as h11 finds it (a bare LF stands for CRLF)
_HEAD_END = re.compile(rb"\n\r?\n")


class _HeadLimitedConnection(h11.Connection):
    """An h11 server connection that refuses a request line and headers over ``max_head`` bytes.

    h11's ``max_incomplete_event_size`` bounds only a head still incomplete: one that arrives
    whole in one read (up to 256 KiB), alone or behind a pipelined request, was parsed however
    large. Here the receive buffer is measured before h11 parses a head from it, and refused as
    h11 refuses an incomplete one (uvicorn answers 400 and closes). Cheap on every request: only
    when a head is awaited and the buffer may hold more than ``max_head`` bytes (it is copied then,
    the count is kept otherwise), and the search for the head's end stops at ``max_head``.
    """

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self._max_head = max_head
        #: the request h11 refused had a head over ``max_head`` bytes (else it was malformed)
        self.refused_head = False
        #: at least the bytes in the receive buffer: what it held when measured, and what came since
        self._buffered_at_most = 0

    def receive_data(self, data: bytes) -> None:
        self._buffered_at_most += len(data)
        super().receive_data(data)

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            if self._buffered_at_most > self._max_head and self.their_state is h11.IDLE:
                self._check_head()
            return super().next_event()
        except h11.RemoteProtocolError as exc:  # answered by _GuardedH11.send_400_response
            self.refused_head = exc.error_status_hint == 431
            raise

    def _check_head(self) -> None:
        """:raises h11.RemoteProtocolError: the head h11 is about to parse is over ``max_head`` bytes"""
        buffered = self.trailing_data[0]
        self._buffered_at_most = len(buffered)
        if len(buffered) > self._max_head and _HEAD_END.search(buffered, 0, self._max_head) is None:
            raise h11.RemoteProtocolError("request line and headers too large", error_status_hint=431)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline and a size cap for a request's headers, and a cap on open connections.

    uvicorn times out idle keep-alive connections but not a request whose headers never end
    (a slow-loris client): each such connection holds a file until the process has none left.
    Here the headers must be complete within ``header_timeout`` of their first byte (or of the
    connection, for the first request), an answer must be read within ``write_timeout`` once it fills the
    send buffer, and a connection past ``max_connections`` is closed at once.
    Request line and headers are at most ``MAX_HEADER_BYTES``, however they are split into reads.
    """

    header_timeout: float
    write_timeout: float
    max_connections: int

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _HeadLimitedConnection(MAX_HEADER_BYTES)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._armed_for: object = None
        if len(self.connections) > self.max_connections:
            transport.abort()
            return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        awaiting_head = self.cycle is None or self.cycle.response_complete
        if awaiting_head and (self._header_deadline is None or self._armed_for is not self.cycle):
            # the first bytes of the next request on a kept-alive connection: its own deadline, not one left
            # from the request before (which gave a slow head up to twice the timeout)
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._arm_header_deadline()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self._header_deadline, self._write_deadline):
            if deadline is not None:
                deadline.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """A connection between requests, its last answer sent, is dropped at once as the server stops.

        Closed as uvicorn does, a TLS connection waits for the peer's reply to its close (up to 30 s,
        asyncio's SSL shutdown timeout), and a client between requests does not read: every stop of
        ``serve`` waited that long while a cluster's client was connected.
        """
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            super().shutdown()

    def pause_writing(self) -> None:
        """The answer fills the send buffer: the client must read it within ``write_timeout``, or its
        connection is dropped (one that never reads would hold its slot, and the process's memory, for good)."""
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._write_deadline = None
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 refuses, as every other error: problem+json, one line, closed."""
        refused = self.conn.refused_head if isinstance(self.conn, _HeadLimitedConnection) else False
        detail = f"request line and headers over {MAX_HEADER_BYTES} bytes" if refused else "malformed HTTP request"
        body = json.dumps(problem_document(400, detail)).encode()
        headers = [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        self._armed_for = self.cycle  # the request before the one whose head it times (None: the first)
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_due, self.cycle)

    def _headers_due(self, cycle_before: object) -> None:
        self._header_deadline = None
        if self.cycle is cycle_before:  # no new request's headers completed in time
            self.transport.abort()


def _connection_limits(limits: ServerLimits) -> tuple[type[H11Protocol], int]:
    """The HTTP protocol class with ``limits``, and the listen backlog.

    Connections are accepted a backlog at a time before any is closed, and the next backlog
    may be accepted before those past the cap of the last one are (asyncio closes an aborted
    connection on its next turn), so the open-files limit must hold the kept connections, two
    backlogs and the process's other files: it is raised to fit where the hard limit allows,
    and the connection cap lowered where it does not.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + 2 * _BACKLOG + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    cap, backlog = limits.max_connections, _BACKLOG
    if soft != resource.RLIM_INFINITY and soft < wanted:
        room = max(3, soft - _SPARE_FILES)
        backlog = min(_BACKLOG, max(1, room // 4))
        cap = min(cap, room - 2 * backlog)
    attributes = {"header_timeout": limits.header_timeout, "write_timeout": limits.body_timeout, "max_connections": cap}
    return type("GuardedH11Protocol", (_GuardedH11,), attributes), backlog


class ControlPlaneServer(uvicorn.Server):
    """A uvicorn server that announces its real address and stops without re-raising the signal."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.on_started = on_started
        self.url: str | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            scheme = "https" if self.config.ssl else "http"
            self.url = base_url(scheme, host, port)
            if self.on_started is not None:
                self.on_started(self.url)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self._request_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request_exit(self, _sig: int, _frame: Any) -> None:
        if self.should_exit:  # a second signal: stop waiting for requests in flight
            self.force_exit = True
        self.should_exit = True


def check_serving(settings: Settings, *, retention: bool) -> None:
    """What ``serve`` is told that it can judge before it makes anything: a refused TLS pair, schedule or listen
    address left a new home's master key, signing key and database behind.

    :raises ConfigError:
    """
    _check_tls(settings)
    if retention:
        from pipeline.retention.schedule import retention_trigger

        retention_trigger(settings.retention_cron)
    _check_address(settings.server_host, settings.server_port)


def _check_address(host: str, port: int) -> None:
    """Whether ``serve`` could listen there now: each address the host resolves to is bound once and let go
    (another process may take it before ``serve`` does, which is then refused as before, after its home)."""
    try:  # "": every interface
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:  # a typo (127.0.0.l) was "unknown error -2" at the bind
        raise ConfigError(f"pipeline.server.host: {host!r} is no address: {exc}") from None
    for family, kind, protocol, _name, address in found if port else ():  # port 0: any free one
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:  # in use, or no address of this host
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise ConfigError(f"pipeline.server.host/port: cannot listen on {host}:{port} ({reason})") from None


def _check_tls(s: Settings) -> None:
    """:raises ConfigError: only one of the TLS files is set, one does not exist, or they are not a PEM
    certificate and its key (uvicorn reads them as it starts, with a traceback)"""
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("pipeline.server.tls-cert and pipeline.server.tls-key must be set together")
    for key, path in (("tls-cert", s.tls_cert), ("tls-key", s.tls_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"pipeline.server.{key}: no such file {path}")
    if s.tls_cert is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(s.tls_cert, s.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"pipeline.server.tls-cert/tls-key: {s.tls_cert} and {s.tls_key} are not a PEM certificate "
                f"and its private key ({first_line(exc)})"
            ) from exc


def uvicorn_config(pipeline: Pipeline, *, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """The uvicorn configuration ``pipeline.server.*`` asks for (TLS when cert and key are set).

    :raises ConfigError: :func:`_check_tls`
    """
    s = pipeline.settings
    _check_tls(s)
    protocol, backlog = _connection_limits(s.limits)
    return uvicorn.Config(
        create_app(pipeline),
        host=host or s.server_host,
        port=s.server_port if port is None else port,
        ssl_certfile=s.tls_cert,
        ssl_keyfile=s.tls_key,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        http=protocol,
        backlog=backlog,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )


@contextlib.contextmanager
def serving_in_thread(pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the API from a background thread (the demo, tests); yields its URL.

    :raises ConfigError: it could not start (the address cannot be bound)
    """
    ready = threading.Event()
    server = ControlPlaneServer(uvicorn_config(pipeline, host=host, port=port), lambda _url: ready.set())
    thread = threading.Thread(target=server.run, name="control-plane", daemon=True)
    thread.start()
    while not ready.wait(0.1):
        if not thread.is_alive():
            raise ConfigError(f"the control plane could not listen on {host}:{port}")
    assert server.url is not None
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join()


class _BindErrors(logging.Filter):
    """Keeps uvicorn's own bind-failure line (an ``OSError`` as message) off stderr: ``serve`` says it once."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[OSError] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, OSError):
            self.errors.append(record.msg)
            return False
        return True

    def reason(self) -> str:
        errno = self.errors[-1].errno if self.errors else None
        return os.strerror(errno).lower() if errno else "in use or not allowed"


#: allocations between two young-generation collections (CPython's default: 700); ingest allocates
#: thousands of objects a batch (Arrow wrappers, rows, dicts), nearly all freed by reference count
_YOUNG_GC_THRESHOLD = 10_000


def _long_lived_gc() -> None:
    """Spare the garbage collector what a ``serve`` holds for its whole life.

    The modules, the app and the engines made at start are never garbage, yet every full
    collection walked them all; frozen (after one collection, so no garbage stays), the
    collector walks only what requests made. With the young generation collected every
    10,000 allocations rather than 700, a saturated ``serve`` spent a quarter as much CPU in
    the collector (0.1 instead of 0.4 ms a batch).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


def run_control_plane(
    pipeline: Pipeline, *, retention: bool = True, announce: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Serve until SIGTERM/SIGINT; returns the retention runs this process made.

    :raises ConfigError: bad TLS settings, or the address cannot be bound
    """
    from pipeline.server.clusters import ClusterRegistry, LostClusterSweeper

    service: RetentionService | None = None
    thread: threading.Thread | None = None
    sweeper = LostClusterSweeper(ClusterRegistry(pipeline))
    if retention:
        from pipeline.retention.service import RetentionService

        service = RetentionService(pipeline)

    def started(url: str) -> None:
        nonlocal thread
        threading.Thread(target=sweeper.run, name="lost-clusters", daemon=True).start()
        if service is not None:
            thread = threading.Thread(target=service.run, name="retention-service", daemon=True)
            thread.start()
        what = "API and retention service" if service is not None else "API only (--no-retention)"
        announce(f"control plane listening on {url} ({what}); stop with SIGTERM or Ctrl-C")

    config = uvicorn_config(pipeline)
    server = ControlPlaneServer(config, started)
    _long_lived_gc()
    bind_errors = _BindErrors()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(bind_errors)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise ConfigError(
            f"pipeline.server.host/port: cannot listen on {config.host}:{config.port} ({bind_errors.reason()})"
        ) from exc
    finally:
        sweeper.stop()
        uvicorn_log.removeFilter(bind_errors)
        while thread is not None and thread.is_alive():  # stop() before the scheduler ran is a no-op: repeat
            assert service is not None
            service.stop()
            thread.join(timeout=0.5)
        _summarised(pipeline)
    if service is None:
        return []
    return [{"job": r.job, "slot": r.slot, "outcome": r.outcome} for r in service.history]


def _summarised(pipeline: Pipeline) -> None:
    """The ingest summary of the hour in progress, as the process stops: otherwise what it took since the
    last hour's, and the refusals past each token's first 100, would be in no entry."""
    try:
        pipeline.summarise_ingest()
    except PipelineError as exc:  # the database went first: say so, the process stops anyway
        logger.error("ingest summary not written as the control plane stopped: %s", exc)
