"""MetadataPlugin on a real LocalCluster: exact counts, compute time, cluster figures, environment."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import dask
import dask.config
import distributed
import pytest
from clusters import preloaded_cluster
from conftest import make_record, sealed_batch
from distributed import Client, LocalCluster, wait

from pipeline import environment
from pipeline.bounds import MAX_ITEMS
from pipeline.config import Settings
from pipeline.plugin import MetadataPlugin, _bounded, _Job
from pipeline.principals import Principal
from pipeline.records import utcnow
from pipeline.runtime import Pipeline


def maybe_fail(x: int) -> float:
    """Busy for a moment, report how long it ran; every 100th input raises."""
    start = time.perf_counter()
    while time.perf_counter() - start < 0.002:
        pass
    if x % 100 == 99:
        raise ValueError(x)
    return time.perf_counter() - start


def _records(settings: Settings, store: str = "long_term", **filters: Any) -> list[dict[str, Any]]:
    return list(Pipeline.open(settings).read_records(store, account="acme", **filters))


@pytest.fixture
def cluster(home) -> Iterator[LocalCluster]:  # noqa: ANN001
    with (
        dask.config.set(
            {
                "pipeline.account": "acme",
                "pipeline.user": "ann",
                "pipeline.plugin.interval": "200ms",
                # in-process workers measure the whole test process, which outgrows 80 % of 1 GiB late in a
                # run: paused, they never finish a task
                "distributed.worker.memory.pause": False,
            }
        ),
        preloaded_cluster(
            n_workers=2,
            threads_per_worker=2,
            processes=False,
            memory_limit="1GiB",
        ) as cluster,
    ):
        yield cluster


def test_job_counts_are_exact_with_erred_tasks(cluster, settings) -> None:
    with Client(cluster) as client:
        futures = client.map(maybe_fail, range(1000))
        wait(futures)
        durations = client.gather([f for f in futures if f.status == "finished"])
        assert sum(f.status == "error" for f in futures) == 10
        del futures
        succeeded_compute = cluster.scheduler.task_prefixes["maybe_fail"].all_durations["compute"]
    cluster.close()

    (job,) = [r for r in _records(settings) if r["kind"] == "job"]
    assert (job["tasks_total"], job["tasks_completed"], job["tasks_erred"]) == (1000, 990, 10)
    assert job["task_prefixes"] == ["maybe_fail"]
    assert job["started_at"] <= job["finished_at"]
    # compute also counts the erred tasks' intervals, which the scheduler's prefix totals leave out
    assert job["compute_seconds"] > succeeded_compute > sum(durations)
    snapshots = [r for r in _records(settings) if r["kind"] == "cluster_snapshot"]
    final = max(snapshots, key=lambda r: r["observed_at"])
    assert (final["tasks_completed_total"], final["tasks_erred_total"]) == (990, 10)
    assert final["compute_seconds_total"] == pytest.approx(job["compute_seconds"])


def test_compute_seconds_match_the_tasks_own_durations(cluster, settings) -> None:
    with Client(cluster) as client:
        futures = client.map(maybe_fail, range(0, 5000, 10))  # none of these raise
        durations = client.gather(futures)
        scheduler_compute = cluster.scheduler.task_prefixes["maybe_fail"].all_durations["compute"]
    cluster.close()
    (job,) = [r for r in _records(settings) if r["kind"] == "job"]
    assert job["compute_seconds"] == pytest.approx(
        scheduler_compute, abs=1e-6 * len(durations)
    )  # scheduler rounds to µs
    # each worker interval wraps the task's own run: never shorter (how much longer depends on the machine's load)
    assert sum(durations) <= job["compute_seconds"]


def test_one_job_record_per_client_call(cluster, settings) -> None:
    with Client(cluster) as client:
        a = client.map(maybe_fail, range(10))
        b = client.submit(sum, a)
        assert b.result() > 0
        c = client.map(maybe_fail, range(10))  # same keys as `a`: no new job
        wait(c)
    cluster.close()
    jobs = sorted((r["tasks_total"], r["task_prefixes"][0]) for r in _records(settings) if r["kind"] == "job")
    assert jobs == [(1, "sum"), (10, "maybe_fail")]


def test_a_job_of_more_task_prefixes_than_ingest_takes_keeps_its_record(settings) -> None:
    """Ingest takes at most 10,000 entries in a list: the job's record, and every snapshot while it ran, were
    refused. (A real job of 10,050 prefixes costs a LocalCluster minutes: its progress is built here.)"""
    job = _Job(utcnow())
    job.prefixes = {f"t{i}" for i in range(MAX_ITEMS + 50)}
    job.total = job.completed = MAX_ITEMS + 50
    pipeline = Pipeline.open(settings, create=True)
    record = make_record("job", account="acme", status="finished", **MetadataPlugin._progress(job))
    pipeline.ingest(sealed_batch(pipeline, [record])[1], Principal.embedded_cluster("acme", None))
    (stored,) = _records(settings)
    assert len(stored["task_prefixes"]) == MAX_ITEMS and stored["task_prefixes"][0] == "t0"
    pipeline.close()


def test_a_job_of_task_prefixes_longer_than_ingest_takes_keeps_its_record(settings) -> None:
    """A key's prefix is the user's to choose: one of 2,110 bytes sank the job's record and its batch."""
    job = _Job(utcnow())
    job.prefixes = {"result_of_" + "x" * 2100, "ä" * 1500, "inc"}
    job.total = job.completed = 3
    pipeline = Pipeline.open(settings, create=True)
    record = make_record("job", account="acme", status="finished", **MetadataPlugin._progress(job))
    pipeline.ingest(sealed_batch(pipeline, [record])[1], Principal.embedded_cluster("acme", None))
    (stored,) = _records(settings)
    assert [len(p.encode()) for p in stored["task_prefixes"]] == [3, 2048, 2048]
    assert stored["task_prefixes"][2] == "ä" * 1024
    pipeline.close()


def test_a_job_of_more_prefix_bytes_than_a_batch_holds_keeps_its_record(settings) -> None:
    """10,000 prefixes of 2,048 bytes sealed past the 8 MiB a batch may hold: the record was dropped."""
    job = _Job(utcnow())
    job.prefixes = {f"{i:05d}" + "p" * 2043 for i in range(MAX_ITEMS)}
    job.total = job.completed = MAX_ITEMS
    pipeline = Pipeline.open(settings, create=True)
    record = make_record("job", account="acme", status="finished", **MetadataPlugin._progress(job))
    pipeline.ingest(sealed_batch(pipeline, [record])[1], Principal.embedded_cluster("acme", None))
    (stored,) = _records(settings)
    assert len(stored["task_prefixes"]) == 511  # 1 MiB of them in Arrow (2,048 bytes and an offset), by name
    pipeline.close()


@pytest.mark.parametrize(
    ("packages", "kept"),
    [
        ({f"pkg{i:05d}": "1.0" for i in range(MAX_ITEMS + 177)} | {"a" * 3000: "1", "b": "v" * 3000}, MAX_ITEMS),
        ({f"{i:05d}" + "n" * 2043: "v" * 2048 for i in range(MAX_ITEMS)}, 1_022),  # 4 MiB of 2 × (2,048 + 4)
    ],
    ids=["more-entries", "more-bytes"],
)
def test_an_environment_beyond_ingests_bounds_is_recorded_within_them(
    settings, packages: dict[str, str], kept: int
) -> None:
    """10,177 distributions, a name of 3,000 bytes or 40 MB of names sank the environment's record and its
    batch for good."""
    pipeline = Pipeline.open(settings, create=True)
    record = make_record("software_env", account="acme", python_version="3.11.7", packages=_bounded(packages))
    pipeline.ingest(sealed_batch(pipeline, [record])[1], Principal.embedded_cluster("acme", None))
    (stored,) = _records(settings, data_type="software_env")
    assert len(stored["packages"]) == kept
    assert all(len(name.encode()) <= 2048 and len(v.encode()) <= 2048 for name, v in stored["packages"].items())
    pipeline.close()


def test_a_broken_install_leaves_the_rest_of_the_environment(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """An egg-info without a Version made the whole list fail: no scheduler environment at all."""
    (tmp_path / "noversion.egg-info").mkdir()
    (tmp_path / "noversion.egg-info" / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: noversion\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    environment.installed_environment.cache_clear()
    try:
        packages = environment.installed_environment()["packages"]
    finally:
        environment.installed_environment.cache_clear()
    assert packages["distributed"] == distributed.__version__ and "noversion" not in packages


@pytest.mark.parametrize(
    ("jobs", "prefixes", "length", "listed"),
    [
        (MAX_ITEMS + 51, 0, 0, MAX_ITEMS),
        (2_000, 40, 100, 978),  # 4 MiB in Arrow: 978 jobs of 128 bytes and 40 prefixes of 100 (+ 4 for the offset)
        (MAX_ITEMS, 120, 3, 4_332),  # 128 + 120 × (3 + 4) bytes each: the offsets outweigh the text
    ],
    ids=["more-entries", "more-bytes", "more-short-prefixes"],
)
def test_a_snapshot_of_more_running_jobs_than_ingest_takes_is_stored(
    cluster, settings, jobs: int, prefixes: int, length: int, listed: int
) -> None:
    """Each client.submit is a job: 10,051 queued ones made every snapshot 400, and 10,000 with 20 prefixes
    each sealed it past 8 MiB, so a healthy remote cluster went lost. The snapshot lists the oldest it holds."""

    def open_jobs(dask_scheduler: Any, count: int) -> None:
        plugin = dask_scheduler.plugins["metadata-pipeline"]
        plugin._jobs.clear()
        names = [f"{p:03d}" + "x" * (length - 3) for p in range(prefixes)]
        for _ in range(count):
            job = _Job(utcnow())
            job.prefixes = set(names)
            plugin._jobs[job.job_id] = job

    with Client(cluster) as client:
        client.run_on_scheduler(open_jobs, count=jobs)
        plugin: MetadataPlugin = cluster.scheduler.plugins["metadata-pipeline"]

        def snapshots_with_jobs() -> list[dict[str, Any]]:
            plugin.emitter.flush()
            return [r for r in _records(settings) if r["kind"] == "cluster_snapshot" and r["jobs_running"]]

        deadline = time.monotonic() + 30
        while not (taken := snapshots_with_jobs()):
            assert time.monotonic() < deadline, f"no snapshot with running jobs: {plugin.emitter.stats}"
            time.sleep(0.2)
        client.run_on_scheduler(open_jobs, count=0)
    assert len(taken[0]["jobs_running"]) == listed
    assert plugin.emitter.stats.records_dropped == 0


def test_snapshot_reports_the_cluster_as_the_scheduler_sees_it(cluster, settings) -> None:
    with Client(cluster) as client:
        held = client.map(lambda x: bytearray(100_000), range(20))
        wait(held)
        plugin: MetadataPlugin = cluster.scheduler.plugins["metadata-pipeline"]
        deadline = time.monotonic() + 30
        while True:  # wait for a snapshot taken while the workers report memory
            plugin.emitter.flush()
            live = [r for r in _records(settings) if r["kind"] == "cluster_snapshot" and r["n_workers"] == 2]
            if any(r["memory_process_bytes"] > 0 and r["tasks_by_state"].get("memory") == 20 for r in live):
                break
            assert time.monotonic() < deadline, "no snapshot with memory readings"
            time.sleep(0.2)
        del held
    snap = next(r for r in live if r["memory_process_bytes"] > 0 and r["tasks_by_state"].get("memory") == 20)
    assert snap["n_threads"] == 4
    assert snap["memory_limit_bytes"] == 2 * 2**30
    assert snap["memory_managed_bytes"] >= 20 * 100_000
    assert snap["memory_process_bytes"] >= snap["memory_managed_bytes"]
    assert snap["memory_unmanaged_bytes"] == snap["memory_process_bytes"] - snap["memory_managed_bytes"]
    assert snap["memory_spilled_bytes"] == 0
    assert snap["user"] == "ann" and snap["account"] == "acme"


def test_software_environment_matches_installed_versions(cluster, settings) -> None:
    with Client(cluster):
        pass
    cluster.close()
    (env,) = _records(settings, data_type="software_env")  # scheduler and workers share one environment
    assert env["packages"]["dask"] == dask.__version__
    assert env["packages"]["distributed"] == distributed.__version__
    assert env["packages"]["dask-metadata-pipeline"]
    assert len(env["packages"]) > 20


def test_both_stores_hold_the_same_cluster_jobs_records(cluster, settings) -> None:
    with Client(cluster) as client:
        wait(client.map(maybe_fail, range(50)))
    cluster.close()
    ids = {
        store: sorted(r["record_id"] for r in _records(settings, store, data_type="cluster_jobs"))
        for store in ("long_term", "cloud_logging")
    }
    assert ids["long_term"] and ids["long_term"] == ids["cloud_logging"]
    assert _records(settings, "cloud_logging", data_type="account") == []


def test_register_plugin_on_a_running_cluster(home, settings) -> None:
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(MetadataPlugin(account="acme", cluster_id="registered"))
        wait(client.map(maybe_fail, range(5)))
    records = _records(settings)
    assert {r["cluster_id"] for r in records} == {"registered"}
    assert {r["kind"] for r in records} >= {"job", "cluster_snapshot", "software_env"}


def slow(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def test_an_unregistered_plugin_records_its_running_job_and_stops_its_snapshots(home, settings) -> None:  # noqa: ANN001
    """distributed removes a plugin without closing it: its snapshots went on every interval, frozen, listing a
    job long finished, which got no record at all; registered again, two streams of one cluster disagreed."""
    with (
        dask.config.set({"pipeline.account": "acme", "pipeline.plugin.interval": "200ms"}),
        preloaded_cluster(n_workers=1, threads_per_worker=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        first = client.map(slow, range(3), seconds=0.5, key=[f"a-{i}" for i in range(3)])
        time.sleep(0.7)  # job a runs
        client.unregister_scheduler_plugin("metadata-pipeline")
        wait(first)
        client.register_plugin(MetadataPlugin(account="acme", interval=0.2))
        wait(client.map(slow, range(2), seconds=0.1, key=[f"b-{i}" for i in range(2)]))
        time.sleep(1)
    jobs = _records(settings, kind="job")
    assert sorted((j["status"], j["tasks_total"]) for j in jobs) == [("finished", 2), ("lost", 3)]
    [lost] = [j for j in jobs if j["status"] == "lost"]
    snapshots = sorted(_records(settings, kind="cluster_snapshot"), key=lambda r: r["observed_at"])
    closed = max(r["observed_at"] for r in snapshots if lost["job_id"] in {j["job_id"] for j in r["jobs_running"]})
    assert closed <= lost["observed_at"]  # listed running no longer once it is recorded lost
    assert [r["tasks_completed_total"] for r in snapshots if r["observed_at"] > lost["observed_at"]] == sorted(
        r["tasks_completed_total"] for r in snapshots if r["observed_at"] > lost["observed_at"]
    )  # one stream: the totals never go back


def test_a_plugin_registered_under_a_name_of_its_own_keeps_recording(home, settings) -> None:  # noqa: ANN001
    """``register_plugin(plugin, name=...)`` keeps it under that name: taken for unregistered, it stopped after
    its first snapshot and recorded no job."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(MetadataPlugin(account="acme", interval=0.2), name="meta")
        time.sleep(0.6)  # snapshots come and go
        wait(client.map(maybe_fail, range(5)))
        time.sleep(0.5)
    assert [j["status"] for j in _records(settings, kind="job")] == ["finished"]


class _BrokenScheduler:
    """Anything the plugin touches raises."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"broken: {name}")


def test_plugin_errors_are_counted_never_raised(home) -> None:
    plugin = MetadataPlugin(account="acme")
    asyncio.run(plugin.start(_BrokenScheduler()))  # type: ignore[arg-type]
    assert plugin.errors >= 1 and plugin.emitter is None  # what it had started is stopped again
    errors = plugin.errors
    plugin.update_graph(_BrokenScheduler(), stimulus_id="graph")  # type: ignore[arg-type]
    plugin.transition("x", "released", "waiting", stimulus_id="graph")
    plugin.transition("x", "processing", "memory", stimulus_id="done", startstops="not a list")
    assert plugin.errors == errors + 1


def test_job_peak_memory_is_what_its_results_held_at_once(cluster, settings) -> None:
    with Client(cluster) as client:
        blocks = client.map(lambda i: bytearray(100_000), range(20))
        total = client.submit(lambda bs: sum(map(len, bs)), blocks)
        assert total.result() == 2_000_000
        del blocks, total
    cluster.close()
    peaks = sorted(r["peak_memory_bytes"] for r in _records(settings) if r["kind"] == "job")
    assert peaks[0] < 1_000  # the sum: one small integer
    assert 2_000_000 <= peaks[1] < 2_200_000  # twenty 100 kB blocks in memory together


def _wait_for_environments(scheduler: distributed.Scheduler) -> MetadataPlugin:
    plugin: MetadataPlugin = scheduler.plugins["metadata-pipeline"]
    deadline = time.monotonic() + 60
    while plugin._background or not plugin._envs:
        assert time.monotonic() < deadline, "no environment records"
        time.sleep(0.05)
    return plugin


def test_worker_processes_report_their_environment_once_and_keep_no_connection(home, settings) -> None:
    with (
        dask.config.set({"pipeline.account": "acme"}),
        preloaded_cluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
        ) as cluster,
    ):
        plugin = _wait_for_environments(cluster.scheduler)
        assert plugin.errors == 0
        assert cluster.scheduler.rpc.open == 0  # no pooled scheduler→worker connection left behind
    (env,) = _records(settings, data_type="software_env")  # scheduler and both workers: one environment
    assert env["packages"]["distributed"] == distributed.__version__


def test_workers_in_the_schedulers_process_are_not_asked(cluster, settings) -> None:
    plugin = _wait_for_environments(cluster.scheduler)
    assert cluster.scheduler.rpc.open == 0
    assert plugin.errors == 0


def test_a_worker_collects_its_environment_off_its_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = []

    def collect() -> dict[str, Any]:
        threads.append(threading.current_thread())
        return {"python_version": "3", "packages": {}}

    monkeypatch.setattr(environment, "installed_environment", collect)

    async def on_loop() -> dict[str, Any]:
        return await environment.remote_environment()

    assert asyncio.run(on_loop()) == {"python_version": "3", "packages": {}}
    assert threads and threads[0] is not threading.main_thread()


def test_shipped_defaults_hold_after_a_config_reset(home, settings) -> None:
    """distributed's test utilities restore a config snapshot taken before pipeline was imported."""
    saved = copy.deepcopy(dask.config.config)
    try:
        dask.config.config.pop("pipeline")
        with (
            dask.config.set({"pipeline.home": str(home), "pipeline.account": "acme"}),
            preloaded_cluster(
                n_workers=1,
                processes=False,
            ) as cluster,
            Client(cluster) as client,
        ):
            assert client.submit(maybe_fail, 1).result() > 0
            plugin: MetadataPlugin = cluster.scheduler.plugins["metadata-pipeline"]
            snapshots = cluster.scheduler.periodic_callbacks["metadata-pipeline-snapshot"]
            shipped = (plugin.close_timeout, plugin.emitter.retry_max, plugin.emitter.linger, snapshots.callback_time)
            assert shipped == (10, 30, 1, 5000)
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
    assert [r["tasks_completed"] for r in _records(settings) if r["kind"] == "job"] == [1]


def _one_cluster_run(n_tasks: int) -> str:
    """A short-lived in-process cluster of account acme that runs n_tasks; its cluster id."""
    with preloaded_cluster(n_workers=1, processes=False) as cluster, Client(cluster) as client:
        wait(client.map(maybe_fail, range(n_tasks)))
        return cluster.scheduler.id


def _jobs_by_cluster(settings: Settings) -> dict[str, list[int]]:
    jobs: dict[str, list[int]] = {}
    for record in _records(settings):
        if record["kind"] == "job":
            jobs.setdefault(record["cluster_id"], []).append(record["tasks_completed"])
    return jobs


def test_clusters_one_after_another_in_one_process_each_land_once(home, settings) -> None:
    """The clusters of a process share its pipeline (opened once); each one's records arrive, once."""
    with dask.config.set({"pipeline.account": "acme"}):
        ids = [_one_cluster_run(n) for n in (3, 4, 5)]
    assert _jobs_by_cluster(settings) == {ids[0]: [3], ids[1]: [4], ids[2]: [5]}
    summaries = [e.details["records"] for e in Pipeline.open(settings).audit.entries() if e.action == "ingest.summary"]
    assert summaries  # written when each last cluster closed, not only when the process exits


def test_a_home_removed_between_clusters_is_made_anew_and_the_next_cluster_lands_there(home, settings) -> None:
    """A notebook deletes the pipeline's home between two clusters: the second must not write to the removed file."""
    with dask.config.set({"pipeline.account": "acme"}):
        first = _one_cluster_run(2)
        assert _jobs_by_cluster(settings) == {first: [2]}
        shutil.rmtree(home)
        second = _one_cluster_run(3)
    assert _jobs_by_cluster(settings) == {second: [3]}


@pytest.mark.parametrize(
    ("interval", "reason"),
    [
        ("soon", "pipeline.plugin.interval: 'soon' is not a duration"),
        ("0s", "pipeline.plugin.interval: '0s' must be a finite duration of more than 0"),
        ("1s", "Not a directory"),
    ],
)
def test_a_plugin_that_fails_to_start_leaves_the_scheduler(
    home, caplog: pytest.LogCaptureFixture, interval: str, reason: str
) -> None:
    """One WARNING line and nothing written (a home under a file for the last case), no traceback."""
    blocker = home.parent / "a-file"
    blocker.write_text("")
    with (
        caplog.at_level(logging.WARNING, logger="pipeline"),
        dask.config.set({"pipeline.account": "acme", "pipeline.plugin.interval": interval}),
        dask.config.set({"pipeline.home": str(blocker / "home")} if interval == "1s" else {}),
        preloaded_cluster(
            n_workers=2,
            processes=False,
        ) as cluster,
        Client(cluster) as client,
    ):
        assert "metadata-pipeline" not in cluster.scheduler.plugins
        cluster.scale(3)
        client.wait_for_workers(3)
        assert sum(client.gather(client.map(maybe_fail, range(20)))) > 0
    (failure,) = [r for r in caplog.records if r.name.startswith("pipeline")]
    assert failure.getMessage().startswith("metadata plugin not started: ") and reason in failure.getMessage()
    assert failure.exc_info is None and "\n" not in failure.getMessage()
    assert not home.exists()  # nothing written


def test_a_spooled_batch_of_a_name_ingest_refuses_is_set_aside_by_the_next_plugin_of_the_home(
    home, settings: Settings
) -> None:
    """An earlier release's plugin configured with a name holding a control character spooled batches
    that failed delivery for ever, and the records of every later scheduler of its home waited behind them."""
    from pipeline.spool import Spool

    pipeline = Pipeline.open(settings, create=True)
    bad = Spool(settings.spool_dir).append(*sealed_batch(pipeline, [make_record(account="acme\tbad")]))
    pipeline.close()
    with (
        dask.config.set({"pipeline.account": "acme"}),
        preloaded_cluster(n_workers=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        assert sum(client.gather(client.map(maybe_fail, range(5)))) > 0
    assert [p.name for p in Spool(settings.spool_dir).refused_files()] == [f"{bad.batch_id}.batch"]
    assert Spool(settings.spool_dir).pending_files() == []
    jobs = [r for r in Pipeline.open(settings).read_records("long_term") if r["kind"] == "job"]
    assert [(j["account"], j["tasks_total"]) for j in jobs] == [("acme", 5)]


@pytest.mark.parametrize(
    ("name", "value", "registered_as", "why"),
    [
        ("account", "bad\tname", None, "'bad\\tname' holds a control character (U+0009)"),
        ("user", "bad\tname", "metadata", "'bad\\tname' holds a control character (U+0009)"),
        ("cluster_id", "c" * 2049, None, "2049 bytes of UTF-8; at most 2048"),
    ],
)
def test_a_plugin_given_a_name_ingest_refuses_leaves_the_scheduler(
    home, caplog: pytest.LogCaptureFixture, name: str, value: str, registered_as: str | None, why: str
) -> None:
    """Given in code, the name was not checked: the plugin started, and every batch stayed in its spool (or,
    a name too long, was set aside as refused). Registered by a client (by any name), a plugin that failed
    to start stayed, its hooks running."""
    with (
        caplog.at_level(logging.WARNING, logger="pipeline"),
        LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(MetadataPlugin(**{"account": "acme", name: value}), name=registered_as)
        deadline = time.monotonic() + 10
        while _metadata_plugins(cluster) and time.monotonic() < deadline:
            time.sleep(0.01)  # taken out on the scheduler's loop, once distributed added it
        assert _metadata_plugins(cluster) == []
    (failure,) = [r for r in caplog.records if r.name.startswith("pipeline")]
    assert f"pipeline.{name.replace('_', '-')}: {why}" in failure.getMessage()


def _metadata_plugins(cluster: LocalCluster) -> list[str]:
    return [name for name, plugin in cluster.scheduler.plugins.items() if isinstance(plugin, MetadataPlugin)]


class _ClaimsAnySize:
    def __sizeof__(self) -> int:
        return 2**60


def _result_of_any_size(i: int) -> _ClaimsAnySize:
    return _ClaimsAnySize()


def _clock_steps_back(x: int) -> int:
    """Runs on a worker (of this process): its wall clock steps back 30 s as the task ends (an NTP step)."""
    import distributed.worker

    real = time.time
    distributed.worker.time = lambda: real() - 30
    return x


def test_a_result_claiming_any_size_or_a_clock_step_keeps_every_record_within_ingests_bounds(
    home, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result whose ``sizeof`` was 2**60 had ingest refuse its job's record, and the snapshots batched
    with it; a clock step back during a task made its compute time negative, and with it every later
    snapshot's cumulative total: the cluster's metadata ended there (in remote mode, the cluster was lost)."""
    import distributed.worker

    monkeypatch.setattr(distributed.worker, "time", distributed.worker.time)  # put back after the test
    with (
        dask.config.set({"pipeline.account": "acme", "pipeline.plugin.interval": "200ms"}),
        preloaded_cluster(n_workers=1, processes=False) as cluster,
        Client(cluster) as client,
    ):
        wait(client.submit(_result_of_any_size, 1))
        wait(client.submit(_clock_steps_back, 2))
        time.sleep(0.6)  # snapshots after both
        assert sum(client.gather(client.map(maybe_fail, range(3)))) > 0
    assert list(settings.spool_dir.glob("refused/*")) == []
    jobs = sorted(_records(settings, kind="job"), key=lambda j: j["started_at"])
    assert [(j["tasks_completed"], j["peak_memory_bytes"] == 2**53) for j in jobs] == [
        (1, True),
        (1, False),
        (3, False),
    ]
    assert all(j["compute_seconds"] >= 0 for j in jobs)
    snapshots = _records(settings, kind="cluster_snapshot")
    assert max(s["tasks_completed_total"] for s in snapshots) == 5  # heartbeats went on after both
