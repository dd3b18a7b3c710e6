"""MetadataPlugin: a distributed SchedulerPlugin that reports cluster metadata.

The scheduler's event loop is the hot path. Hooks do O(1) work per call:
counters, and for each live task one dict entry naming its job, dropped when
the scheduler forgets the task. Snapshots (every ``pipeline.plugin.interval``)
read the scheduler's own aggregates (task prefixes, summed worker memory).

A task belongs to the computation that made it run: the ``update_graph`` whose
transitions (same stimulus id) moved it from ``released`` to ``waiting``, or a
``client.retry()``, which is a computation with a job record of its own. A
task counts once per computation: recomputing a lost result adds compute
seconds, never completed tasks, so the cluster totals always equal the sums
over the jobs.
Records go to the :class:`~pipeline.emitter.Emitter`, which seals, spools and
delivers them on its own thread. An exception inside the plugin is counted and
logged at WARNING; it never reaches the scheduler (``start`` never raises).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import uuid
import weakref
from collections.abc import Callable, Iterable
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

import dask.config
from distributed.core import rpc
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.protocol.serialize import Serialize, Serialized, deserialize
from distributed.utils import offload
from tornado.ioloop import PeriodicCallback

from pipeline.clock import utcnow
from pipeline.config import Settings, spool_folder
from pipeline.delivery import EmbeddedDelivery, remote_delivery
from pipeline.emitter import Emitter
from pipeline.environment import environment_id, installed_environment, remote_environment
from pipeline.errors import PipelineError
from pipeline.limits import MAX_ITEMS, MAX_NUMBER, MAX_STRING_BYTES
from pipeline.principals import Principal
from pipeline.redact import first_line, mask_url
from pipeline.spool import Spool

if TYPE_CHECKING:
    from datetime import datetime

    from distributed import Scheduler

__all__ = ["MetadataPlugin"]

logger = logging.getLogger(__name__)
#: bytes (in Arrow) of the task prefixes in one job's record, and of a snapshot's running jobs together: a
#: sealed batch is at most 8 MiB, whatever names the user's code gives its keys (or its environment's packages)
JOB_PREFIX_BYTES = 1 << 20
SNAPSHOT_RUNNING_BYTES = 4 << 20
#: UTF-8 bytes of an environment's package names and versions
ENVIRONMENT_BYTES = 4 << 20
_OFFSET_BYTES = 4  # an Arrow string's offset
_RUNNING_JOB_BYTES = 128  # a running job's entry besides its prefixes: id, times, counts, offsets

_Item = TypeVar("_Item")

_UNASSIGNED = "unassigned"
_LOGGED_ERRORS = 10


class _Job:
    """Running totals of one computation (one ``update_graph`` call or one ``client.retry()``)."""

    __slots__ = (
        "compute",
        "completed",
        "erred",
        "job_id",
        "nbytes",
        "peak",
        "prefixes",
        "remaining",
        "retry",
        "started_at",
        "total",
    )

    def __init__(self, started_at: datetime) -> None:
        self.job_id = uuid.uuid4().hex
        self.started_at = started_at
        self.total = self.remaining = self.completed = self.erred = 0
        self.compute = 0.0
        self.nbytes = self.peak = 0
        self.prefixes: set[str] = set()
        self.retry = False  # a client.retry(): it takes the erred tasks it runs again


def _compute_seconds(startstops: Any) -> float:
    """A task's compute time from its worker's wall-clock intervals: one the clock stepped back in counts as
    none (negative, it would make every later snapshot's cumulative total one ingest refuses)."""
    total = 0.0
    if startstops:
        for interval in startstops:
            if interval["action"] == "compute" and (seconds := interval["stop"] - interval["start"]) > 0:
                total += seconds
    return total


def _measure(value: int) -> int:
    """A size within what ingest takes (0 to 2**53): ``sizeof`` of a result may claim any number, and one
    past the bound would have ingest refuse the record with every record batched with it."""
    return min(max(value, 0), MAX_NUMBER)


class MetadataPlugin(SchedulerPlugin):
    """Report cluster size, tasks, compute time, memory and software environment.

    Unset arguments come from dask config (``pipeline.account``, ``pipeline.user``,
    ``pipeline.cluster-id``, ``pipeline.image``, ``pipeline.plugin.interval``) as
    seen by the scheduler, which is where the plugin runs.
    """

    name = "metadata-pipeline"
    idempotent = True

    def __init__(
        self,
        account: str | None = None,
        *,
        user: str | None = None,
        cluster_id: str | None = None,
        image: str | None = None,
        interval: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._args = {"account": account, "user": user, "cluster_id": cluster_id, "image": image, "interval": interval}
        self.errors = 0
        self.emitter: Emitter | None = None
        self.scheduler: Scheduler | None = None
        self.completed_total = self.erred_total = 0
        self.compute_total = 0.0
        self._pending: dict[Any, _Job] = {}  # key -> job, from waiting until the task finishes
        self._done: dict[Any, _Job] = {}  # key -> job, from memory until forgotten or run again
        self._errored: dict[Any, _Job] = {}  # key -> job, from erred until forgotten or retried
        self._held: dict[Any, int] = {}  # key -> bytes its result holds in memory
        self._jobs: dict[str, _Job] = {}  # unfinished jobs that have tasks
        self._open: _Job | None = None  # the job still taking tasks from its stimulus' transitions
        self._open_stimulus: str | None = None
        self._envs: set[str] = set()
        self._background: set[asyncio.Future[Any]] = set()
        #: its snapshot callback, weakly: the callback holds the event loop, and through it the whole process
        self._callback: weakref.ref[PeriodicCallback] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # register_plugin pickles the plugin before start(): ship the arguments only
        return {"_args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["_args"])  # type: ignore[misc]

    # -- lifecycle ---------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        _log_like_distributed()  # preloaded or registered by a client: the scheduler's log shows its lines
        try:
            self._start(scheduler)
        except Exception as exc:  # start must never raise: it would abort scheduler start-up
            self.errors += 1
            expected = isinstance(exc, PipelineError | OSError | ValueError)  # a setting or the home: one line
            logger.warning("metadata plugin not started: %s", first_line(exc), exc_info=None if expected else exc)
            await self._leave(scheduler)

    def _start(self, scheduler: Scheduler) -> None:
        args = dict(self._args)
        # a local only: in remote mode Settings names store URLs the plugin must not keep
        settings = Settings.from_config(plugin_interval=args.pop("interval"), **args)
        callback = PeriodicCallback(self._snapshot_safely, settings.plugin_interval * 1000)  # checks the interval
        self.account = settings.account or _UNASSIGNED
        if settings.account is None:
            logger.warning("pipeline.account is not set; metadata is recorded as account %r", _UNASSIGNED)
        self.user = settings.user
        self.cluster_id = settings.cluster_id or scheduler.id
        self.image = settings.image
        self.close_timeout = settings.close_timeout
        settings.ensure_home()
        remote = remote_delivery(settings)
        delivery = remote or EmbeddedDelivery.shared(
            settings, Principal.embedded_cluster(self.account, settings.cluster_id)
        )
        spool = Spool(settings.spool_dir, key_folder=None if remote else spool_folder(settings.home, None))
        self.emitter = Emitter(delivery, spool, retry_max=settings.retry_max, linger=settings.linger)
        self.emitter.start()
        self.scheduler = scheduler  # from here on the plugin is running
        mode = (
            f"remote mode, delivering to {mask_url(settings.ingest_url or '')}"
            if remote
            else f"embedded mode (single-tenant: code on this scheduler can read every key in {settings.home})"
        )
        logger.info("metadata plugin active: %s; account %r, cluster %s", mode, self.account, self.cluster_id)
        scheduler.periodic_callbacks[f"{self.name}-snapshot"] = callback
        self._callback = weakref.ref(callback)
        callback.start()
        self._spawn(self._scheduler_environment())
        for address in list(scheduler.workers):  # hooks are not replayed for workers already there
            self.add_worker(scheduler, address)

    async def _leave(self, scheduler: Scheduler) -> None:
        """After a failed start: out of the scheduler, so that the plugin costs nothing and stays quiet.

        A preloaded plugin is in the scheduler's plugins when it starts; one a client registers is added
        once its start returns, so it is taken out right after (scheduled last, with nothing awaited since).
        """
        self.scheduler = None
        try:
            emitter, self.emitter = self.emitter, None
            if emitter is not None:
                await asyncio.get_running_loop().run_in_executor(None, emitter.close, 0)
            self._out_of(scheduler)
            asyncio.get_running_loop().call_soon(self._out_of, scheduler)
        except Exception as exc:
            self._failed("start", exc)

    def _out_of(self, scheduler: Scheduler) -> None:
        for name, plugin in list(scheduler.plugins.items()):  # by itself: a client may register it by any name
            if plugin is self:
                scheduler.remove_plugin(name)

    async def close(self) -> None:
        await self._shut(retire=True)  # the cluster is done: drop its token

    async def _shut(self, *, retire: bool) -> None:
        """Stop the snapshots, send a last one with the running jobs recorded lost, and close the emitter."""
        try:
            for task in list(self._background):
                if task is not asyncio.current_task():
                    task.cancel()
            if self.emitter is None or self.scheduler is None:
                return
            if (callback := self._snapshots()) is not None:
                callback.stop()
                if self.scheduler.periodic_callbacks.get(f"{self.name}-snapshot") is callback:
                    del self.scheduler.periodic_callbacks[f"{self.name}-snapshot"]
            self._close_open()
            records = [self._snapshot_record()]
            records += [self._job_record(job, status="lost") for job in self._jobs.values()]  # the cluster ends first
            self._jobs.clear()
            self.emitter.submit(records)
            emitter, timeout, self.emitter = self.emitter, self.close_timeout, None
            close = functools.partial(emitter.close, timeout, retire=retire)
            await asyncio.get_running_loop().run_in_executor(None, close)
        except Exception as exc:
            self._failed("close", exc)

    def status(self) -> dict[str, Any]:
        """Errors caught so far and the emitter's delivery counters."""
        return {"errors": self.errors, "emitter": None if self.emitter is None else vars(self.emitter.stats)}

    # -- hooks (event loop, O(1)) -----------------------------------------
    def update_graph(self, scheduler: Scheduler, *, stimulus_id: str | None = None, **kwargs: Any) -> None:
        """Open a job: the scheduler's transitions for this stimulus, right after, assign it its tasks."""
        try:
            self._open_job(stimulus_id)
        except Exception as exc:
            self._failed("update_graph", exc)

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str | None = None, **kwargs: Any
    ) -> None:
        try:
            if self._open is not None and stimulus_id != self._open_stimulus:
                self._close_open()  # the transitions of the open job's stimulus are over
            if start == "released":
                if finish == "waiting":
                    self._claim(key, stimulus_id)
                elif finish == "erred":
                    self._claim(key, stimulus_id)
                    self._erred(key, kwargs)
                elif finish == "forgotten":
                    self._forgotten(key)
            elif finish == "memory":
                self._computed(key, kwargs)
            elif finish == "erred":
                self._erred(key, kwargs)
            elif finish == "forgotten":
                self._forgotten(key)
            elif start == "memory":
                self._released(key)
        except Exception as exc:
            self._failed("transition", exc)

    def _open_job(self, stimulus_id: str | None) -> _Job:
        self._close_open()
        job = self._open = _Job(utcnow())
        self._open_stimulus = stimulus_id
        return job

    def _close_open(self) -> None:
        job, self._open, self._open_stimulus = self._open, None, None
        if job is not None and job.total:
            self._jobs[job.job_id] = job
            if not job.remaining:
                self._finish(job)

    def _claim(self, key: Any, stimulus_id: str | None) -> None:
        """A released task is going to run: decide which computation it counts for."""
        job = self._open
        if job is None or stimulus_id != self._open_stimulus:
            if key in self._pending or key in self._done:
                return  # run again for its own computation (lost worker, lost dependency)
            if self._errored.pop(key, None) is None:
                return  # submitted before the plugin started: no job to count it in
            job = self._open_job(stimulus_id)  # client.retry(): a computation of its own
            job.retry = True
        else:
            previous = self._pending.get(key)
            if previous is job:
                return
            if previous is not None:  # released by its own computation before it finished
                self._dropped(previous)
            elif job.retry and key in self._done:
                return  # a result in memory that the retry runs again: like a recomputation, its computation's
            elif self._done.pop(key, None) is None and self._errored:
                self._errored.pop(key, None)
        self._pending[key] = job
        job.total += 1
        job.remaining += 1
        ts = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        if ts is not None:
            job.prefixes.add(ts.prefix.name)

    # Per task the plugin keeps only references in dicts (job, nbytes): allocating a
    # tuple per task would feed the garbage collector, whose collections of the
    # scheduler's large heap would then run inside these hooks.
    def _computed(self, key: Any, kwargs: dict[str, Any]) -> None:
        compute = _compute_seconds(kwargs.get("startstops"))
        job = self._pending.pop(key, None)
        first_time = job is not None
        if job is None:
            job = self._done.get(key)
            if job is None:
                return
            # recomputed after a lost worker: its compute counts, the task does not
        else:
            job.completed += 1
            job.remaining -= 1
            self.completed_total += 1
            self._done[key] = job
        job.compute += compute
        self.compute_total += compute
        nbytes = kwargs.get("nbytes")
        if nbytes:
            if not 0 < nbytes <= MAX_NUMBER:  # rare: checked before any call, on the hot path
                nbytes = _measure(nbytes)
            self._held[key] = nbytes
            held = job.nbytes = job.nbytes + nbytes
            if held > job.peak:
                job.peak = held if held <= MAX_NUMBER else MAX_NUMBER
        if first_time and not job.remaining and job is not self._open:
            self._finish(job)

    def _erred(self, key: Any, kwargs: dict[str, Any]) -> None:
        job = self._pending.pop(key, None)
        if job is None:
            return
        compute = _compute_seconds(kwargs.get("startstops"))
        self._errored[key] = job
        job.erred += 1
        job.compute += compute
        job.remaining -= 1
        self.erred_total += 1
        self.compute_total += compute
        if not job.remaining and job is not self._open:
            self._finish(job)

    def _released(self, key: Any) -> None:
        nbytes = self._held.pop(key, None)
        if nbytes:
            job = self._done.get(key)
            if job is not None:
                job.nbytes -= nbytes

    def _forgotten(self, key: Any) -> None:
        nbytes = self._held.pop(key, None)
        job = self._done.pop(key, None)
        if job is not None:
            if nbytes:
                job.nbytes -= nbytes
            return
        if self._errored.pop(key, None) is not None:
            return
        job = self._pending.pop(key, None)
        if job is not None:  # cancelled before it finished
            self._dropped(job)

    def _dropped(self, job: _Job) -> None:
        job.remaining -= 1
        if not job.remaining and job is not self._open:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        self._jobs.pop(job.job_id, None)
        if self.emitter is not None:
            self.emitter.submit([self._job_record(job, status="finished")])

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        try:
            if self.scheduler is None:
                return  # not running
            ws = scheduler.workers.get(worker)
            if ws is not None and ws.pid == os.getpid():
                return  # a worker in the scheduler's process shares the scheduler's environment
            self._spawn(self._worker_environment(worker))
        except Exception as exc:
            self._failed("add_worker", exc)

    # -- periodic and background work --------------------------------------
    def _snapshots(self) -> PeriodicCallback | None:
        return None if self._callback is None else self._callback()

    def _snapshot_safely(self) -> None:
        try:
            if self.scheduler is not None and not any(p is self for p in self.scheduler.plugins.values()):
                # unregistered, or replaced by another plugin of its name: distributed does not close a plugin it
                # removes, and no transition reaches it now; the cluster goes on, and so does its token
                if (callback := self._snapshots()) is not None:
                    callback.stop()
                self._spawn(self._shut(retire=False))
                return
            if self.emitter is not None:
                self._close_open()
                self.emitter.submit([self._snapshot_record()])
        except Exception as exc:
            self._failed("snapshot", exc)

    def _common(self, kind: str, data_type: str) -> dict[str, Any]:
        return {
            "record_id": uuid.uuid4().hex,
            "data_type": data_type,
            "kind": kind,
            "account": self.account,
            "user": self.user,
            "cluster_id": self.cluster_id,
            "observed_at": utcnow(),
        }

    def _snapshot_record(self) -> dict[str, Any]:
        scheduler = self.scheduler
        assert scheduler is not None
        states: dict[str, int] = {}
        for prefix in scheduler.task_prefixes.values():
            for state, count in prefix.states.items():
                if count and state != "forgotten":  # a task group's count of tasks the scheduler let go
                    states[state] = states.get(state, 0) + count
        memory = scheduler.memory
        return {
            **self._common("cluster_snapshot", "cluster_jobs"),
            "n_workers": len(scheduler.workers),
            "n_threads": scheduler.total_nthreads,
            "memory_limit_bytes": _measure(sum(ws.memory_limit or 0 for ws in scheduler.workers.values())),
            "memory_process_bytes": _measure(memory.process),
            "memory_managed_bytes": _measure(memory.managed),
            "memory_unmanaged_bytes": _measure(memory.unmanaged),
            "memory_spilled_bytes": _measure(memory.spilled),
            "tasks_by_state": states,
            "tasks_completed_total": self.completed_total,
            "tasks_erred_total": self.erred_total,
            "compute_seconds_total": self.compute_total,
            "jobs_running": self._running(),  # the heartbeat's payload
        }

    def _job_record(self, job: _Job, *, status: str) -> dict[str, Any]:
        return {
            **self._common("job", "cluster_jobs"),
            "status": status,
            # never before its start, which ingest refuses: the wall clock may have stepped back since
            "finished_at": max(utcnow(), job.started_at) if status == "finished" else None,
            **self._progress(job),
        }

    def _running(self) -> list[dict[str, Any]]:
        """The oldest running jobs' progress, as many as a snapshot holds within ingest's bounds: one more
        entry, or 8 MiB sealed, would lose the snapshot, the heartbeat that keeps a cluster from being lost."""
        return _first(
            map(self._progress, self._jobs.values()),
            SNAPSHOT_RUNNING_BYTES,
            lambda progress: _RUNNING_JOB_BYTES + _arrow_bytes(progress["task_prefixes"]),
        )

    @staticmethod
    def _progress(job: _Job) -> dict[str, Any]:
        """A job's counts so far: in its record, and for a running job in each snapshot, so that the
        control plane can record it ``lost`` with them if the cluster dies first."""
        return {
            "job_id": job.job_id,
            "started_at": job.started_at,
            "tasks_total": job.total,
            "tasks_completed": job.completed,
            "tasks_erred": job.erred,
            "compute_seconds": job.compute,
            "peak_memory_bytes": job.peak,
            "task_prefixes": _prefixes(job.prefixes),
        }

    def _environment_record(self, python_version: str, packages: dict[str, str]) -> None:
        python_version, packages = _clipped(python_version), _bounded(packages)
        env_id = environment_id(self.image, python_version, packages)
        if env_id in self._envs or self.emitter is None:
            return
        self._envs.add(env_id)
        self.emitter.submit(
            [
                {
                    **self._common("software_env", "software_env"),
                    "env_id": env_id,
                    "image": self.image,
                    "python_version": python_version,
                    "packages": packages,
                }
            ]
        )

    async def _scheduler_environment(self) -> None:
        env = await offload(installed_environment)
        self._environment_record(env["python_version"], env["packages"])

    async def _worker_environment(self, worker: str) -> None:
        """Ask a worker process for its environment over a connection of its own, closed after.

        The worker computes it off its event loop (:func:`remote_environment`).
        A pooled connection would stay open to every worker.
        """
        scheduler = self.scheduler
        assert scheduler is not None
        async with rpc(worker, connection_args=scheduler.connection_args) as comm:
            reply = await comm.run(function=dumps(remote_environment), wait=True)
        if isinstance(reply, dict) and reply.get("status") == "OK":
            env = reply["result"]
            if isinstance(env, Serialize):  # in-process comms hand the object over as it is
                env = env.data
            elif isinstance(env, Serialized):
                env = deserialize(env.header, env.frames)
        else:  # the worker cannot import the pipeline: fall back to distributed's short list
            ws = scheduler.workers.get(worker)
            versions = (ws.versions if ws is not None else None) or {}
            host = versions.get("host", {})
            env = {  # distributed's "3.11.7.final.0" as platform.python_version() gives it
                "python_version": ".".join(str(host.get("python", "unknown")).split()[0].split(".")[:3]),
                "packages": {k: str(v) for k, v in versions.get("packages", {}).items() if v is not None},
            }
        self._environment_record(env["python_version"], env["packages"])

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed("environment", task.exception())  # type: ignore[arg-type]

    def _failed(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        if self.errors <= _LOGGED_ERRORS or self.errors % 1000 == 0:
            logger.warning("MetadataPlugin error #%d in %s: %r", self.errors, where, exc, exc_info=exc)


def _prefixes(prefixes: set[str]) -> list[str]:
    """A job's task prefixes by name within ingest's bounds: more, or longer, and the job's record would be
    refused with every record batched with it."""
    return _first(map(_clipped, sorted(prefixes)), JOB_PREFIX_BYTES, lambda prefix: _arrow_bytes((prefix,)))


def _bounded(packages: dict[str, str]) -> dict[str, str]:
    """An environment's packages by name within ingest's bounds, names and versions clipped (a name once)."""
    clipped: dict[str, str] = {}
    for name, version in sorted(packages.items()):
        clipped.setdefault(_clipped(name), _clipped(version))
    return dict(_first(clipped.items(), ENVIRONMENT_BYTES, _arrow_bytes))


def _first(items: Iterable[_Item], max_bytes: int, size: Callable[[_Item], int]) -> list[_Item]:
    """The first ``items``, as many as a list takes and as fit ``max_bytes`` by their ``size``."""
    kept: list[_Item] = []
    total = 0
    for item in islice(items, MAX_ITEMS):
        total += size(item)
        if total > max_bytes:
            break
        kept.append(item)
    return kept


def _arrow_bytes(texts: Iterable[str]) -> int:
    """What ``texts`` take in an Arrow string column: their UTF-8 and an offset each."""
    return sum(len(text.encode()) + _OFFSET_BYTES for text in texts)


def _clipped(text: str) -> str:
    """``text`` cut to the UTF-8 bytes ingest takes in one string, at a character's end."""
    data = text.encode()
    return text if len(data) <= MAX_STRING_BYTES else data[:MAX_STRING_BYTES].decode(errors="ignore")


def _log_like_distributed() -> None:
    """Give the plugin's log lines distributed's format (time, logger, level) and INFO level.

    distributed configures only its own loggers: without this, ``dask scheduler`` prints the
    plugin's warnings through Python's last-resort handler, bare, and its INFO lines not at all.
    A process whose logging is already set up (a notebook, pytest, an application) keeps its own.
    """
    pipeline_logger = logging.getLogger("pipeline")
    if pipeline_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
    pipeline_logger.addHandler(handler)
    pipeline_logger.setLevel(logging.INFO)
