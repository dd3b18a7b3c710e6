"""Exact counts when Dask recomputes, re-runs and retries: each checked against the scheduler's own log.

The independent count is the scheduler's ``transition_log``: every run of a
task that finished is one ``processing → memory`` entry there.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
import dask
import dask.config
import pytest
from clusters import preloaded_cluster
from dask import delayed
from distributed import Client, LocalCluster, Scheduler, wait

from pipeline.config import Settings
from pipeline.plugin import MetadataPlugin
from pipeline.runtime import Pipeline

# worker processes get this module's functions by value: they need not import the tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BUSY = 0.01


def busy(x: Any) -> int:
    """Computes for BUSY seconds, so that compute time is measurable."""
    start = time.perf_counter()
    while time.perf_counter() - start < BUSY:
        pass
    return 1


def add(*parts: Any) -> int:
    return busy(parts)


def fails_until(flag: str) -> int:
    """Raises until the file ``flag`` exists: a transient failure that client.retry() gets past."""
    if not os.path.exists(flag):
        raise RuntimeError("not yet")
    return busy(flag)


def even_fails_until(n: int, flag: str) -> int:
    """An even ``n`` raises until the file ``flag`` exists."""
    return fails_until(flag) if n % 2 == 0 else busy(n)


def maybe_fail(x: int) -> int:
    if x % 50 == 49:
        raise ValueError(x)
    return busy(x)


def stuck(x: int) -> int:
    time.sleep(1)
    return x


@contextmanager
def _cluster(processes: bool) -> Iterator[LocalCluster]:
    with (
        dask.config.set({"pipeline.account": "acme", "pipeline.plugin.interval": "100ms"}),
        preloaded_cluster(n_workers=2, threads_per_worker=2, processes=processes) as cluster,
    ):
        yield cluster


@pytest.fixture
def threads_cluster(home: Path) -> Iterator[LocalCluster]:
    with _cluster(processes=False) as cluster:
        yield cluster


@pytest.fixture
def process_cluster(home: Path) -> Iterator[LocalCluster]:
    """Worker processes, so that one can be killed with SIGKILL."""
    with _cluster(processes=True) as cluster:
        yield cluster


def _records(settings: Settings, kind: str) -> list[dict[str, Any]]:
    return [r for r in Pipeline.open(settings).read_records("long_term", account="acme") if r["kind"] == kind]


def _jobs(settings: Settings) -> list[tuple[int, int, int]]:
    return sorted((j["tasks_total"], j["tasks_completed"], j["tasks_erred"]) for j in _records(settings, "job"))


def _final(settings: Settings) -> dict[str, Any]:
    return max(_records(settings, "cluster_snapshot"), key=lambda r: r["observed_at"])


def _runs(scheduler: Scheduler, prefix: str) -> int:
    """Finished runs of a prefix's tasks, from the scheduler's own transition log."""
    return sum(
        1
        for t in scheduler.transition_log
        if t.start == "processing" and t.finish == "memory" and _prefix(t.key) == prefix
    )


def _prefix(key: Any) -> str:
    return (key[0] if isinstance(key, tuple) else key).rsplit("-", 1)[0]


def _until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _kill_worker_holding_most(cluster: LocalCluster) -> int:
    """SIGKILL the worker process that holds the most results; how many it held."""
    scheduler = cluster.scheduler
    victim = max(scheduler.workers.values(), key=lambda ws: len(ws.has_what))
    held = len(victim.has_what)
    (nanny,) = [n for n in cluster.workers.values() if n.worker_address == victim.address]
    os.kill(nanny.pid, signal.SIGKILL)
    _until(lambda: victim.address not in scheduler.workers, "the scheduler to notice the lost worker")
    return held


def test_results_recomputed_after_a_lost_worker_count_once(process_cluster, settings) -> None:
    scheduler = process_cluster.scheduler
    with Client(process_cluster) as client:
        futures = client.map(busy, range(24), key=[f"busy-{i}" for i in range(24)])
        wait(futures)
        lost = _kill_worker_holding_most(process_cluster)
        assert client.gather(futures) == [1] * 24
        assert lost > 0 and _runs(scheduler, "busy") == 24 + lost  # the scheduler did recompute
        plugin: MetadataPlugin = scheduler.plugins["metadata-pipeline"]
        assert plugin.completed_total == 24
        del futures
    process_cluster.close()

    assert _jobs(settings) == [(24, 24, 0)]
    final = _final(settings)
    assert (final["tasks_completed_total"], final["tasks_erred_total"]) == (24, 0)
    (job,) = _records(settings, "job")
    assert final["compute_seconds_total"] >= job["compute_seconds"] >= 24 * BUSY  # recomputing adds seconds


def test_released_keys_run_again_count_for_the_computation_that_ran_them(threads_cluster, settings) -> None:
    scheduler = threads_cluster.scheduler
    loads = [delayed(busy)(i, dask_key_name=f"load-{i}") for i in range(12)]
    derived = [delayed(busy)(x, dask_key_name=f"derived-{i}") for i, x in enumerate(loads)]
    with Client(threads_cluster) as client:
        persisted = client.persist(derived)
        wait(client.futures_of(persisted))
        _until(lambda: all(scheduler.tasks[f"load-{i}"].state == "released" for i in range(12)), "loads released")
        total = client.compute(delayed(add)(*loads, dask_key_name="total-0"))
        assert total.result() == 1
        assert _runs(scheduler, "load") == 24  # the scheduler ran every load twice
        del persisted, total
    threads_cluster.close()

    jobs = sorted(_records(settings, "job"), key=lambda j: j["started_at"])
    assert [(j["tasks_total"], j["tasks_completed"], j["task_prefixes"]) for j in jobs] == [
        (24, 24, ["derived", "load"]),
        (13, 13, ["load", "total"]),
    ]
    assert jobs[1]["compute_seconds"] >= 13 * BUSY  # the second run of the loads is the second job's
    final = _final(settings)
    assert final["tasks_completed_total"] == 37


def test_a_retry_is_a_job_of_its_own(threads_cluster, settings, tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    with Client(threads_cluster) as client:
        future = client.submit(fails_until, str(flag))
        wait(future)
        assert future.status == "error"
        flag.touch()
        client.retry([future])
        assert future.result() == 1
        del future
    threads_cluster.close()

    jobs = sorted(_records(settings, "job"), key=lambda j: j["started_at"])
    assert [(j["tasks_total"], j["tasks_completed"], j["tasks_erred"]) for j in jobs] == [(1, 0, 1), (1, 1, 0)]
    assert jobs[0]["finished_at"] <= jobs[1]["started_at"]
    assert jobs[1]["task_prefixes"] == ["fails_until"]
    final = _final(settings)
    assert (final["tasks_completed_total"], final["tasks_erred_total"]) == (1, 1)


def test_a_retry_of_results_and_errors_takes_the_errors_whatever_the_order(
    threads_cluster, settings, tmp_path: Path
) -> None:
    """``client.retry()`` runs every key it is given again, results in memory too: the retry's job took
    those handled after its first error and left those before it, 10 tasks giving 9 or fewer."""
    flag = tmp_path / "ready"
    with Client(threads_cluster) as client:
        futures = client.map(even_fails_until, range(10), flag=str(flag))  # one computation
        wait(futures)
        flag.touch()
        client.retry(futures)
        assert client.gather(futures) == [1] * 10
        del futures
    threads_cluster.close()

    jobs = sorted(_records(settings, "job"), key=lambda j: j["started_at"])
    assert [(j["tasks_total"], j["tasks_completed"], j["tasks_erred"]) for j in jobs] == [(10, 5, 5), (5, 5, 0)]
    final = _final(settings)
    assert (final["tasks_completed_total"], final["tasks_erred_total"]) == (10, 5)


def test_tasks_by_state_shows_only_tasks_the_scheduler_holds(threads_cluster, settings) -> None:
    scheduler = threads_cluster.scheduler
    with Client(threads_cluster) as client:
        futures = client.map(busy, range(100))
        wait(futures)
        del futures[50:]  # half the group is forgotten, the other half stays in memory
        _until(lambda: len(scheduler.tasks) == 50, "the released half to be forgotten")
        plugin: MetadataPlugin = scheduler.plugins["metadata-pipeline"]
        held = Counter(ts.state for ts in scheduler.tasks.values())
        since = time.time()

        def snapshots_since() -> list[dict[str, Any]]:
            plugin.emitter.flush()
            return [r for r in _records(settings, "cluster_snapshot") if r["observed_at"].timestamp() > since]

        _until(lambda: bool(snapshots_since()), "a snapshot")
        snapshot = min(snapshots_since(), key=lambda r: r["observed_at"])
        del futures
    assert snapshot["tasks_by_state"] == dict(held) == {"memory": 50}


def test_cluster_totals_equal_the_sums_over_jobs_under_a_mixed_workload(
    process_cluster, settings, tmp_path: Path
) -> None:
    """Errors, cancellations, a retry, released keys run again and a lost worker, on one cluster."""
    scheduler = process_cluster.scheduler
    flag = tmp_path / "ready"
    with Client(process_cluster) as client:
        blocked = client.map(stuck, range(4))
        _until(lambda: any(ts.state == "processing" for ts in scheduler.tasks.values()), "a running task")
        client.cancel(blocked)  # cancelled while running
        mixed = client.map(maybe_fail, range(200))  # 4 raise
        flaky = client.submit(fails_until, str(flag))
        loads = [delayed(busy)(i, dask_key_name=f"load-{i}") for i in range(6)]
        persisted = client.persist([delayed(busy)(x, dask_key_name=f"derived-{i}") for i, x in enumerate(loads)])
        wait(mixed + [flaky] + client.futures_of(persisted))
        flag.touch()
        client.retry([flaky])
        assert flaky.result() == 1
        again = client.compute(delayed(add)(*loads, dask_key_name="total-0"))
        assert again.result() == 1
        lost = _kill_worker_holding_most(process_cluster)
        wait(mixed)
        assert lost > 0
        assert sum(f.status == "error" for f in mixed) == 4
        del mixed, blocked, flaky, persisted, again
        _until(lambda: not scheduler.tasks, "every task to be forgotten")
    process_cluster.close()

    jobs = _records(settings, "job")
    final = _final(settings)
    assert final["tasks_completed_total"] == sum(j["tasks_completed"] for j in jobs)
    assert final["tasks_erred_total"] == sum(j["tasks_erred"] for j in jobs)
    assert final["tasks_erred_total"] == 5  # 4 raised, and the flaky task's first run
    assert all(j["tasks_completed"] + j["tasks_erred"] <= j["tasks_total"] for j in jobs)
    assert all(j["finished_at"] is not None for j in jobs)
