"""A real ``dask-gateway-server`` for tests and benchmarks: local backend, a password, loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSWORD = "gateway-test-password"

_CONFIG = """\
import sys
c.DaskGateway.address = "127.0.0.1:{api_port}"
c.Proxy.address = "127.0.0.1:{web_port}"
c.Proxy.tcp_address = "127.0.0.1:{tcp_port}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.LocalBackend.clusters_directory = {clusters!r}
c.ClusterConfig.scheduler_cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
c.ClusterConfig.worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
c.ClusterConfig.environment = {environment!r}
c.ClusterConfig.idle_timeout = 600
c.DaskGateway.log_level = "DEBUG"
{extra}
{integration}
"""

_INTEGRATION = """\
from pipeline.integrations.gateway import configure
configure(c)
"""


@dataclass
class GatewayServer:
    """A running gateway: its public address, the scheduler proxy's and what it logged."""

    address: str
    proxy_address: str
    proc: subprocess.Popen[str]
    lines: list[str]

    def gateway(self, user: str, *, asynchronous: bool = False) -> Any:
        """A ``dask_gateway.Gateway`` client authenticated as ``user``."""
        from dask_gateway import BasicAuth, Gateway

        auth = BasicAuth(user, PASSWORD)
        return Gateway(self.address, proxy_address=self.proxy_address, auth=auth, asynchronous=asynchronous)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_stopped(self, cluster_name: str, timeout: float = 60) -> None:
        """Until the gateway logged that the cluster's processes are gone."""
        deadline = time.monotonic() + timeout
        while f"Cluster {cluster_name} stopped" not in self.log:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {cluster_name} did not stop")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def gateway_server(
    workdir: Path,
    *,
    integration: bool,
    env: dict[str, str] | None = None,
    cluster_env: dict[str, str] | None = None,
    extra: str = "",
) -> Iterator[GatewayServer]:
    """``dask-gateway-server -f dask_gateway_config.py`` until the block ends (SIGINT, then a kill).

    ``extra``: more lines of the config file.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    api_port, web_port, tcp_port = free_port(), free_port(), free_port()
    config = workdir / "dask_gateway_config.py"
    config.write_text(
        _CONFIG.format(
            api_port=api_port,
            web_port=web_port,
            tcp_port=tcp_port,
            password=PASSWORD,
            clusters=str(workdir / "clusters"),
            environment=cluster_env or {},
            extra=extra,
            integration=_INTEGRATION if integration else "",
        )
    )
    command = [str(Path(sys.executable).with_name("dask-gateway-server")), "-f", str(config)]
    proc = subprocess.Popen(
        command,
        cwd=workdir,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    pump = threading.Thread(target=lines.extend, args=(proc.stderr,), daemon=True)
    pump.start()
    try:
        deadline = time.monotonic() + 120
        while not any("Dask-Gateway server started" in line for line in list(lines)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask-gateway-server did not start: {''.join(lines)}")
            time.sleep(0.05)
        address = f"http://127.0.0.1:{web_port}"
        while not _healthy(address):  # the proxy routes to the API once it has the gateway's routing table
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask-gateway-server's proxy did not answer: {''.join(lines)}")
            time.sleep(0.05)
        yield GatewayServer(address, f"gateway://127.0.0.1:{tcp_port}", proc, lines)
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        pump.join(10)
        assert proc.stderr is not None
        proc.stderr.close()


def _healthy(address: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{address}/api/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
