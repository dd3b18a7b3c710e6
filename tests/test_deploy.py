"""A cluster deployed as people deploy one: `serve`, then `dask scheduler`, `dask worker` and a client
as separate processes, each started from the file `clusters create --out` wrote for its role."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from controlplane import Served, serve_process

from pipeline.cli import main

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def role_env(config: Path, person: Path, **extra: str) -> dict[str, str]:
    """The environment of a host of one role: its config file, its own $HOME, nothing of the test's dask config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    return {**env, "DASK_CONFIG": str(config), "HOME": str(person), **extra}


@contextmanager
def process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(predicate, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def served(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """`serve` on loopback and a member of acme logged in to it (token given on standard input)."""
    monkeypatch.setenv("HOME", str(tmp_path / "member"))
    assert run("init").exit_code == 0
    with serve_process(home, "--no-retention") as plane:
        token = json.loads(run("tokens", "create", "--account", "acme", "--user", "ann", "--json").output)["token"]
        login = run("login", "--url", plane.url, input=token + "\n")
        assert login.exit_code == 0, login.output
        yield plane


def scheduler_command(port: int) -> list[str]:
    return [
        str(BIN / "dask"),
        "scheduler",
        "--preload",
        "pipeline.preload",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-address",
        "127.0.0.1:0",  # as the README starts it: the dashboard is plain HTTP
    ]


def test_three_role_files_run_a_real_cluster_whose_records_reach_serve(served: Served, tmp_path: Path) -> None:
    out_dir = tmp_path / "etl"
    created = run("clusters", "create", "--account", "acme", "--name", "etl", "--out", str(out_dir))
    assert created.exit_code == 0, created.output
    assert "mp_" not in (out_dir / "client.yaml").read_text() + (out_dir / "worker.yaml").read_text()
    port = free_port()
    address = f"tls://127.0.0.1:{port}"

    # the worker's file cannot run a scheduler: it holds no scheduler key (and no token)
    refused = subprocess.run(
        scheduler_command(free_port()),
        env=role_env(out_dir / "worker.yaml", tmp_path / "worker-host"),
        capture_output=True,
        timeout=120,
    )
    assert refused.returncode != 0

    with (
        process(
            scheduler_command(port),
            role_env(out_dir / "scheduler.yaml", tmp_path / "scheduler-host"),
            tmp_path / "scheduler.log",
        ) as scheduler,
        process(
            [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-dashboard"],
            role_env(out_dir / "worker.yaml", tmp_path / "worker-host"),
            tmp_path / "worker.log",
        ),
    ):
        client_code = (
            "from distributed import Client\n"
            f"with Client({address!r}, timeout=60) as c:\n"
            "    c.wait_for_workers(1)\n"
            "    print(sum(c.gather(c.map(lambda x: x * x, range(20)))))\n"
        )
        computed = subprocess.run(
            [sys.executable, "-c", client_code],
            env=role_env(out_dir / "client.yaml", tmp_path / "client-host"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert computed.stdout.strip() == "2470", computed.stderr
        scheduler.send_signal(signal.SIGINT)  # the scheduler closes: the plugin delivers and closes the cluster
        scheduler.wait(90)
    log = (tmp_path / "scheduler.log").read_text()
    assert log.count("pipeline.plugin - INFO - metadata plugin active: remote mode") == 1, log
    assert "account 'acme', cluster cluster-" in log

    records = [json.loads(line) for line in run("records", "--account", "acme", "--json").output.splitlines()]
    jobs = [r for r in records if r["kind"] == "job"]
    assert [(j["tasks_completed"], j["status"]) for j in jobs] == [(20, "finished")]
    [cluster] = [json.loads(line) for line in run("clusters", "list", "--json").output.splitlines()]
    assert cluster["state"] == "closed"


def test_a_scheduler_killed_mid_job_leaves_a_lost_cluster_and_a_lost_job(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18 case 3: after `kill -9` the cluster stayed open forever and the running job was never recorded."""
    monkeypatch.setenv("HOME", str(tmp_path / "member"))
    assert run("init").exit_code == 0
    with serve_process(home, "--no-retention", server__cluster_lost_after="5s") as plane:
        token = json.loads(run("tokens", "create", "--account", "acme", "--user", "ann", "--json").output)
        assert run("login", "--url", plane.url, input=token["token"]).exit_code == 0
        out_dir = tmp_path / "etl"
        assert run("clusters", "create", "--account", "acme", "--out", str(out_dir)).exit_code == 0

        def listed() -> dict[str, Any]:
            [cluster] = [json.loads(line) for line in run("clusters", "list", "--json").output.splitlines()]
            return dict(cluster)

        port = free_port()
        fast = {"DASK_PIPELINE__PLUGIN__INTERVAL": "200ms", "DASK_PIPELINE__EMITTER__LINGER": "0s"}
        client_code = (
            "import sys, time\n"
            "from distributed import Client, as_completed\n"
            f"c = Client('tls://127.0.0.1:{port}', timeout=60)\n"
            "futures = c.map(lambda x: time.sleep(0.2) or x, range(200))\n"
            "for n, _ in enumerate(as_completed(futures)):\n"
            "    if n == 5:\n"
            "        print('running', flush=True)\n"
            "time.sleep(600)\n"
        )
        with (
            process(
                scheduler_command(port),
                role_env(out_dir / "scheduler.yaml", tmp_path / "scheduler-host", **fast),
                tmp_path / "scheduler.log",
            ) as scheduler,
            process(
                [str(BIN / "dask"), "worker", f"tls://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard"],
                role_env(out_dir / "worker.yaml", tmp_path / "worker-host"),
                tmp_path / "worker.log",
            ),
        ):
            client = subprocess.Popen(
                [sys.executable, "-c", client_code],
                env=role_env(out_dir / "client.yaml", tmp_path / "client-host"),
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert client.stdout is not None and client.stdout.readline().strip() == "running"
                progressed = datetime.now(UTC) + timedelta(seconds=0.5)
                wait_for(  # a snapshot taken after five tasks finished has arrived
                    lambda: (contact := listed()["last_contact_at"]) and datetime.fromisoformat(contact) > progressed,
                    "a snapshot of the running job",
                )
                scheduler.kill()  # SIGKILL: no plugin close, no last batch
                scheduler.wait(30)
            finally:
                client.kill()
                client.wait(30)
                assert client.stdout is not None
                client.stdout.close()

        def jobs() -> list[dict[str, Any]]:
            records = run("records", "--account", "acme", "--json").output.splitlines()
            return [r for r in map(json.loads, records) if r["kind"] == "job"]

        wait_for(jobs, "serve's own sweep to record the lost job (nobody lists clusters)", timeout=60)
        cluster = listed()
        assert cluster["state"] == "lost" and cluster["last_contact_at"] and cluster["closed_at"] is None
        [job] = jobs()
        assert (job["status"], job["tasks_total"], job["finished_at"]) == ("lost", 200, None)
        assert 5 <= job["tasks_completed"] < 200
        text = run("clusters", "list").output
        assert "lost" in text and "last contact 20" in text


def test_the_readmes_embedded_example_works_as_written(tmp_path: Path) -> None:
    """Issue 18 case 7: its records went to `unassigned`, and nothing said the plugin was active or in which mode."""
    person = tmp_path / "ann"  # the default pipeline.home is under $HOME
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env |= {"HOME": str(person), "DASK_PIPELINE__EMITTER__LINGER": "0s"}
    port = free_port()
    with process(
        scheduler_command(port), {**env, "DASK_PIPELINE__ACCOUNT": "acme"}, tmp_path / "scheduler.log"
    ) as scheduler:
        client_code = (
            "from distributed import Client\n"
            f"with Client('tcp://127.0.0.1:{port}', timeout=60) as c:\n"
            "    c.wait_for_workers(1)\n"
            "    print(sum(c.gather(c.map(abs, range(-10, 0)))))\n"
        )
        with process(
            [str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--no-dashboard"],
            env,
            tmp_path / "worker.log",
        ):
            computed = subprocess.run(
                [sys.executable, "-c", client_code], env=env, capture_output=True, text=True, timeout=120
            )
            assert computed.stdout.strip() == "55", computed.stderr
            scheduler.send_signal(signal.SIGINT)
            scheduler.wait(90)
    log = (tmp_path / "scheduler.log").read_text()
    assert "pipeline.plugin - INFO - metadata plugin active: embedded mode (single-tenant" in log, log
    shown = subprocess.run(
        [sys.executable, "-m", "pipeline", "records", "--account", "acme", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    jobs = [r for r in map(json.loads, shown.stdout.splitlines()) if r["kind"] == "job"]
    assert [(j["account"], j["tasks_completed"], j["status"]) for j in jobs] == [("acme", 10, "finished")]


def test_a_plugin_a_client_registers_logs_in_the_schedulers_format(tmp_path: Path) -> None:
    """Registered by `client.register_plugin` on a plain `dask scheduler`, the plugin's WARNING came out bare
    (Python's last resort) and its INFO line, which says the mode it runs in, not at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env |= {"HOME": str(tmp_path / "ann"), "DASK_PIPELINE__EMITTER__LINGER": "0s"}
    port = free_port()
    plain = [c for c in scheduler_command(port) if c not in ("--preload", "pipeline.preload")]
    with process(plain, env, tmp_path / "scheduler.log") as scheduler:
        client_code = (
            "from distributed import Client\n"
            "from pipeline.plugin import MetadataPlugin\n"
            f"with Client('tcp://127.0.0.1:{port}', timeout=60) as c:\n"
            "    c.register_plugin(MetadataPlugin())\n"
        )
        registered = subprocess.run(
            [sys.executable, "-c", client_code], env=env, capture_output=True, text=True, timeout=120
        )
        assert registered.returncode == 0, registered.stderr
        scheduler.send_signal(signal.SIGINT)
        scheduler.wait(90)
    log = (tmp_path / "scheduler.log").read_text()
    assert "pipeline.plugin - WARNING - pipeline.account is not set" in log, log
    assert "pipeline.plugin - INFO - metadata plugin active: embedded mode" in log, log
