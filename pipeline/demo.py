"""The ``demo`` command: a real LocalCluster with the plugin, a workload, the stored result."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import dask.config

from pipeline.config import Settings
from pipeline.runtime import Pipeline
from pipeline.security.aws import forward_aws_credentials
from pipeline.security.tls import ClusterCredentials, issue_credentials

__all__ = ["run_demo"]

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
    cluster's own TLS, workers given an AWS session token when there are local AWS credentials."""
    from distributed import Client, LocalCluster, wait

    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=":0",
            security=credentials.security(),
            scheduler_kwargs={"preload": ["pipeline.preload"]},
        ) as cluster,
        Client(cluster) as client,
        forward_aws_credentials(
            client,
            worker_cert=credentials.certs["worker"],
            role_arn=config.aws_role_arn,
            duration=timedelta(seconds=config.aws_session_duration),
        ) as aws,
    ):
        scheduler_address = cluster.scheduler_address
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
    }


def run_demo(*, tasks: int, account: str, user: str | None = None, remote: bool = False) -> dict[str, Any]:
    """The workload, then what each store holds for its cluster.

    Embedded (default): the plugin writes through the pipeline in-process. ``remote``: a
    control plane on loopback, a member token and a registered cluster; the plugin holds
    only the ingest URL, its cluster token and the intake public key, and the records
    are read back through the API with the member's token.
    """
    pipeline = Pipeline.open(Settings.from_config(), create=True)  # init, so a bad key fails first
    if remote:
        stored_records, cluster_id, ran = _remote(pipeline, tasks, account, user)
    else:
        cluster_id = f"demo-{uuid.uuid4().hex[:12]}"
        validity = timedelta(seconds=pipeline.settings.tls_validity)
        credentials = issue_credentials(pipeline.keyring, account, cluster_id, validity=validity)
        pipeline.close()
        settings = {"pipeline.account": account, "pipeline.user": user, "pipeline.cluster-id": cluster_id}
        ran = _workload(tasks, settings, credentials, pipeline.settings)
        pipeline = Pipeline.open(Settings.from_config())
        stored_records = {store: list(pipeline.read_records(store, account=account)) for store in pipeline.stores}
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
    pipeline.close()
    return {
        "account": account,
        "cluster_id": cluster_id,
        "tasks": tasks,
        **ran,
        "jobs": len(jobs),
        "stored": stored,
        "job_records": jobs,
        "home": pipeline.settings.home,
    }


def _remote(
    pipeline: Pipeline, tasks: int, account: str, user: str | None
) -> tuple[dict[str, list[dict[str, Any]]], str, dict[str, Any]]:
    """The workload through a control plane on loopback; (records per store, cluster id, how it ran)."""
    from pipeline.apiclient import ApiClient, Credentials
    from pipeline.server.auth import TokenStore
    from pipeline.server.clusters import cluster_config
    from pipeline.server.runner import serving_in_thread

    with serving_in_thread(pipeline) as url:
        member = TokenStore(pipeline).create("member", account, user or "demo")
        with ApiClient(Credentials(url, member.token)) as api:
            registration = api.json("POST", "/v1/clusters", json={"account": account, "name": "demo"})
            config = cluster_config(registration)["pipeline"]
            settings = {
                "pipeline.home": str(pipeline.settings.home / "demo-cluster"),  # the cluster's spool, nothing else
                "pipeline.account": account,
                "pipeline.user": user,
                "pipeline.cluster-id": config["cluster-id"],
                "pipeline.ingest": config["ingest"],
            }
            credentials = ClusterCredentials.from_json(registration["cluster_id"], registration["tls"])
            ran = _workload(tasks, settings, credentials, pipeline.settings)
            stored = {store: list(api.lines("/v1/records", {"store": store})) for store in pipeline.stores}
    return stored, registration["cluster_id"], ran
