"""dask-gateway end to end: `serve`, `dask-gateway-server` with the integration, two users, real processes.

Nobody configures a cluster: the gateway's config file calls ``configure(c)``, and each
user's cluster registers for that user (account rule ``{user}``), runs the plugin with its
own token (on the scheduler only) and closes when the user shuts it down.
"""

from __future__ import annotations

import asyncio
import json
import math
import operator
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.config
import httpx
import pytest
from click.testing import CliRunner
from controlplane import serve_process
from gateway_server import free_port, gateway_server

from pipeline.cli import main

pytestmark = pytest.mark.slow

USERS = {"alice": 12, "bob": 7}  # tasks each user's first computation runs
TASKS = {**USERS, "dave": 21}  # and of the users of one test alone


TOKEN = "DASK_PIPELINE__INGEST__TOKEN"


def cli(home: Path, *args: str) -> Any:
    """A control-plane command on its home, ``--json``."""
    with dask.config.set({"pipeline.home": str(home)}):
        result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def run_workload(server: Any, user: str, before_shutdown: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """As ``user``: a cluster through the gateway, one worker, two computations (one task fails), shut down.

    Asynchronous: a closed synchronous ``Gateway`` raises again in ``__del__`` (dask-gateway 2026.3).
    """
    async with server.gateway(user, asynchronous=True) as gateway:
        cluster = await gateway.new_cluster()
        try:
            await cluster.scale(1)
            async with cluster.get_client(set_as_default=False) as client:
                await client.wait_for_workers(1, timeout=120)
                # functions the cluster imports by name (it cannot import this test module)
                negated = await client.gather(client.map(operator.neg, range(TASKS[user])))
                assert sum(negated) == -sum(range(TASKS[user]))
                roots = await client.gather(client.map(math.sqrt, [1, 4, -1, 9, 16]), errors="skip")
                assert len(roots) == 4
                seen = {
                    "scheduler": await client.run_on_scheduler(os.getenv, TOKEN) is not None,
                    "workers": list((await client.run(os.getenv, TOKEN)).values()),
                }
        finally:
            before_shutdown()
            await cluster.shutdown()
    return {"name": cluster.name, **seen}


def gateway_env(home: Path, url: str, tmp_path: Path) -> dict[str, str]:
    """The gateway's environment: the control plane, a gateway token for any account, a folder for spools."""
    token_file = tmp_path / "gateway.token"
    token_file.write_text(cli(home, "tokens", "create", "--role", "gateway", "--account", "*")["token"])
    token_file.chmod(0o600)
    return {
        "DASK_PIPELINE__GATEWAY__URL": url,
        "DASK_PIPELINE__GATEWAY__TOKEN_FILE": str(token_file),
        "DASK_PIPELINE__GATEWAY__HOME": str(tmp_path / "spools"),
    }


FAST = {"DASK_PIPELINE__PLUGIN__INTERVAL": "200ms", "DASK_PIPELINE__EMITTER__LINGER": "100ms"}


def test_every_gateway_cluster_reports_for_its_user_once_and_closes(tmp_path: Path) -> None:
    home = tmp_path / "control-plane"
    with serve_process(home) as served:
        env = gateway_env(home, served.url, tmp_path)
        with gateway_server(tmp_path / "gateway", integration=True, env=env, cluster_env=FAST) as server:
            ran = {user: asyncio.run(run_workload(server, user)) for user in USERS}
        members = {user: cli(home, "tokens", "create", "--account", user, "--user", user)["token"] for user in USERS}

        def api(user: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
            headers = {"Authorization": f"Bearer {members[user]}"}
            return httpx.request(method, f"{served.url}{path}", headers=headers, timeout=30, **kwargs)

        def records(user: str) -> list[dict[str, Any]]:
            return [json.loads(line) for line in api(user, "GET", "/v1/records").text.splitlines() if line]

        for user, tasks in USERS.items():
            assert ran[user]["scheduler"] and ran[user]["workers"] == [None], "only the scheduler holds the token"
            (cluster,) = api(user, "GET", "/v1/clusters").json()
            assert (cluster["account"], cluster["name"], cluster["state"]) == (user, ran[user]["name"], "closed")
            mine = records(user)
            assert len({r["record_id"] for r in mine}) == len(mine), "a record arrived twice"
            assert {(r["account"], r["user"], r["cluster_id"]) for r in mine} == {(user, user, cluster["cluster_id"])}
            jobs = sorted((r for r in mine if r["kind"] == "job"), key=lambda r: r["started_at"])
            assert [(j["tasks_total"], j["tasks_completed"], j["tasks_erred"]) for j in jobs] == [
                (tasks, tasks, 0),
                (5, 4, 1),
            ]
            assert any(r["kind"] == "cluster_snapshot" for r in mine)  # the last one, at least (its worker gone first)

        bobs = records("bob")
        filed = api("alice", "POST", "/v1/erasure-requests", json={"account": "alice", "user": "alice"})
        assert filed.status_code == 201, filed.text
        cli(home, "enforce")
        members["admin"] = cli(home, "tokens", "create", "--role", "admin", "--user", "privacy")["token"]
        assert api("admin", "GET", "/v1/records", params={"account": "alice"}).text == ""
        assert records("bob") == bobs


async def _scheduler_pid(server: Any, user: str) -> tuple[str, int]:
    async with server.gateway(user, asynchronous=True) as gateway:
        cluster = await gateway.new_cluster(shutdown_on_close=False)
        async with cluster.get_client(set_as_default=False) as client:
            pid = await client.run_on_scheduler(os.getpid)
        await cluster.close()
    return cluster.name, pid


def test_a_gateway_cluster_whose_scheduler_dies_becomes_lost_not_closed(tmp_path: Path) -> None:
    home = tmp_path / "control-plane"
    with serve_process(home, server__cluster_lost_after="6s") as served:
        env = gateway_env(home, served.url, tmp_path)
        heartbeats = "c.DBBackendBase.cluster_heartbeat_period = 1\nc.DBBackendBase.check_timeouts_period = 0.5"
        slow = {**FAST, "DASK_PIPELINE__PLUGIN__INTERVAL": "2s"}  # so that its spool is empty between snapshots
        with gateway_server(tmp_path / "gateway", integration=True, env=env, cluster_env=slow, extra=heartbeats) as gw:
            name, pid = asyncio.run(_scheduler_pid(gw, "carol"))
            spool = tmp_path / "spools" / name / "spool"
            deadline = time.monotonic() + 30
            while not spool.is_dir() or list(
                spool.rglob("*.batch")
            ):  # everything delivered: a spool replay has nothing
                assert time.monotonic() < deadline, "the scheduler's spool never emptied"
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            gw.wait_stopped(name)  # the gateway saw it fail
        assert "is left to become lost" in gw.log
        member = cli(home, "tokens", "create", "--account", "carol", "--user", "carol")["token"]
        deadline = time.monotonic() + 60
        while True:
            listed = httpx.get(f"{served.url}/v1/clusters", headers={"Authorization": f"Bearer {member}"}).json()
            if listed[0]["state"] != "open" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert [(c["name"], c["state"]) for c in listed] == [(name, "lost")]


def start_fails(gw: Any, user: str, *, then_logged: str) -> None:
    """As ``user``: a cluster whose start fails (the gateway's error); then until the gateway logs ``then_logged``."""

    async def start() -> None:
        async with gw.gateway(user, asynchronous=True) as gateway:
            with pytest.raises(Exception):  # noqa: B017 - the gateway's own error for a failed start
                await asyncio.wait_for(gateway.new_cluster(), 60)

    asyncio.run(start())
    deadline = time.monotonic() + 30
    while then_logged not in gw.log:
        assert time.monotonic() < deadline, gw.log[-2000:]
        time.sleep(0.1)


def test_a_gateway_cluster_whose_scheduler_never_starts_is_closed_not_left_open(tmp_path: Path) -> None:
    """A broken image: registered, never heard of, so never lost either; it stayed open, its token live,
    for the token's 30 days."""
    home = tmp_path / "control-plane"
    broken = 'c.ClusterConfig.scheduler_cmd = ["python", "-c", "raise SystemExit(\'no scheduler in this image\')"]'
    with serve_process(home) as served:
        env = gateway_env(home, served.url, tmp_path)
        with gateway_server(tmp_path / "gateway", integration=True, env=env, cluster_env=FAST, extra=broken) as gw:
            start_fails(gw, "dora", then_logged="closed in the control plane")
        member = cli(home, "tokens", "create", "--account", "dora", "--user", "dora")["token"]
        listed = httpx.get(f"{served.url}/v1/clusters", headers={"Authorization": f"Bearer {member}"}).json()
    assert [c["state"] for c in listed] == ["closed"]


def test_a_cluster_the_control_plane_cannot_register_fails_to_start_naming_why(tmp_path: Path) -> None:
    """The control plane down as a user starts a cluster: the gateway logged the error with a traceback
    through the HTTP client; its last line now says which cluster and why, after two frames."""
    token_file = tmp_path / "gateway.token"
    token_file.write_text("mp_" + "g" * 43)
    token_file.chmod(0o600)
    down = f"http://127.0.0.1:{free_port()}"
    env = {"DASK_PIPELINE__GATEWAY__URL": down, "DASK_PIPELINE__GATEWAY__TOKEN_FILE": str(token_file)}
    with gateway_server(tmp_path / "gateway", integration=True, env=env) as gw:
        start_fails(gw, "erin", then_logged="not registered with the control plane")
    [said] = [line for line in gw.lines if line.startswith("pipeline.errors.ApiError")]
    assert "not registered with the control plane" in said and f"{down} unreachable" in said, said
    assert "httpx" not in gw.log, gw.log[-3000:]


def test_a_gateway_cluster_stopped_while_the_control_plane_is_down_delivers_its_spool_once_it_is_back(
    tmp_path: Path,
) -> None:
    """The batches its scheduler could not deliver at the stop stayed in its spool for good: the cluster
    token lived in the scheduler's environment only, so nothing could replay them."""
    from tcpproxy import TCPProxy

    home = tmp_path / "control-plane"
    with serve_process(home) as served:
        proxy = TCPProxy("127.0.0.1", int(served.url.rsplit(":", 1)[1]))
        try:
            env = gateway_env(home, f"http://127.0.0.1:{proxy.port}", tmp_path)
            with gateway_server(tmp_path / "gateway", integration=True, env=env, cluster_env=FAST) as gw:
                name = asyncio.run(run_workload(gw, "dave", before_shutdown=proxy.cut))["name"]
                deadline = time.monotonic() + 60
                while "delivering them, then closing it" not in gw.log:
                    assert time.monotonic() < deadline, gw.log[-2000:]
                    time.sleep(0.2)
                proxy.restore()
                member = cli(home, "tokens", "create", "--account", "dave", "--user", "dave")["token"]
                headers = {"Authorization": f"Bearer {member}"}
                deadline = time.monotonic() + 90
                while httpx.get(f"{served.url}/v1/clusters", headers=headers).json()[0]["state"] != "closed":
                    assert time.monotonic() < deadline, gw.log[-2000:]
                    time.sleep(0.5)
        finally:
            proxy.close()
        lines = httpx.get(f"{served.url}/v1/records", headers=headers).text.splitlines()
    jobs = [r for r in map(json.loads, lines) if r["kind"] == "job"]
    assert sorted((j["tasks_total"], j["tasks_completed"], j["status"]) for j in jobs) == [
        (5, 4, "finished"),
        (TASKS["dave"], TASKS["dave"], "finished"),
    ]
    assert not list((tmp_path / "spools" / name).rglob("*.batch"))
