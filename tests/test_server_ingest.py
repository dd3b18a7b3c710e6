"""``POST /v1/clusters`` and ``POST /v1/ingest`` over real HTTP: what a cluster token can and cannot do."""

from __future__ import annotations

import uuid
from typing import Any

from conftest import make_record
from controlplane import ControlPlane, assert_problem

from pipeline.intake import MAX_SEALED_BYTES, load_public_key, seal_batch


def register(plane: ControlPlane, account: str = "acme", **extra: Any) -> dict[str, Any]:
    with plane.member(account, "ann") as ann:
        response = ann.post("/v1/clusters", json={"account": account, **extra})
    assert response.status_code == 201, response.text
    return dict(response.json())


def sealed(registration: dict[str, Any], *records: dict[str, Any]) -> tuple[str, bytes]:
    batch_id = uuid.uuid4().hex
    return batch_id, seal_batch(load_public_key(registration["intake_public_key"]), batch_id, list(records))


def post(plane: ControlPlane, token: str, batch: tuple[str, bytes]):  # noqa: ANN201
    with plane.client(token) as cluster:
        return cluster.post("/v1/ingest", content=batch[1], headers={"Idempotency-Key": batch[0]})


def test_registration_returns_what_a_cluster_needs_and_lists_only_to_its_account(plane: ControlPlane) -> None:
    body = register(plane, "acme", name="etl", image="registry.example/etl:1")
    assert body["ingest_url"] == plane.url
    assert body["token"].startswith("mp_") and body["intake_public_key"].startswith("mp-intake-x25519:")
    with plane.member("globex", "bob") as bob, plane.member("acme", "ann") as ann, plane.admin() as admin:
        assert_problem(bob.post("/v1/clusters", json={"account": "acme"}), 403)
        assert bob.get("/v1/clusters").json() == []
        (mine,) = ann.get("/v1/clusters").json()
        assert (mine["cluster_id"], mine["name"], mine["account"]) == (body["cluster_id"], "etl", "acme")
        assert [c["cluster_id"] for c in admin.get("/v1/clusters").json()] == [body["cluster_id"]]
    with plane.client(body["token"]) as cluster:
        assert_problem(cluster.get("/v1/records"), 403)
        assert_problem(cluster.post("/v1/clusters", json={"account": "acme"}), 403)


def test_a_batch_is_accepted_once_and_readable_by_its_account(plane: ControlPlane) -> None:
    reg = register(plane)
    record = make_record(account="acme", cluster_id=reg["cluster_id"])
    batch = sealed(reg, record)
    first, again = post(plane, reg["token"], batch), post(plane, reg["token"], batch)
    assert (first.status_code, first.json()) == (202, {"records": 1, "duplicate": False})
    assert (again.status_code, again.json()) == (202, {"records": 1, "duplicate": True})
    with plane.member("acme", "ann") as ann:
        rows = [line for line in ann.get("/v1/records").text.splitlines() if line]
    assert len(rows) == 1 and record["record_id"] in rows[0]
    with plane.admin() as admin:
        assert "pipeline_ingested_records_total 1.0" in admin.get("/metrics").text


def test_a_batch_naming_another_account_is_refused_whole_and_audited(plane: ControlPlane) -> None:
    reg = register(plane)
    own = make_record(account="acme", cluster_id=reg["cluster_id"])
    forged = make_record(account="globex", cluster_id=reg["cluster_id"])
    assert_problem(post(plane, reg["token"], sealed(reg, own, forged)), 403)
    with plane.admin() as admin:
        assert [line for line in admin.get("/v1/records").text.splitlines() if line] == []
        assert 'pipeline_rejected_batches_total{reason="ForbiddenBatch"} 1.0' in admin.get("/metrics").text
    assert [e.action for e in plane.pipeline.audit.entries()].count("ingest.rejected") == 1


def test_bad_bodies_are_400_and_oversized_ones_413(plane: ControlPlane) -> None:
    reg = register(plane)
    with plane.client(reg["token"]) as cluster:
        assert_problem(cluster.post("/v1/ingest", content=b""), 400)
        assert_problem(cluster.post("/v1/ingest", content=b"MPBATCH1 but not really"), 400)
        batch_id, data = sealed(reg, make_record(account="acme", cluster_id=reg["cluster_id"]))
        tampered = data[:-1] + bytes([data[-1] ^ 1])
        assert_problem(cluster.post("/v1/ingest", content=tampered, headers={"Idempotency-Key": batch_id}), 400)
        assert_problem(cluster.post("/v1/ingest", content=data, headers={"Idempotency-Key": "other-id"}), 400)
        huge = cluster.post("/v1/ingest", content=b"\0" * (MAX_SEALED_BYTES + 1))
        assert "exceeds the limit" in assert_problem(huge, 413)["detail"]


def test_a_cluster_token_of_another_cluster_cannot_write_for_this_one(plane: ControlPlane) -> None:
    mine, theirs = register(plane), register(plane)
    record = make_record(account="acme", cluster_id=mine["cluster_id"])
    assert_problem(post(plane, theirs["token"], sealed(mine, record)), 403)


def test_what_ingest_checks_before_the_batch_answers_as_documented(plane: ControlPlane) -> None:
    """The handler reads its token and header itself: the same answers FastAPI's dependencies gave."""
    reg = register(plane)
    batch_id, data = sealed(reg, make_record(account="acme", cluster_id=reg["cluster_id"]))
    with plane.client(reg["token"]) as cluster:
        long_key = cluster.post("/v1/ingest", content=data, headers={"Idempotency-Key": "k" * 129})
        assert "idempotency-key" in assert_problem(long_key, 400)["detail"]
        assert_problem(cluster.get("/v1/ingest"), 405)
        accepted = cluster.post("/v1/ingest", content=data, headers={"Idempotency-Key": batch_id})
        assert (accepted.status_code, accepted.json()) == (202, {"records": 1, "duplicate": False})
    with plane.client(None) as anonymous:
        assert_problem(anonymous.post("/v1/ingest"), 401)  # no body: refused by the handler, not the guard
        assert_problem(anonymous.post("/v1/ingest", headers={"Authorization": "Basic " + reg["token"]}), 401)
    with plane.member("acme", "ann") as ann:
        assert_problem(ann.post("/v1/ingest"), 403)
    with plane.admin() as admin:
        timed = admin.get("/metrics").text
    for method, status in (("POST", 202), ("POST", 400), ("POST", 401), ("POST", 403), ("GET", 405)):
        assert f'_count{{method="{method}",route="/v1/ingest",status="{status}"}}' in timed  # as routed by FastAPI
