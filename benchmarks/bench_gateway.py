"""A dask-gateway cluster's start time with the pipeline's integration ÷ without it, same run.

``serve`` and two ``dask-gateway-server`` processes (``UnsafeLocalBackend``), one whose
config file calls ``configure(c)`` and one that does not, run side by side. A user asks
each in turn (ABBA order) for a cluster and the time until ``new_cluster`` returns (the
scheduler is up and has reported to the gateway) is the start time; the cluster is shut
down, untimed, and its processes are gone before the next start. With the integration that
time includes the registration with the control plane and the scheduler's import and start
of the plugin (``--preload pipeline.preload``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import dask.config

from benchmarks import row

GOAL_RATIO = 1.1


async def _start_time(server: Any) -> float:
    """Seconds from asking for a cluster to having it running; the cluster is then shut down."""
    async with server.gateway("bench", asynchronous=True) as gateway:
        started = time.perf_counter()
        cluster = await gateway.new_cluster()
        elapsed = time.perf_counter() - started
        await cluster.shutdown()
    await asyncio.to_thread(server.wait_stopped, cluster.name)  # the next start has the machine to itself
    return elapsed


def _gateway_token(home: Path) -> str:
    from click.testing import CliRunner

    from pipeline.cli import main

    with dask.config.set({"pipeline.home": str(home)}):
        result = CliRunner().invoke(main, ["tokens", "create", "--role", "gateway", "--account", "*", "--json"])
    if result.exit_code != 0:
        raise RuntimeError(f"tokens create failed: {result.output}")
    return str(json.loads(result.stdout)["token"])


def run(quick: bool) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from controlplane import serve_process  # the test helpers: benchmarks run from a source checkout
    from gateway_server import gateway_server

    pairs = 2 if quick else 16
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        served = stack.enter_context(serve_process(root / "control-plane"))
        token_file = root / "gateway.token"
        token_file.write_text(_gateway_token(root / "control-plane"))
        env = {
            "DASK_PIPELINE__GATEWAY__URL": served.url,
            "DASK_PIPELINE__GATEWAY__TOKEN_FILE": str(token_file),
            "DASK_PIPELINE__GATEWAY__HOME": str(root / "spools"),
        }
        servers = {
            False: stack.enter_context(gateway_server(root / "plain", integration=False)),
            True: stack.enter_context(gateway_server(root / "integrated", integration=True, env=env)),
        }
        for integrated in (False, True):  # warm-up: imports and caches, untimed
            asyncio.run(_start_time(servers[integrated]))
        times: dict[bool, list[float]] = {False: [], True: []}
        for pair in range(pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            for integrated in order:
                times[integrated].append(asyncio.run(_start_time(servers[integrated])))
    plain, integrated = statistics.median(times[False]), statistics.median(times[True])
    ratio = statistics.median(b / a for a, b in zip(times[False], times[True], strict=True))
    note = f"median of {pairs} pairs (ABBA), UnsafeLocalBackend, one serve on loopback"
    return [
        row("gateway cluster start, without integration", plain, "s", note=note),
        row("gateway cluster start, with integration", integrated, "s", note=note),
        row(
            "gateway cluster start ratio with/without",
            ratio,
            "×",
            goal=f"≤ {GOAL_RATIO}",
            met=ratio <= GOAL_RATIO,
            note="registration + plugin preload on the scheduler",
        ),
    ]
