"""The multi-tenant path end to end: `serve` as a process, a LocalCluster that can write but never read.

The cluster is configured only with the ingest URL, its cluster token, the
intake public key, its account and cluster id (as `clusters create` prints).
User code on its scheduler then tries what an attacker on a tenant's cluster
would: find a key or a database, read its own spool, write into another account.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.config
import httpx
import pytest
from conftest import make_record
from controlplane import Served, serve_process
from tcpproxy import TCPProxy

from pipeline.config import Settings
from pipeline.runtime import Pipeline

pytestmark = pytest.mark.slow


def _inc(x: int) -> int:
    return x + 1


def _fail_on_7(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x


def tokens(home: Path, *args: str) -> dict[str, Any]:
    """`metadata-pipeline tokens create ... --json` on the control plane's home."""
    from click.testing import CliRunner

    from pipeline.cli import main

    with dask.config.set({"pipeline.home": str(home)}):
        result = CliRunner().invoke(main, ["tokens", "create", *args, "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def register(url: str, member_token: str, account: str) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/v1/clusters", json={"account": account}, headers={"Authorization": f"Bearer {member_token}"}
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def cluster_settings(registration: dict[str, Any], cluster_home: Path) -> dict[str, Any]:
    """Exactly what `clusters create` prints, plus a home for the scheduler's spool."""
    from pipeline.server.clusters import cluster_config

    config = cluster_config(registration)["pipeline"]
    return {
        "pipeline.home": str(cluster_home),
        "pipeline.account": config["account"],
        "pipeline.cluster-id": config["cluster-id"],
        "pipeline.ingest.url": config["ingest"]["url"],
        "pipeline.ingest.token": config["ingest"]["token"],
        "pipeline.ingest.public-key": config["ingest"]["public-key"],
        "pipeline.plugin.interval": "200ms",
        "pipeline.emitter.retry-max": "500ms",
    }


@contextmanager
def tenant_cluster(registration: dict[str, Any], cluster_home: Path) -> Iterator[tuple[Any, Any]]:
    """A LocalCluster whose scheduler loads the plugin by preload, configured only as `clusters create` says."""
    from distributed import Client, LocalCluster

    with (
        dask.config.set(cluster_settings(registration, cluster_home)),
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            dashboard_address=":0",
            scheduler_kwargs={"preload": ["pipeline.preload"]},
        ) as cluster,
        Client(cluster) as client,
    ):
        yield cluster, client


def records(url: str, token: str, **params: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/records", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


def snoop(dask_scheduler: Any) -> dict[str, Any]:
    """User code on the scheduler: look for anything that reads, in the plugin and its config."""
    import gc
    import os
    import types

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from sqlalchemy import Engine

    from pipeline.keys import KeyProvider, Keyring
    from pipeline.runtime import Pipeline
    from pipeline.stores.base import Store

    secret_types = (Keyring, KeyProvider, Pipeline, Store, Engine, AESGCM, X25519PrivateKey)
    plugin = next(p for p in dask_scheduler.plugins.values() if type(p).__name__ == "MetadataPlugin")
    skip = (type, type(os), types.FunctionType, types.BuiltinFunctionType)
    reachable, frontier, seen = [], [plugin], {id(dask_scheduler)}
    while frontier:  # everything the plugin holds, short of the scheduler itself and code objects
        obj = frontier.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        reachable.append(obj)
        frontier.extend(gc.get_referents(obj))
    found = sorted({type(o).__name__ for o in reachable if isinstance(o, secret_types)})
    texts = [o for o in reachable if isinstance(o, str)]
    urls = sorted({t for t in texts if t.startswith(("sqlite:", "postgresql", "file://", "aws-kms:", "memory:"))})
    config = dask.config.get("pipeline")
    home = Path(config["home"])
    spool = sorted(str(p) for p in home.rglob("*") if p.is_file())
    return {
        "secret_objects": found,
        "store_urls_in_plugin": urls,
        "files_in_home": spool,
        "master_key_exists": (home / "master.key").exists(),
        "database_exists": (home / "metadata.db").exists(),
    }


def forge(victim: str, dask_scheduler: Any = None) -> tuple[int, str]:
    """User code on the scheduler: seal a batch naming another account and post it with this cluster's token."""
    from pipeline.intake import load_public_key, seal_batch

    config = dask.config.get("pipeline")
    record = make_record(account=victim, cluster_id=config["cluster-id"])
    batch_id = uuid.uuid4().hex
    sealed = seal_batch(load_public_key(config["ingest"]["public-key"]), batch_id, [record])
    response = httpx.post(
        f"{config['ingest']['url']}/v1/ingest",
        content=sealed,
        headers={"Authorization": f"Bearer {config['ingest']['token']}", "Idempotency-Key": batch_id},
    )
    return response.status_code, response.text


def read_spool(dask_scheduler: Any) -> dict[str, Any]:
    """User code on the scheduler: try to open its own spooled batches."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from pipeline.errors import IntakeError
    from pipeline.intake import open_batch

    home = Path(dask.config.get("pipeline.home"))
    contents = []
    for path in (home / "spool").rglob("*"):
        if path.is_file() and path.suffix != ".tmp":  # a .tmp file is one the emitter is still writing
            with contextlib.suppress(FileNotFoundError):  # or it was delivered meanwhile
                contents.append(path.read_bytes())
    opened = 0
    for data in contents:
        with contextlib.suppress(IntakeError):
            open_batch(X25519PrivateKey.generate(), data)
            opened += 1
    account = dask.config.get("pipeline.account").encode()
    return {"files": len(contents), "opened": opened, "plaintext": sum(account in data for data in contents)}


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[tuple[Path, Served]]:
    home = tmp_path / "control-plane"
    with serve_process(home) as served:
        yield home, served


def test_a_cluster_writes_its_own_account_once_and_can_read_nothing(
    control_plane: tuple[Path, Served], tmp_path: Path
) -> None:
    home, served = control_plane
    ann = tokens(home, "--account", "acme", "--user", "ann")["token"]
    bob = tokens(home, "--account", "globex", "--user", "bob")["token"]
    admin = tokens(home, "--role", "admin", "--user", "privacy")["token"]
    registration = register(served.url, ann, "acme")
    with tenant_cluster(registration, tmp_path / "cluster") as (_cluster, client):
        assert sum(client.gather(client.map(_inc, range(50)))) == sum(range(1, 51))
        results = client.gather(client.map(_fail_on_7, range(10)), errors="skip")
        assert len(results) == 9
        found = client.run_on_scheduler(snoop)
        status, body = client.run_on_scheduler(forge, "globex")

    assert found["secret_objects"] == [] and found["store_urls_in_plugin"] == []
    assert not found["master_key_exists"] and not found["database_exists"]
    assert status == 403, body
    assert "another account" in body or "globex" not in body, body
    assert "Traceback" not in body

    mine = ndjson(records(served.url, ann))
    ids = [r["record_id"] for r in mine]
    assert len(ids) == len(set(ids)), "a record arrived twice"
    jobs = sorted((r for r in mine if r["kind"] == "job"), key=lambda r: r["started_at"])
    assert [(j["tasks_completed"], j["tasks_erred"]) for j in jobs] == [(50, 0), (9, 1)]
    assert {r["account"] for r in mine} == {"acme"}
    assert {r["cluster_id"] for r in mine} == {registration["cluster_id"]}

    assert records(served.url, bob, account="acme").status_code == 404  # another member: not found
    assert ndjson(records(served.url, bob)) == []  # globex got nothing forged
    assert {r["record_id"] for r in ndjson(records(served.url, admin, account="acme"))} == set(ids)

    with dask.config.set({"pipeline.home": str(home)}):
        pipeline = Pipeline.open(Settings.from_config())
        rejected = [e for e in pipeline.audit.entries() if e.action == "ingest.rejected"]
        pipeline.close()
    assert len(rejected) == 1


def test_records_survive_a_control_plane_restart_mid_workload_exactly_once(tmp_path: Path) -> None:
    home = tmp_path / "control-plane"
    with serve_process(home) as first:
        proxy_target = first.url.removeprefix("http://").split(":")
        proxy = TCPProxy(proxy_target[0], int(proxy_target[1]))
        via_proxy = f"http://127.0.0.1:{proxy.port}"
        ann = tokens(home, "--account", "acme", "--user", "ann")["token"]
        registration = register(via_proxy, ann, "acme")
        assert registration["ingest_url"] == via_proxy
        with tenant_cluster(registration, tmp_path / "cluster") as (cluster, client):
            assert client.submit(sum, range(10)).result() == 45
            first.stop()  # the control plane goes away mid-workload
            assert sum(client.gather(client.map(_inc, range(30)))) == sum(range(1, 31))
            spooled = client.run_on_scheduler(read_spool)
            with serve_process(home) as second:
                host, port = second.url.removeprefix("http://").split(":")
                proxy.target = (host, int(port))
                assert sum(client.gather(client.map(_inc, range(20)))) == sum(range(1, 21))
                cluster.close()  # the plugin flushes what it holds at close
                mine = ndjson(records(second.url, ann))
        proxy.close()

    assert spooled["files"] >= 1 and spooled["opened"] == 0 and spooled["plaintext"] == 0
    ids = [r["record_id"] for r in mine]
    assert len(ids) == len(set(ids)), "a record arrived twice"
    jobs = sorted((r for r in mine if r["kind"] == "job"), key=lambda r: r["started_at"])
    assert [j["tasks_completed"] for j in jobs] == [1, 30, 20]
