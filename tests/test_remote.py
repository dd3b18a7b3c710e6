"""Remote plugin mode: HTTP delivery, and what code on the cluster can (not) reach."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import pytest
from conftest import make_record, sealed_batch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from distributed import Client, LocalCluster, wait
from ingest_endpoint import IngestEndpoint
from sqlalchemy import Engine

from pipeline.config import Settings
from pipeline.delivery import HTTPDelivery, remote_delivery
from pipeline.errors import BatchRefused, ConfigError, IntakeError, StoreUnavailable
from pipeline.intake import MEDIA_TYPE, open_batch
from pipeline.keys import KeyProvider, Keyring
from pipeline.principals import Principal
from pipeline.runtime import Pipeline
from pipeline.spool import SpooledBatch

TOKEN = "mp_" + "a" * 43


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[Pipeline, IngestEndpoint]]:
    """A pipeline in its own home (the control plane's) behind the stand-in ingest endpoint."""
    settings = Settings.from_config(home=str(tmp_path / "control-plane"))
    pipeline = Pipeline.open(settings, create=True)
    endpoint = IngestEndpoint(pipeline, {TOKEN: Principal("cluster", account="acme", cluster_id="c-1", token_id="t1")})
    yield pipeline, endpoint
    endpoint.close()


def _batch(pipeline: Pipeline, records: list[dict[str, Any]]) -> SpooledBatch:
    return SpooledBatch(*sealed_batch(pipeline, records))


def test_a_delivered_batch_carries_token_idempotency_key_and_media_type(control_plane) -> None:  # noqa: ANN001
    pipeline, endpoint = control_plane
    delivery = HTTPDelivery(endpoint.url, TOKEN, pipeline.intake_key.public_key())
    batch = _batch(pipeline, [make_record(cluster_id="c-1")])
    delivery.deliver(batch)
    delivery.deliver(batch)  # a retry after a lost answer: accepted once
    headers = endpoint.requests[-1]
    assert headers["Authorization"] == f"Bearer {TOKEN}" and headers["Idempotency-Key"] == batch.batch_id
    assert headers["Content-Type"] == MEDIA_TYPE
    assert [r["cluster_id"] for r in pipeline.read_records("long_term")] == ["c-1"]


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (503, StoreUnavailable, "answered 503: control plane busy"),
        (429, StoreUnavailable, "answered 429: control plane busy"),
        (400, BatchRefused, "refused: ingest endpoint .* answered 400: control plane busy"),
        (401, BatchRefused, "answered 401"),
        (413, BatchRefused, "answered 413"),
    ],
)
def test_answers_map_to_retry_or_refused_for_good(control_plane, status: int, error: type, message: str) -> None:  # noqa: ANN001
    pipeline, endpoint = control_plane
    endpoint.forced = (status, {"title": "x", "detail": "control plane busy\nsecond line"})
    delivery = HTTPDelivery(endpoint.url, TOKEN, pipeline.intake_key.public_key())
    with pytest.raises(error, match=message) as caught:
        delivery.deliver(_batch(pipeline, [make_record()]))
    assert "second line" not in str(caught.value)


def test_an_unreachable_endpoint_means_retry(control_plane) -> None:  # noqa: ANN001
    pipeline, _ = control_plane
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once closed
    delivery = HTTPDelivery(f"http://127.0.0.1:{port}", TOKEN, pipeline.intake_key.public_key(), timeout=5)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        delivery.deliver(_batch(pipeline, [make_record()]))


def test_the_stand_in_endpoint_answers_the_contract(control_plane) -> None:  # noqa: ANN001
    pipeline, endpoint = control_plane
    delivery = HTTPDelivery(endpoint.url, TOKEN, pipeline.intake_key.public_key())
    with pytest.raises(BatchRefused, match="answered 403: batch .* refused: 1 of 1 records name another account"):
        delivery.deliver(_batch(pipeline, [make_record(account="globex", cluster_id="c-1")]))
    with pytest.raises(BatchRefused, match="answered 400: not a sealed metadata batch"):
        delivery.deliver(SpooledBatch("b-1", b"hello"))
    with pytest.raises(BatchRefused, match="answered 401"):
        HTTPDelivery(endpoint.url, "mp_wrong", pipeline.intake_key.public_key()).deliver(SpooledBatch("b", b"x"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"url": "http://127.0.0.1:1", "public-key": "mp-intake-x25519:AAAA"}, "pipeline.ingest.token is not"),
        ({"url": "http://127.0.0.1:1", "token": TOKEN}, "pipeline.ingest.public-key is not"),
        ({"url": "http://127.0.0.1:1", "token": TOKEN, "public-key": "nope"}, "pipeline.ingest.public-key: expected"),
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


def test_code_on_the_cluster_finds_no_secret_and_cannot_read_its_spool(control_plane, tmp_path: Path) -> None:  # noqa: ANN001
    pipeline, endpoint = control_plane
    endpoint.down = True  # batches wait in the scheduler's spool
    cluster_config = {
        "pipeline.home": str(tmp_path / "cluster"),
        "pipeline.account": "acme",
        "pipeline.cluster-id": "c-1",
        "pipeline.plugin.interval": "100ms",
        "pipeline.emitter.retry-max": "200ms",
        "pipeline.ingest.url": endpoint.url,
        "pipeline.ingest.token": TOKEN,
        "pipeline.ingest.public-key": pipeline.intake_public_key,
    }
    with (
        dask.config.set(cluster_config),
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
        endpoint.down = False
        assert emitter.flush(30), emitter.stats

    assert found["types"] == set()
    assert endpoint.url + "/v1/ingest" in found["strings"]  # the walk does see the plugin's own settings
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
        assert b"acme" not in raw and b"c-1" not in raw
        with pytest.raises(IntakeError, match="does not decrypt"):  # not even a fresh key opens it
            open_batch(X25519PrivateKey.generate(), raw[len(b"PLSPOOL2") + 32 :])
    assert not list((tmp_path / "cluster").rglob("*.db")) and not list((tmp_path / "cluster").rglob("*.key"))

    jobs = [r for r in pipeline.read_records("long_term", account="acme") if r["kind"] == "job"]
    assert [j["tasks_total"] for j in jobs] == [20]
    ids = Counter(r["record_id"] for r in pipeline.read_records("long_term", account="acme"))
    assert max(ids.values()) == 1  # exactly once, though batches were retried while the endpoint was down
