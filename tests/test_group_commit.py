"""Group-committed ingest: concurrent batches share one commit, and none is lost or doubled.

Through ``Pipeline.ingest`` from many threads, through two ``serve --no-retention``
processes on one PostgreSQL, and through a ``serve`` killed with SIGKILL mid-commit
whose clients re-send what was not acknowledged, as the plugin does.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import dask.config
import httpx
import pytest
from conftest import make_record
from controlplane import serve_process

from pipeline.config import Settings
from pipeline.errors import IntakeError, StoreUnavailable
from pipeline.group_commit import GroupCommit
from pipeline.intake import load_public_key, seal_batch
from pipeline.principals import Principal
from pipeline.runtime import IngestResult, Pipeline
from pipeline.server.auth import TokenStore

Batch = tuple[str, bytes, list[str]]  # batch id, sealed, record ids


def sealed_batch(public_key: str, account: str, cluster_id: str, records: int = 5) -> Batch:
    rows = [make_record(account=account, cluster_id=cluster_id) for _ in range(records)]
    batch_id = uuid.uuid4().hex
    return batch_id, seal_batch(load_public_key(public_key), batch_id, rows), [r["record_id"] for r in rows]


def record_counts(pipeline: Pipeline, store: str) -> Counter[str]:
    return Counter(r["record_id"] for r in pipeline.read_records(store))


def assert_exactly_once(pipeline: Pipeline, record_ids: list[str]) -> None:
    for store in ("long_term", "cloud_logging"):
        counts = record_counts(pipeline, store)
        assert set(counts) == set(record_ids), store
        assert set(counts.values()) == {1}, f"{store} holds a record twice"


def test_concurrent_callers_share_commits_and_each_hears_its_own_result() -> None:
    groups: list[list[int]] = []
    entered = threading.Event()

    def commit(items: Any) -> list[int]:
        groups.append(list(items))
        entered.set()
        time.sleep(0.02)  # a commit takes a while: others arrive meanwhile
        return [i * 10 for i in items]

    committer: GroupCommit[int, int] = GroupCommit(commit)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(committer.submit, range(64)))
    assert results == [i * 10 for i in range(64)]
    assert sorted(i for group in groups for i in group) == list(range(64))
    assert len(groups) < 64  # shared


def test_a_failed_group_commit_fails_every_member_and_the_next_group_starts_afresh() -> None:
    failing = threading.Event()
    failing.set()

    def commit(items: Any) -> list[str]:
        time.sleep(0.01)
        if failing.is_set():
            raise StoreUnavailable("database down")
        return [f"ok {i}" for i in items]

    committer: GroupCommit[int, str] = GroupCommit(commit)

    def attempt(i: int) -> str:
        try:
            return committer.submit(i)
        except StoreUnavailable as exc:
            return str(exc)

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(attempt, range(16))) == {"database down"}
    failing.clear()
    assert committer.submit(99) == "ok 99"


def test_an_error_given_as_one_items_result_is_that_items_alone() -> None:
    committer: GroupCommit[int, int] = GroupCommit(lambda items: [ValueError(i) if i == 2 else i for i in items])
    futures = [committer.enqueue(i) for i in range(4)]
    assert [f.exception() is None for f in futures] == [True, True, False, True]
    assert [f.result() for f in futures if f.exception() is None] == [0, 1, 3]
    with pytest.raises(ValueError, match="2"):
        futures[2].result()


def test_concurrent_ingests_write_every_record_once_and_a_refused_batch_harms_no_other(pipeline: Pipeline) -> None:
    principal = Principal("cluster", account="acme", cluster_id="cluster-test", embedded=True)
    batches = [sealed_batch(pipeline.intake_public_key, "acme", "cluster-test") for _ in range(24)]
    bad_id, bad, _ = sealed_batch(pipeline.intake_public_key, "acme", "cluster-test")
    sends = [(batch_id, data) for batch_id, data, _ in batches] * 3 + [(bad_id, bad[:-1])]  # each three times

    def send(item: tuple[str, bytes]) -> IngestResult | str:
        try:
            return pipeline.ingest(item[1], principal, idempotency_key=item[0])
        except IntakeError as exc:
            return type(exc).__name__

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, sends))
    assert results[-1] == "IntakeError"
    taken = Counter(batch_id for (batch_id, _), r in zip(sends, results, strict=False) if r == IngestResult(5, False))
    assert taken == {batch_id: 1 for batch_id, _, _ in batches}  # each accepted once, the replays duplicates
    assert_exactly_once(pipeline, [rid for _, _, ids in batches for rid in ids])


@pytest.fixture
def postgres_home(home: Path, postgres_url: str) -> Iterator[tuple[Path, str]]:
    with dask.config.set({"pipeline.long-term.url": postgres_url}):
        yield home, postgres_url


def clusters(tokens: TokenStore, count: int) -> list[tuple[str, str, str]]:
    """(account, cluster id, token) of ``count`` clusters of two accounts."""
    made = []
    for c in range(count):
        account, cluster_id = f"account-{c % 2}", f"cluster-{c}"
        made.append(
            (account, cluster_id, tokens.create("cluster", account, cluster_id=cluster_id, ttl=timedelta(days=1)).token)
        )
    return made


def post(url: str, token: str, batch: Batch) -> int:
    """The status of posting ``batch`` (0: no answer), after retrying while the fair share answers 429."""
    while True:
        try:
            answer = httpx.post(
                f"{url}/v1/ingest",
                content=batch[1],
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": batch[0]},
                timeout=60,
            )
        except httpx.TransportError:
            return 0
        if answer.status_code != 429:
            return answer.status_code
        time.sleep(0.05)  # sooner than Retry-After: these tests are not about the limits


@pytest.mark.slow
@pytest.mark.postgres
def test_two_serve_processes_on_one_postgres_take_every_record_exactly_once(postgres_home: tuple[Path, str]) -> None:
    home, postgres_url = postgres_home
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    cluster_list = clusters(TokenStore(pipeline), 4)
    sends = []
    for account, cluster_id, token in cluster_list:
        for _ in range(15):
            batch = sealed_batch(pipeline.intake_public_key, account, cluster_id)
            sends += [(token, batch, 0), (token, batch, 1)]  # the same batch to both processes at once
        sends += [(token, sealed_batch(pipeline.intake_public_key, account, cluster_id), n % 2) for n in range(15)]
    with (
        serve_process(home, "--no-retention", long_term__url=postgres_url) as first,
        serve_process(home, "--no-retention", long_term__url=postgres_url) as second,
    ):
        urls = [first.url, second.url]
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda s: post(urls[s[2]], s[0], s[1]), sends))
    assert set(statuses) == {202}
    assert_exactly_once(pipeline, sorted({rid for _, batch, _ in sends for rid in batch[2]}))
    pipeline.close()


@pytest.mark.slow
def test_serve_killed_mid_commit_loses_no_acknowledged_batch_and_doubles_none(home: Path) -> None:
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    cluster_list = clusters(TokenStore(pipeline), 8)
    pending = {
        cluster_id: [sealed_batch(pipeline.intake_public_key, account, cluster_id) for _ in range(40)]
        for account, cluster_id, _ in cluster_list
    }
    record_ids = {batch_id: ids for queue in pending.values() for batch_id, _, ids in queue}
    tokens = {cluster_id: token for _, cluster_id, token in cluster_list}
    acknowledged: list[str] = []

    def deliver(url: str, cluster_id: str) -> None:
        """One cluster's delivery loop: the oldest unacknowledged batch first, dropped once answered 202."""
        queue = pending[cluster_id]
        while queue:
            if post(url, tokens[cluster_id], queue[0]) != 202:
                return  # the control plane is gone: keep the batch for the next run
            acknowledged.append(queue.pop(0)[0])

    with serve_process(home, "--no-retention") as served:
        workers = [threading.Thread(target=deliver, args=(served.url, c)) for c in pending]
        for worker in workers:
            worker.start()
        while len(acknowledged) < 40:  # group commits are under way, one after another
            time.sleep(0.005)
        served.proc.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.join(60)
        served.stop()
    assert any(pending.values()), "the kill came after the last commit"
    survived = Pipeline.open(Settings.from_config())
    for store in ("long_term", "cloud_logging"):
        held = record_counts(survived, store)
        assert all(held[rid] == 1 for batch_id in acknowledged for rid in record_ids[batch_id]), store
    survived.close()
    with serve_process(home, "--no-retention") as served:  # restarted: clients re-send what was not answered
        for cluster_id in pending:
            deliver(served.url, cluster_id)
    assert not any(pending.values())
    assert_exactly_once(pipeline, [rid for ids in record_ids.values() for rid in ids])
    pipeline.close()


def test_a_caller_that_gives_up_before_its_group_commits_stops_nothing_for_the_others() -> None:
    """A request cancelled while its batch waits (the client gone, the server stopping) cancels its
    future: that item is left out, every other is committed and answered, and commits go on."""
    release = threading.Event()
    groups: list[list[int]] = []

    def commit(items: Any) -> list[int]:
        groups.append(list(items))
        release.wait(5)
        return list(items)

    committer: GroupCommit[int, int] = GroupCommit(commit)
    first = committer.enqueue(1)  # being committed: the others queue behind it
    while not groups:
        time.sleep(0.001)
    gone, kept = committer.enqueue(2), committer.enqueue(3)
    assert gone.cancel()
    release.set()
    assert (first.result(5), kept.result(5)) == (1, 3)
    assert groups == [[1], [3]]
    assert committer.submit(4) == 4
