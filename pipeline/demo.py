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
from pipeline.security.tls import issue_credentials

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


def run_demo(*, tasks: int, account: str, user: str | None = None) -> dict[str, Any]:
    """Run three computations on a 2-worker LocalCluster loaded with the plugin by preload.

    The cluster gets its own TLS credentials (every connection is ``tls://``) and, when
    AWS credentials exist locally, a session token for its workers.
    """
    from distributed import Client, LocalCluster, wait

    config = Settings.from_config()
    pipeline = Pipeline.open(config, create=True)  # init, so a bad key fails first
    cluster_id = f"demo-{uuid.uuid4().hex[:12]}"
    credentials = issue_credentials(
        pipeline.keyring, account, cluster_id, validity=timedelta(seconds=config.tls_validity)
    )
    pipeline.close()
    settings = {"pipeline.account": account, "pipeline.user": user, "pipeline.cluster-id": cluster_id}
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

    pipeline = Pipeline.open(Settings.from_config())
    stored: dict[str, dict[str, int]] = {}
    jobs: list[dict[str, Any]] = []
    for store in pipeline.stores:
        counts: Counter[str] = Counter()
        for record in pipeline.read_records(store, account=account):
            if record["cluster_id"] != cluster_id:
                continue
            counts[record["data_type"]] += 1
            if store == "long_term" and record["kind"] == "job":
                jobs.append(record)
        stored[store] = dict(sorted(counts.items()))
    jobs.sort(key=lambda r: r["started_at"])
    return {
        "account": account,
        "cluster_id": cluster_id,
        "scheduler_address": scheduler_address,
        "tls": scheduler_address.startswith("tls://"),
        "aws_session_token": aws.credentials is not None,
        "tasks": tasks,
        "erred": erred,
        "jobs": len(jobs),
        "stored": stored,
        "job_records": jobs,
        "home": pipeline.settings.home,
    }
