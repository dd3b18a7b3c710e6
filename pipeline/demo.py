"""The ``demo`` command: a real LocalCluster with the plugin, a workload, the stored result."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import dask.config

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.runtime import Pipeline
from pipeline.security.aws import forward_aws_credentials, withheld_from_new_processes
from pipeline.security.tls import ClusterCredentials, issue_credentials

__all__ = ["run_demo"]

WORKERS = 2
FAIL_EVERY = 100  # one task in a hundred raises, to show erred counts


def _square(x: int) -> int:
    if x % FAIL_EVERY == FAIL_EVERY - 1:
        raise ValueError(f"demo failure for input {x}")
    time.sleep(0.0005)
    return x * x


def _quiet_task_errors() -> None:
    """The demo's failures are on purpose: don't print a traceback for each."""
    logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)


def _total(values: list[int]) -> int:
    return sum(values)


def _workload(
    tasks: int, settings: dict[str, Any], credentials: ClusterCredentials, config: Settings
) -> dict[str, Any]:
    """Three computations on a 2-worker LocalCluster loaded with the plugin by preload, over the
    cluster's own TLS, workers given an AWS session token when there are local AWS credentials
    (and started without the user's own: the worker processes inherit the environment)."""
    from distributed import Client, LocalCluster, wait

    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=0,  # the scheduler first, with the environment: its plugin may use AWS (a KMS key)
            threads_per_worker=1,
            dashboard_address=":0",
            security=credentials.security(),
            scheduler_kwargs={"preload": ["pipeline.preload"]},
        ) as cluster,
        Client(cluster) as client,
    ):
        with withheld_from_new_processes():
            cluster.scale(WORKERS)
            client.wait_for_workers(WORKERS)
        with forward_aws_credentials(
            client,
            worker_cert=credentials.certs["worker"],
            role_arn=config.aws_role_arn,
            duration=timedelta(seconds=config.aws_session_duration),
        ) as aws:
            scheduler_address = cluster.scheduler_address
            keys_in_reach = client.run_on_scheduler(_keys_in_reach)
            client.run(_quiet_task_errors)
            squares = client.map(_square, range(tasks))  # job 1: N tasks, 1 % fail
            wait(squares)
            good = [f for f in squares if f.status == "finished"]
            erred = len(squares) - len(good)
            chunks = client.map(_total, [good[i : i + 100] for i in range(0, len(good), 100)])  # job 2
            total = client.submit(_total, chunks)  # job 3
            total.result()
            del squares, good, chunks, total
    return {
        "erred": erred,
        "scheduler_address": scheduler_address,
        "tls": scheduler_address.startswith("tls://"),
        "aws_session_token": aws.credentials is not None,
        "keys_in_reach_of_the_scheduler": keys_in_reach,
    }


def _keys_in_reach() -> list[str]:
    """What code on the scheduler finds of the control plane's keys: keyrings in its process, key files in its home.

    Embedded, both (the mode is single-tenant); remote, neither.
    """
    import gc
    from pathlib import Path

    from pipeline.keys import Keyring

    found = [f"a {type(o).__name__} in the scheduler's process" for o in gc.get_objects() if isinstance(o, Keyring)]
    home = Path(str(dask.config.get("pipeline.home"))).expanduser()
    return sorted(set(found)) + sorted(str(path) for path in home.rglob("*.key"))


def run_demo(*, tasks: int, account: str, user: str | None = None, remote: bool = False) -> dict[str, Any]:
    """The workload, then what each store holds for its cluster.

    Embedded (default, single-tenant): the plugin writes through the pipeline in-process,
    so code on the scheduler can read every key. ``remote``: a control plane in a process of
    its own (``serve`` on loopback), a member token and a registered cluster; the plugin holds
    only the ingest URL, its cluster token and the intake public key, and the records are read
    back through the API with the member's token.
    """
    settings = Settings.from_config()
    if remote:
        return _remote(settings, tasks, account, user)
    pipeline = Pipeline.open(settings, create=True)  # init, so a bad key fails first
    cluster_id = f"demo-{uuid.uuid4().hex[:12]}"
    validity = timedelta(seconds=settings.tls_validity)
    credentials = issue_credentials(pipeline.keyring, account, cluster_id, validity=validity)
    pipeline.close()
    cluster = {"pipeline.account": account, "pipeline.user": user, "pipeline.cluster-id": cluster_id}
    ran = _workload(tasks, cluster, credentials, settings)
    pipeline = Pipeline.open(settings)
    try:
        stored = {store: list(pipeline.read_records(store, account=account)) for store in pipeline.stores}
    finally:
        pipeline.close()
    return _summary(account, cluster_id, tasks, ran, stored, settings)


def _summary(
    account: str,
    cluster_id: str,
    tasks: int,
    ran: dict[str, Any],
    stored_records: dict[str, list[dict[str, Any]]],
    settings: Settings,
) -> dict[str, Any]:
    stored: dict[str, dict[str, int]] = {}
    jobs: list[dict[str, Any]] = []
    for store, rows in stored_records.items():
        counts: Counter[str] = Counter()
        for record in rows:
            if record["cluster_id"] != cluster_id:
                continue
            counts[record["data_type"]] += 1
            if store == "long_term" and record["kind"] == "job":
                jobs.append(record)
        stored[store] = dict(sorted(counts.items()))
    jobs.sort(key=lambda r: str(r["started_at"]))
    return {
        "account": account,
        "cluster_id": cluster_id,
        "tasks": tasks,
        **ran,
        "jobs": len(jobs),
        "stored": stored,
        "job_records": jobs,
        "home": settings.home,
    }


def _remote(settings: Settings, tasks: int, account: str, user: str | None) -> dict[str, Any]:
    """The workload through a control plane in a process of its own: this one never opens a key."""
    from pipeline.apiclient import ApiClient, Credentials
    from pipeline.server.clusters import cluster_config

    with _control_plane_process(settings) as url:
        member = _pipeline_command(settings, "tokens", "create", "--account", account, "--user", user or "demo")
        with ApiClient(Credentials(url, member["token"])) as api:
            registration = api.json("POST", "/v1/clusters", json={"account": account, "name": "demo"})
            config = cluster_config(registration)["pipeline"]
            cluster = {
                "pipeline.home": str(settings.home / "demo-cluster"),  # the cluster's spool, nothing else
                "pipeline.account": account,
                "pipeline.user": user,
                "pipeline.cluster-id": config["cluster-id"],
                "pipeline.ingest": config["ingest"],
            }
            credentials = ClusterCredentials.from_json(registration["cluster_id"], registration["tls"])
            ran = _workload(tasks, cluster, credentials, settings)
            stores = [*settings.store_urls(), *(["archive"] if settings.archive_url else [])]
            stored = {store: list(api.lines("/v1/records", {"store": store})) for store in stores}
    return _summary(account, registration["cluster_id"], tasks, ran, stored, settings)


def _child_env(settings: Settings) -> dict[str, str]:
    """This process's environment, the pipeline home made explicit (it may come from dask.config.set)."""
    return {**os.environ, "DASK_PIPELINE__HOME": str(settings.home)}


def _pipeline_command(settings: Settings, *args: str) -> Any:
    """``metadata-pipeline ARGS --json`` in a process of its own; its JSON answer.

    :raises PipelineError: it failed (its one-line message)
    """
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--json"],
        env=_child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode:
        raise PipelineError(f"metadata-pipeline {args[0]} {args[1]}: {done.stderr.strip()}")
    return json.loads(done.stdout)


@contextmanager
def _control_plane_process(settings: Settings) -> Iterator[str]:
    """``metadata-pipeline serve --no-retention`` on a free loopback port until the block ends; its URL.

    :raises PipelineError: it did not start (with what it said)
    """
    env = {**_child_env(settings), "DASK_PIPELINE__SERVER__HOST": "127.0.0.1", "DASK_PIPELINE__SERVER__PORT": "0"}
    command = [sys.executable, "-m", "pipeline", "serve", "--no-retention"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    said: list[str] = []
    try:
        for line in proc.stderr:
            said.append(line)
            found = re.search(r"listening on (\S+)", line)
            if found:
                threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe from filling
                yield found.group(1)
                break
        else:
            raise PipelineError(f"the demo's control plane did not start: {''.join(said[-5:]).strip()}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
