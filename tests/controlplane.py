"""A real control plane for tests: uvicorn on 127.0.0.1, a free port, in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore
from pipeline.server.runner import ControlPlaneServer, uvicorn_config


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
    ready = threading.Event()
    server = ControlPlaneServer(uvicorn_config(pipeline, host="127.0.0.1", port=0), lambda _url: ready.set())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("control plane did not start")
    assert server.url is not None
    try:
        yield ControlPlane(server.url, pipeline, TokenStore(pipeline))
    finally:
        server.should_exit = True
        thread.join(60)
