"""Remote plugin mode: HTTP delivery, and what code on the cluster can (not) reach."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import dask.config
import httpx
import pytest
from click.testing import CliRunner
from conftest import make_record, sealed_batch
from controlplane import cluster_settings
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from distributed import Client, LocalCluster, wait
from sqlalchemy import Engine, update
from tcpproxy import TCPProxy

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.db import clusters
from pipeline.delivery import HTTPDelivery, remote_delivery
from pipeline.errors import (
    AuthenticationError,
    BatchRefused,
    ConfigError,
    IntakeError,
    StoreUnavailable,
    TokenRefused,
)
from pipeline.intake import MEDIA_TYPE, open_batch
from pipeline.keys import KeyProvider, Keyring
from pipeline.records import utcnow
from pipeline.runtime import Pipeline
from pipeline.server.auth import TokenStore
from pipeline.server.clusters import ClusterRegistry, Registration
from pipeline.server.runner import serving_in_thread
from pipeline.spool import SpooledBatch

TOKEN = "mp_" + "a" * 43


@dataclass
class ControlPlane:
    """The real control plane on loopback, behind a proxy that can cut the link, and one registered cluster."""

    pipeline: Pipeline
    url: str
    proxy: TCPProxy
    cluster: Registration
    opened: list[HTTPDelivery] = field(default_factory=list)

    def delivery(self, token: str | None = None, **kwargs: Any) -> HTTPDelivery:
        key = self.pipeline.intake_key.public_key()
        delivery = HTTPDelivery(
            self.url, token or self.cluster.token, key, cluster_id=self.cluster.cluster_id, **kwargs
        )
        self.opened.append(delivery)
        return delivery

    def batch(self, kind: str = "cluster_snapshot", **fields: Any) -> SpooledBatch:
        """A sealed batch of one record of this cluster."""
        record = make_record(kind, cluster_id=self.cluster.cluster_id, **fields)
        return SpooledBatch(*sealed_batch(self.pipeline, [record]))

    def clusters(self) -> list[dict[str, Any]]:
        member = TokenStore(self.pipeline).create("member", "acme", "alice").token
        response = httpx.get(f"{self.url}/v1/clusters", headers={"Authorization": f"Bearer {member}"})
        assert response.status_code == 200, response.text
        return list(response.json())


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """A pipeline in its own home (the control plane's) served over HTTP, with a cluster of acme registered."""
    settings = Settings.from_config(home=str(tmp_path / "control-plane"))
    pipeline = Pipeline.open(settings, create=True)
    with serving_in_thread(pipeline) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy = TCPProxy("127.0.0.1", port)
        proxied = f"http://127.0.0.1:{proxy.port}"
        plane = ControlPlane(pipeline, proxied, proxy, ClusterRegistry(pipeline).register("acme", proxied))
        try:
            yield plane
        finally:
            for delivery in plane.opened:
                delivery.close()
            proxy.close()
    pipeline.close()


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, keeping each request's headers."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[httpx.Headers] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        return super().handle_request(request)


def test_a_delivered_batch_carries_token_idempotency_key_and_media_type(control_plane: ControlPlane) -> None:
    transport = RecordingTransport()
    delivery = control_plane.delivery(transport=transport)
    batch = control_plane.batch()
    delivery.deliver(batch)
    delivery.deliver(batch)  # a retry after a lost answer: accepted once
    headers = transport.headers[-1]
    assert headers["Authorization"] == f"Bearer {control_plane.cluster.token}"
    assert headers["Idempotency-Key"] == batch.batch_id and headers["Content-Type"] == MEDIA_TYPE
    stored = control_plane.pipeline.read_records("long_term")
    assert [r["cluster_id"] for r in stored] == [control_plane.cluster.cluster_id]


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (503, StoreUnavailable, "answered 503: control plane busy"),
        (429, StoreUnavailable, "answered 429: control plane busy"),
        (400, BatchRefused, "^ingest endpoint .* answered 400: control plane busy$"),
        (401, TokenRefused, "refused this cluster's token: ingest endpoint .* answered 401"),
        (413, BatchRefused, "answered 413"),
    ],
)
def test_answers_map_to_retry_or_refused_for_good(status: int, error: type, message: str) -> None:
    problem = {"title": "x", "detail": "control plane busy\nsecond line"}
    transport = httpx.MockTransport(lambda _request: httpx.Response(status, json=problem))
    delivery = HTTPDelivery(
        "http://control-plane.invalid", TOKEN, X25519PrivateKey.generate().public_key(), transport=transport
    )
    with pytest.raises(error, match=message) as caught:
        delivery.deliver(SpooledBatch("b-1", b"sealed"))
    assert "second line" not in str(caught.value)


def test_a_long_answer_is_cut_at_a_word_and_the_batch_named_once() -> None:
    """The answer was cut at 200 characters, mid-word ("observed aft"), and the refusal named the batch
    three times in the plugin's warning ("spooled batch X refused: batch X refused: ... batch X refused")."""
    detail = "batch b-1 refused: " + " ".join(["words"] * 150)
    transport = httpx.MockTransport(lambda _request: httpx.Response(403, json={"title": "x", "detail": detail}))
    delivery = HTTPDelivery(
        "http://control-plane.invalid", TOKEN, X25519PrivateKey.generate().public_key(), transport=transport
    )
    with pytest.raises(BatchRefused) as caught:
        delivery.deliver(SpooledBatch("b-1", b"sealed"))
    assert "b-1" not in str(caught.value) and str(caught.value).endswith("words…")


def test_an_unreachable_endpoint_means_retry(control_plane: ControlPlane) -> None:
    control_plane.proxy.cut()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        control_plane.delivery(timeout=5).deliver(control_plane.batch())


def test_the_control_plane_answers_the_delivery_contract(control_plane: ControlPlane) -> None:
    delivery = control_plane.delivery()
    with pytest.raises(BatchRefused, match="answered 403: 1 of 1 records name another account"):
        delivery.deliver(control_plane.batch(account="globex"))
    with pytest.raises(BatchRefused, match="answered 400: not a sealed metadata batch"):
        delivery.deliver(SpooledBatch("b-1", b"hello"))
    with pytest.raises(TokenRefused, match="answered 401"):
        control_plane.delivery(TOKEN).deliver(SpooledBatch("b", b"x"))


def test_a_lost_clusters_next_batch_stops_its_plugin_as_a_refused_token_would(control_plane: ControlPlane) -> None:
    """Every batch it makes from then on is observed after the loss: one refusal ends delivery (the batch
    stays in the spool), not one refused batch and one warning every few seconds."""
    control_plane.delivery().deliver(control_plane.batch(observed_at=utcnow() - timedelta(minutes=1)))
    with control_plane.pipeline.keyring.engine.begin() as conn:
        conn.execute(update(clusters).values(lost_at=utcnow() - timedelta(seconds=30)))
    with pytest.raises(TokenRefused, match="ended this cluster: .* was lost at "):
        control_plane.delivery().deliver(control_plane.batch())
    control_plane.delivery().deliver(control_plane.batch(observed_at=utcnow() - timedelta(minutes=2)))  # before: taken


@pytest.mark.parametrize("ended_by", ["its loss", "a restarted scheduler"])
def test_a_job_recorded_lost_is_stored_once_when_its_end_arrives_from_a_replayed_spool(
    control_plane: ControlPlane, ended_by: str
) -> None:
    """The job finished before its cluster was lost (or its scheduler was killed and started again), but
    its end waited in the dead scheduler's spool; the control plane recorded the job lost meanwhile.
    ``spool replay`` then delivered the end, and the job was stored twice: finished and lost."""
    start = utcnow() - timedelta(minutes=5)
    running = {"job_id": "job-1", "started_at": start, "tasks_total": 10, "tasks_completed": 4, "task_prefixes": []}
    delivery = control_plane.delivery()
    delivery.deliver(control_plane.batch(observed_at=start, jobs_running=[running]))
    if ended_by == "its loss":
        ClusterRegistry(control_plane.pipeline).sweep(now=utcnow() + timedelta(minutes=15))
    else:  # the new scheduler's first snapshot knows nothing of job-1
        delivery.deliver(control_plane.batch(observed_at=start + timedelta(minutes=2), jobs_running=[]))
    end = {"job_id": "job-1", "status": "finished", "tasks_total": 10, "tasks_completed": 10}
    replayed = control_plane.batch("job", observed_at=start + timedelta(minutes=1), **end)
    delivery.deliver(replayed)
    stored = [
        (r["job_id"], r["status"], r["tasks_completed"])
        for store in control_plane.pipeline.stores
        for r in control_plane.pipeline.read_records(store, account="acme")
        if r["kind"] == "job"
    ]
    assert stored == [("job-1", "lost", 4)] * len(control_plane.pipeline.stores)
    [dropped] = [e for e in control_plane.pipeline.audit.entries() if e.action == "ingest.dropped"]
    assert (dropped.details["batch_id"], dropped.details["records"]) == (replayed.batch_id, 1)


# -- closing a cluster gives up its token -------------------------------------------------------------
def test_retire_revokes_the_cluster_token_and_marks_the_cluster_closed(control_plane: ControlPlane) -> None:
    delivery = control_plane.delivery()
    delivery.deliver(control_plane.batch())
    assert [c["closed_at"] for c in control_plane.clusters()] == [None]
    delivery.retire()
    with pytest.raises(StoreUnavailable, match="answered 401: token revoked"):
        delivery.retire()  # the token that closed the cluster closes nothing more either
    (listed,) = control_plane.clusters()
    assert listed["cluster_id"] == control_plane.cluster.cluster_id and listed["closed_at"] is not None
    with pytest.raises(TokenRefused, match="answered 401: token revoked"):
        delivery.deliver(control_plane.batch())  # a closed cluster's token writes nothing more


@pytest.mark.parametrize(("who", "status"), [("another cluster", 403), ("a member of another account", 404)])
def test_only_the_cluster_its_owner_or_an_admin_may_close_it(
    control_plane: ControlPlane, who: str, status: int
) -> None:
    registry = ClusterRegistry(control_plane.pipeline)
    token = (
        registry.register("acme", control_plane.url).token
        if who == "another cluster"
        else registry.tokens.create("member", "globex", "gil").token
    )
    response = httpx.post(
        f"{control_plane.url}/v1/clusters/{control_plane.cluster.cluster_id}/close",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    control_plane.delivery().deliver(control_plane.batch())  # still valid
    assert all(c["closed_at"] is None for c in control_plane.clusters())


def test_another_accounts_cluster_is_refused_before_its_names_are_decrypted(control_plane: ControlPlane) -> None:
    """Closing another account's cluster answered 404 as for an unknown id, 0.5-2 ms later: its names were
    decrypted before the account was compared, which told a member the id exists (r20)."""
    registry = ClusterRegistry(control_plane.pipeline)
    opened: list[str] = []
    open_names = registry.names.open
    registry.names.open = lambda *args, **kwargs: opened.append(args[0]) or open_names(*args, **kwargs)  # type: ignore[method-assign]
    cluster_id = control_plane.cluster.cluster_id
    assert registry.find(cluster_id, of_account="globex") is None
    assert registry.find("no-such-cluster", of_account="globex") is None
    assert opened == []
    assert registry.find(cluster_id, of_account="acme") is not None and opened == [cluster_id]


def _remote_config(control_plane: ControlPlane, cluster_home: Path) -> dict[str, Any]:
    return cluster_settings(control_plane.cluster.as_dict(), cluster_home, **{"pipeline.emitter.close-timeout": "2s"})


def _run_cluster(tasks: int) -> None:
    with (
        LocalCluster(
            n_workers=1, processes=False, dashboard_address=":0", scheduler_kwargs={"preload": ["pipeline.preload"]}
        ) as cluster,
        Client(cluster) as client,
    ):
        wait(client.map(abs, range(-tasks, 0)))


def test_a_cluster_that_closes_with_everything_delivered_loses_its_token(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    with dask.config.set(_remote_config(control_plane, tmp_path / "cluster")):
        _run_cluster(5)
    assert not list((tmp_path / "cluster").rglob("*.batch"))
    assert control_plane.clusters()[0]["closed_at"] is not None
    with pytest.raises(AuthenticationError, match="token revoked"):
        TokenStore(control_plane.pipeline).authenticate(control_plane.cluster.token)
    jobs = [r for r in control_plane.pipeline.read_records("long_term") if r["kind"] == "job"]
    assert [j["tasks_total"] for j in jobs] == [5]


def test_a_scheduler_with_a_closed_clusters_config_warns_once_and_stops_delivering(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18 case 4: it used to log `401: token revoked` and set a refused spool file aside every few seconds."""
    control_plane.delivery().retire()  # the cluster closed; its config is used again
    config = {**_remote_config(control_plane, tmp_path / "cluster"), "pipeline.emitter.linger": "0s"}
    with (
        caplog.at_level(logging.WARNING, logger="pipeline"),
        dask.config.set(config),
        LocalCluster(
            n_workers=1, processes=False, dashboard_address=":0", scheduler_kwargs={"preload": ["pipeline.preload"]}
        ) as cluster,
        Client(cluster) as client,
    ):
        wait(client.map(abs, range(-5, 0)))
        plugin = cluster.scheduler.plugins["metadata-pipeline"]
        deadline = time.monotonic() + 30
        while not plugin.emitter.stats.last_error and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # five snapshot intervals: none of them is delivered or set aside
        stats = plugin.emitter.stats
        assert (stats.batches_refused, stats.batches_delivered) == (0, 0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("pipeline")]
    assert [r.getMessage() for r in warnings if "token" in r.getMessage()] == [
        next(r.getMessage() for r in warnings if "Register the cluster again" in r.getMessage())
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert not list((tmp_path / "cluster").rglob("refused/*"))


def test_a_cluster_that_closes_with_a_full_spool_keeps_its_token_for_spool_replay(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    control_plane.proxy.cut()  # the control plane is unreachable while the cluster runs and closes
    config = _remote_config(control_plane, tmp_path / "cluster")
    with dask.config.set(config):
        _run_cluster(7)
    left = sorted((tmp_path / "cluster").rglob("*.batch"))
    assert left, "the undelivered batches stay in the dead scheduler's spool"
    control_plane.proxy.restore()
    assert control_plane.clusters()[0]["closed_at"] is None
    TokenStore(control_plane.pipeline).authenticate(control_plane.cluster.token)  # still valid

    copies = {path: path.read_bytes() for path in left}
    with dask.config.set(config):
        first = CliRunner().invoke(main, ["spool", "replay", "--timeout", "60", "--json"])
        assert first.exit_code == 0, first.output
        assert not list((tmp_path / "cluster").rglob("*.batch"))
        for path, data in copies.items():  # the same spool replayed again (a restored disk, a second operator)
            path.write_bytes(data)
        again = CliRunner().invoke(main, ["spool", "replay", "--timeout", "60", "--json"])
        assert again.exit_code == 0, again.output
    assert json.loads(first.output)["batches_delivered"] == len(left) == json.loads(again.output)["batches_delivered"]
    assert json.loads(again.output)["batches_left"] == 0
    stored = list(control_plane.pipeline.read_records("long_term", account="acme"))
    assert [j["tasks_total"] for j in stored if j["kind"] == "job"] == [7]
    assert max(Counter(r["record_id"] for r in stored).values()) == 1  # exactly once


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"url": "http://127.0.0.1:1", "public-key": "mp-intake-x25519:AAAA"}, "pipeline.ingest.token is not"),
        ({"url": "http://127.0.0.1:1", "token": TOKEN}, "pipeline.ingest.public-key is not"),
        ({"url": "http://127.0.0.1:1", "token": TOKEN, "public-key": "nope"}, "pipeline.ingest.public-key: expected"),
        ({"url": "not a url", "token": TOKEN}, "pipeline.ingest.url 'not a url' is not an http"),
        ({"url": "ftp://u:secret@host/", "token": TOKEN}, r"pipeline.ingest.url 'ftp://u:\*\*\*@host/' is not an http"),
        ({"url": "https://u:secret@host/", "token": TOKEN}, "'https://u:\\*\\*\\*@host/' names a user or password"),
    ],
)
def test_an_incomplete_remote_configuration_names_the_missing_setting(
    home: Path, config: dict[str, str], message: str
) -> None:
    with (
        dask.config.set({f"pipeline.ingest.{k}": v for k, v in config.items()}),
        pytest.raises(ConfigError, match=message),
    ):
        remote_delivery(Settings.from_config())


# -- the attacker's view: user code on the scheduler ------------------------------------------------
_FORBIDDEN_TYPES = (Pipeline, Keyring, KeyProvider, Engine, Settings, AESGCM, X25519PrivateKey)


def _reachable(root: object, limit: int = 200_000) -> Iterator[object]:
    """Every object reachable from ``root`` through attributes and containers (not through the scheduler)."""
    seen: set[int] = set()
    stack = [root]
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif not isinstance(obj, str | bytes | int | float):
            for name in [*getattr(obj, "__dict__", {}), *getattr(type(obj), "__slots__", ())]:
                if name in ("scheduler", "_background"):
                    continue  # the scheduler is user code's anyway; it holds no pipeline secret
                value = getattr(obj, name, None)
                if value is not None:
                    stack.append(value)


def _what_user_code_finds(dask_scheduler: Any) -> dict[str, Any]:
    plugin = dask_scheduler.plugins["metadata-pipeline"]
    found: dict[str, Any] = {"types": set(), "strings": set(), "bytes": set()}
    for obj in _reachable(plugin):
        if isinstance(obj, _FORBIDDEN_TYPES):
            found["types"].add(type(obj).__name__)
        elif isinstance(obj, str) and "://" in obj:
            found["strings"].add(obj)
        elif isinstance(obj, bytes) and len(obj) == 32:
            found["bytes"].add(obj)
    spool = plugin.emitter.spool
    found["spool"] = [p.read_bytes() for p in spool.pending_files()]
    found["config"] = repr(dask.config.config)
    return found


def test_code_on_the_cluster_finds_no_secret_and_cannot_read_its_spool(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    pipeline, proxy = control_plane.pipeline, control_plane.proxy
    proxy.cut()  # batches wait in the scheduler's spool
    with (
        dask.config.set(_remote_config(control_plane, tmp_path / "cluster")),
        LocalCluster(
            n_workers=1,
            processes=False,
            dashboard_address=":0",
            scheduler_kwargs={"preload": ["pipeline.preload"]},
        ) as cluster,
        Client(cluster) as client,
    ):
        wait(client.map(abs, range(-20, 0)))
        emitter = cluster.scheduler.plugins["metadata-pipeline"].emitter
        assert emitter.flush(2) is False  # the control plane is down
        found = client.run_on_scheduler(_what_user_code_finds)
        proxy.restore()
        assert emitter.flush(30), emitter.stats

    assert found["types"] == set()
    assert control_plane.url + "/v1/ingest" in found["strings"]  # the walk does see the plugin's own settings
    stores = ("sqlite", "postgresql", "file://", "aws-kms", str(pipeline.settings.home))
    assert not [s for s in found["strings"] if any(word in s for word in stores)]
    secrets = {
        pipeline.intake_key.private_bytes_raw(),
        pipeline.keyring.named_key("index", "index"),
        *pipeline.keyring.provider._keys.values(),  # type: ignore[attr-defined]
    }
    assert not found["bytes"] & secrets
    assert str(pipeline.settings.home) not in found["config"]  # the cluster's dask config names no real store
    assert found["spool"], "the spool held sealed batches while the control plane was down"
    for raw in found["spool"]:
        assert b"acme" not in raw and control_plane.cluster.cluster_id.encode() not in raw
        with pytest.raises(IntakeError, match="does not decrypt"):  # not even a fresh key opens it
            open_batch(X25519PrivateKey.generate(), raw[len(b"PLSPOOL2") + 32 :])
    assert not list((tmp_path / "cluster").rglob("*.db")) and not list((tmp_path / "cluster").rglob("*.key"))

    jobs = [r for r in pipeline.read_records("long_term", account="acme") if r["kind"] == "job"]
    assert [j["tasks_total"] for j in jobs] == [20]
    ids = Counter(r["record_id"] for r in pipeline.read_records("long_term", account="acme"))
    assert max(ids.values()) == 1  # exactly once, though batches were retried while the endpoint was down
