"""A real control plane for tests: uvicorn on 127.0.0.1 and a free port, in a thread or as `serve`."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore
from pipeline.server.clusters import cluster_config
from pipeline.server.runner import serving_in_thread


@dataclass
class ControlPlane:
    url: str
    pipeline: Pipeline
    tokens: TokenStore

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def member(self, account: str, user: str) -> httpx.Client:
        return self.client(self.tokens.create("member", account, user).token)

    def admin(self) -> httpx.Client:
        return self.client(self.tokens.create("admin", user="compliance").token)


@contextmanager
def serving(pipeline: Pipeline) -> Iterator[ControlPlane]:
    """Serve ``pipeline`` over real HTTP until the block ends."""
    with serving_in_thread(pipeline) as url:
        yield ControlPlane(url, pipeline, TokenStore(pipeline))


@dataclass
class Served:
    """A running ``serve`` process, its URL and what it printed on stderr."""

    proc: subprocess.Popen[str]
    url: str
    stderr_lines: list[str]
    pump: threading.Thread

    def stop(self) -> tuple[str, str]:
        """SIGTERM, wait for the exit; returns (stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.pump.join(60)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return out, "".join(self.stderr_lines)


@contextmanager
def serve_process(home: Path, *args: str, open_files: int | None = None, **settings: str) -> Iterator[Served]:
    """``metadata-pipeline serve`` as a subprocess on a free loopback port.

    ``settings`` are ``pipeline.*`` keys as dask environment variables (``server__tls_cert="..."``).
    ``open_files``: the process starts with this soft open-files limit (a host's low ``ulimit -n``).
    The block may stop it (``Served.stop``); otherwise it is stopped with SIGTERM at the end.
    """
    env = {
        **os.environ,
        "DASK_PIPELINE__HOME": str(home),
        "DASK_PIPELINE__SERVER__HOST": "127.0.0.1",
        "DASK_PIPELINE__SERVER__PORT": "0",
        **{f"DASK_PIPELINE__{key.upper()}": value for key, value in settings.items()},
    }
    command = [sys.executable, "-m", "pipeline", "serve", *args]

    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_open_files if open_files is not None else None,
    )
    lines: list[str] = []
    pump = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
    pump.start()
    served = None
    deadline = time.monotonic() + 180  # generous: a start-up on a busy machine, not a timing check
    try:
        while served is None:
            found = next((m for line in list(lines) if (m := re.search(r"listening on (\S+)", line))), None)
            if found:
                served = Served(proc, found.group(1), lines, pump)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start: {''.join(lines)}")
            else:
                time.sleep(0.05)
        yield served
    finally:
        assert proc.stdout is not None
        if not proc.stdout.closed:  # the block did not stop it
            Served(proc, "", lines, pump).stop()


def cluster_settings(registration: dict[str, Any], cluster_home: Path, **extra: str) -> dict[str, Any]:
    """Exactly what `clusters create` prints, plus a home for the scheduler's spool (and ``extra`` settings)."""
    config = cluster_config(registration)["pipeline"]
    return {
        "pipeline.home": str(cluster_home),
        "pipeline.account": config["account"],
        "pipeline.cluster-id": config["cluster-id"],
        "pipeline.ingest.url": config["ingest"]["url"],
        "pipeline.ingest.token": config["ingest"]["token"],
        "pipeline.ingest.public-key": config["ingest"]["public-key"],
        "pipeline.plugin.interval": "200ms",
        "pipeline.emitter.retry-max": "500ms",
        **extra,
    }


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 problem with this status, a one-line detail and no stack trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body
