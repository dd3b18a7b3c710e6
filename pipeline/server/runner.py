"""``serve``: the API on uvicorn and the retention scheduler, started and stopped together.

uvicorn runs on the main thread and owns SIGTERM/SIGINT: the first signal stops
accepting requests, lets requests in flight finish, then stops the retention
scheduler (which finishes a pass in progress). The process then returns
normally instead of re-raising the signal, so ``serve`` exits 0 after a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from pipeline.errors import ConfigError
from pipeline.server.app import create_app

if TYPE_CHECKING:
    from pipeline.retention.service import RetentionService
    from pipeline.runtime import Pipeline

__all__ = ["ControlPlaneServer", "run_control_plane", "serving_in_thread", "uvicorn_config"]

#: idle connections stay open this long: longer than a plugin's delivery period, so a cluster
#: keeps one connection instead of racing the server's close on every post (uvicorn's default: 5 s)
KEEP_ALIVE_SECONDS = 75


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
            self.url = f"{scheme}://{host}:{port}"
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


def uvicorn_config(pipeline: Pipeline, *, host: str | None = None, port: int | None = None) -> uvicorn.Config:
    """The uvicorn configuration ``pipeline.server.*`` asks for (TLS when cert and key are set).

    :raises ConfigError: only one of the TLS files is set, or one does not exist
    """
    s = pipeline.settings
    if (s.tls_cert is None) != (s.tls_key is None):
        raise ConfigError("pipeline.server.tls-cert and pipeline.server.tls-key must be set together")
    for key, path in (("tls-cert", s.tls_cert), ("tls-key", s.tls_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"pipeline.server.{key}: no such file {path}")
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
    if service is None:
        return []
    return [{"job": r.job, "slot": r.slot, "outcome": r.outcome} for r in service.history]
