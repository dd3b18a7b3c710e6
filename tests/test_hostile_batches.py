"""Every field a cluster sends is hostile input: attacks through real HTTP with hand-sealed batches.

Each test plays someone holding a cluster's config (its token and the intake public
key) who seals whatever they like, as ``seal_batch`` does or byte by byte.
"""

from __future__ import annotations

import resource
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dask.config
import pyarrow as pa
import pytest
from conftest import make_record, run
from controlplane import ControlPlane, assert_problem, cluster_settings, ndjson
from cryptography.hazmat.primitives import hpke

from pipeline.config import Settings
from pipeline.delivery import HTTPDelivery
from pipeline.emitter import Emitter
from pipeline.intake import load_public_key, seal_batch
from pipeline.records import JOB_PROGRESS, KINDS, tables_from_records
from pipeline.retention.requests import process_pending
from pipeline.spool import Spool


def register(plane: ControlPlane, account: str = "acme", user: str = "ann") -> dict[str, Any]:
    """A cluster registered by a member for themselves, as ``clusters create`` does."""
    with plane.member(account, user) as member:
        response = member.post("/v1/clusters", json={"account": account})
    assert response.status_code == 201, response.text
    return dict(response.json())


def own(registration: dict[str, Any], kind: str = "cluster_snapshot", **fields: Any) -> dict[str, Any]:
    """A record of the registered cluster, with no user: the plugin of a cluster nobody told who runs it."""
    return make_record(kind, account=registration["account"], cluster_id=registration["cluster_id"], **fields)


def post(plane: ControlPlane, registration: dict[str, Any], sealed: tuple[str, bytes]):  # noqa: ANN201
    with plane.client(registration["token"]) as cluster:
        return cluster.post("/v1/ingest", content=sealed[1], headers={"Idempotency-Key": sealed[0]})


def sealed(registration: dict[str, Any], *records: dict[str, Any]) -> tuple[str, bytes]:
    batch_id = uuid.uuid4().hex
    return batch_id, seal_batch(load_public_key(registration["intake_public_key"]), batch_id, list(records))


def sealed_by_hand(
    registration: dict[str, Any], streams: Sequence[Sequence[pa.RecordBatch]], compression: str | None = None
) -> tuple[str, bytes]:
    """A sealed batch built from the documented format, byte by byte: length-framed Arrow streams, HPKE."""
    frames = []
    for batches in streams:
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression=compression)
        with pa.ipc.new_stream(sink, batches[0].schema, options=options) as writer:
            for batch in batches:
                writer.write_batch(batch)
        stream = sink.getvalue().to_pybytes()
        frames += [len(stream).to_bytes(4, "big"), stream]
    return sealed_plaintext(registration, b"".join(frames))


def sealed_plaintext(registration: dict[str, Any], plaintext: bytes) -> tuple[str, bytes]:
    """``plaintext`` sealed to the intake key as the documented format says, whatever it holds."""
    batch_id = uuid.uuid4().hex
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    key = load_public_key(registration["intake_public_key"])
    ciphertext = suite.encrypt(plaintext, key, info=b"MPBATCH1|" + batch_id.encode())
    return batch_id, b"MPBATCH1" + bytes([len(batch_id)]) + batch_id.encode() + ciphertext


def rejections(plane: ControlPlane) -> list[dict[str, Any]]:
    return [e.details for e in plane.pipeline.audit.entries() if e.action == "ingest.rejected"]


def stored(plane: ControlPlane) -> dict[str, list[dict[str, Any]]]:
    return {name: list(plane.pipeline.read_records(name)) for name in plane.pipeline.stores}


# -- identity comes from the registration --------------------------------------------------------


def test_a_members_erasure_removes_her_clusters_records_in_every_store(plane: ControlPlane) -> None:
    registration = register(plane, "acme", "ann")
    assert registration["user"] == "ann"
    records = [own(registration), own(registration, "job", job_id="j1", user="ann"), own(registration, "software_env")]
    assert post(plane, registration, sealed(registration, *records)).status_code == 202
    with plane.member("acme", "ann") as ann:
        assert {r["user"] for r in ndjson(ann.get("/v1/records"))} == {"ann"}  # stamped from the registration
        filed = ann.post("/v1/erasure-requests", json={"account": "acme", "user": "ann"})
        assert filed.status_code == 201, filed.text
    process_pending(plane.pipeline)  # what the retention scheduler of serve runs
    with plane.admin() as admin:  # ann's own token ended with her erasure
        receipt = admin.get(f"/v1/erasure-requests/{filed.json()['request_id']}").json()
    assert receipt["state"] == "completed"
    holding = {name: len(rows) for name, rows in stored(plane).items() if rows}
    assert holding == {}  # nothing of ann's cluster is left anywhere
    counted = {name: store["records"] for name, store in receipt["receipt"]["stores"].items()}
    assert counted["long_term"] == 3 and sum(counted.values()) >= 3


def test_a_running_job_sent_without_a_user_is_recorded_lost_as_the_owners_and_erased_with_her(
    plane: ControlPlane,
) -> None:
    """A plugin configured without ``pipeline.user`` reports ann's job running; her cluster closes, so the
    job is recorded lost. That record is hers (the owner stamped in), and her erasure takes it too."""
    registration = register(plane, "acme", "ann")
    job = {"job_id": "j1", "started_at": datetime.now(UTC), "tasks_total": 4, "task_prefixes": ["ann_private_fn"]}
    assert post(plane, registration, sealed(registration, own(registration, jobs_running=[job]))).status_code == 202
    with plane.client(registration["token"]) as cluster:
        assert cluster.post(f"/v1/clusters/{registration['cluster_id']}/close").status_code == 204
    with plane.member("acme", "ann") as ann:
        lost = [r for r in ndjson(ann.get("/v1/records")) if r["kind"] == "job"]
        assert [(r["status"], r["user"]) for r in lost] == [("lost", "ann")]
        assert ann.post("/v1/erasure-requests", json={"account": "acme", "user": "ann"}).status_code == 201
    process_pending(plane.pipeline)
    assert {name: rows for name, rows in stored(plane).items() if rows} == {}


@pytest.mark.parametrize(
    "forged",
    [{"user": "bob"}, {"account": "globex"}, {"cluster_id": "cluster-of-someone-else"}],
    ids=["user", "account", "cluster"],
)
def test_a_record_naming_another_user_account_or_cluster_refuses_the_batch_whole(
    plane: ControlPlane, forged: dict[str, Any]
) -> None:
    registration = register(plane, "acme", "ann")
    answer = post(plane, registration, sealed(registration, own(registration), {**own(registration), **forged}))
    assert "1 of 2 records name another account, user or cluster" in assert_problem(answer, 403)["detail"]
    assert stored(plane)["long_term"] == [] and len(rejections(plane)) == 1


@pytest.mark.parametrize("shape", ["a later Arrow batch", "the caller's names cut elsewhere"])
def test_rows_that_only_look_like_the_callers_own_refuse_the_batch(plane: ControlPlane, shape: str) -> None:
    """Admission reads a batch's account, user and cluster columns from their buffers when every row is the
    caller's: a foreign row in a second Arrow batch, or slots cut from the caller's name repeated ("acme" ×
    2 as "ac" and "meacme"), are the caller's in no row."""
    registration = register(plane, "acme", "ann")
    (table,) = tables_from_records([own(registration, user="ann"), own(registration, user="ann")])
    if shape == "a later Arrow batch":
        (other,) = tables_from_records(
            [own(registration, user="ann"), {**own(registration, user="ann"), "account": "ac"}]
        )
        batches, expected = [*table.to_batches(), *other.to_batches()], "1 of 4 records"
    else:
        index = table.schema.get_field_index("account")
        cut = table.set_column(index, table.schema.field(index), pa.array(["ac", "meacme"], pa.string()))
        batches, expected = cut.to_batches(), "2 of 2 records"
    answer = post(plane, registration, sealed_by_hand(registration, [batches]))
    assert f"{expected} name another account, user or cluster" in assert_problem(answer, 403)["detail"]
    assert stored(plane)["long_term"] == []


def test_a_late_copy_of_a_batch_leaves_a_finished_job_finished(plane: ControlPlane) -> None:
    """A batch taken again late (a retry reaching another replica, two spool replays) rewrote the cluster's
    running jobs from its older snapshot: no job running was kept without its time, so the job it listed
    ran again, and the next snapshot recorded it lost beside its end (one job, two records)."""
    registration = register(plane)
    start = datetime.now(UTC) - timedelta(seconds=30)
    progress = {"started_at": start, "tasks_total": 40, "tasks_completed": 7, "tasks_erred": 1}
    running = own(
        registration, user="ann", observed_at=start + timedelta(seconds=5), jobs_running=[{"job_id": "x", **progress}]
    )
    end = own(registration, "job", user="ann", job_id="x", status="finished", observed_at=start + timedelta(seconds=7))
    first = sealed(registration, running)
    for copy in (
        first,
        sealed(registration, end, own(registration, user="ann", observed_at=start + timedelta(seconds=10))),
    ):
        assert post(plane, registration, copy).status_code == 202
    assert post(plane, registration, first).json()["duplicate"] is True
    assert post(plane, registration, sealed(registration, own(registration, user="ann"))).status_code == 202
    assert [r["status"] for r in stored(plane)["long_term"] if r["kind"] == "job"] == ["finished"]


def test_a_service_cluster_of_an_admin_is_account_level_and_names_no_user(plane: ControlPlane) -> None:
    with plane.admin() as admin:
        service = admin.post("/v1/clusters", json={"account": "acme"}).json()
        owned = admin.post("/v1/clusters", json={"account": "acme", "user": "carol"}).json()
    assert (service["user"], owned["user"]) == (None, "carol")
    assert_problem(post(plane, service, sealed(service, own(service, user="ann"))), 403)
    assert post(plane, service, sealed(service, own(service))).status_code == 202
    assert post(plane, owned, sealed(owned, own(owned))).status_code == 202
    assert sorted(str(r["user"]) for r in stored(plane)["long_term"]) == ["None", "carol"]


def test_a_member_registers_clusters_for_themselves_only(plane: ControlPlane) -> None:
    with plane.member("acme", "ann") as ann:
        assert_problem(ann.post("/v1/clusters", json={"account": "acme", "user": "bob"}), 403)
        assert ann.post("/v1/clusters", json={"account": "acme", "user": "ann"}).json()["user"] == "ann"


def test_a_cluster_is_registered_only_with_an_image_its_records_may_carry(plane: ControlPlane) -> None:
    """The image goes into every software_env record its plugin sends: one ingest would refuse (2,048
    bytes of UTF-8 at most) is refused at registration, before any token is issued."""
    with plane.admin() as admin:
        refused = admin.post("/v1/clusters", json={"account": "acme", "image": "é" * 1025})
        assert "image: 2050 bytes of UTF-8; at most 2048" in assert_problem(refused, 400)["detail"]
        assert admin.get("/v1/clusters").json() == []
        assert admin.post("/v1/clusters", json={"account": "acme", "image": "é" * 1024}).status_code == 201


def test_a_cluster_never_sends_account_records(plane: ControlPlane) -> None:
    registration = register(plane)
    person = own(registration, "account", username="ann", email="ann@acme.test")
    assert (
        "may not send account records"
        in assert_problem(post(plane, registration, sealed(registration, person)), 403)["detail"]
    )
    assert stored(plane)["long_term"] == [] and len(rejections(plane)) == 1


# -- bounds, before anything is stored -----------------------------------------------------------


def _with_column(record: dict[str, Any], name: str, value: pa.Array) -> pa.RecordBatch:
    (table,) = tables_from_records([record])
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), value).to_batches()[0]


FAR_PAST = -((1970 + 1199) * 365 * 86_400 * 1_000_000)  # microseconds: about the year -1199


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("cluster_snapshot", "n_workers", pa.array([-4], pa.int64())),
        ("job", "tasks_completed", pa.array([-1], pa.int64())),
        ("job", "compute_seconds", pa.array([float("nan")])),
        ("cluster_snapshot", "compute_seconds_total", pa.array([float("inf")])),
        ("job", "tasks_total", pa.array([2**53 + 1], pa.int64())),
        ("job", "compute_seconds", pa.array([1e308])),
        (
            "cluster_snapshot",
            "observed_at",
            pa.array([datetime(9999, 12, 31, tzinfo=UTC)], KINDS["job"].schema.field("observed_at").type),
        ),
        ("job", "started_at", pa.array([FAR_PAST], pa.int64()).cast(pa.timestamp("us", tz="UTC"))),
        ("job", "finished_at", pa.array([datetime.now(UTC) - timedelta(days=3)], pa.timestamp("us", tz="UTC"))),
        ("software_env", "image", pa.array(["x" * 100_000])),
        ("job", "task_prefixes", pa.array([["p"] * 20_000], pa.list_(pa.string()))),
        ("software_env", "packages", pa.array([[("numpy", "2.1")] * 5_000], pa.map_(pa.string(), pa.string()))),
    ],
    ids=[
        "negative-count",
        "negative-completed",
        "nan",
        "inf",
        "count-past-2**53",
        "seconds-past-2**53",
        "year-9999",
        "year-minus-1199",
        "before-registration",
        "long-string",
        "long-list",
        "a-key-twice",
    ],
)
def test_a_value_out_of_bounds_is_400_naming_the_field_and_stores_nothing(
    plane: ControlPlane, kind: str, field: str, value: pa.Array
) -> None:
    registration = register(plane)
    batch = _with_column(own(registration, kind), field, value)
    answer = post(plane, registration, sealed_by_hand(registration, [[batch]]))
    assert f"{kind}.{field}" in assert_problem(answer, 400)["detail"]
    assert stored(plane)["long_term"] == []
    (rejected,) = rejections(plane)
    assert rejected["field"] == f"{kind}.{field}" and rejected["reason"].startswith("out of bounds")
    with plane.member("acme", "ann") as ann:  # reads go on as before
        assert ann.get("/v1/records").status_code == 200 and ann.get("/v1/software-envs").json() == []


@pytest.mark.parametrize(
    ("records", "field", "reason"),
    [
        (lambda at: [{"record_id": ""}], "record_id", "empty"),
        (lambda at: [{"record_id": "r1"}, {"record_id": "r1"}], "record_id", "the same record id twice"),
        (lambda at: [{"job_id": None}, {"job_id": None}], "job_id", "null"),
    ],
    ids=["empty-record-id", "record-id-twice", "job-without-id"],
)
def test_a_record_that_contradicts_itself_is_400_naming_the_field(
    plane: ControlPlane, records: Callable[[datetime], list[dict[str, Any]]], field: str, reason: str
) -> None:
    registration = register(plane)
    at = datetime.now(UTC) - timedelta(minutes=1)
    answer = post(plane, registration, sealed(registration, *(own(registration, "job", **r) for r in records(at))))
    assert f"out of bounds: job.{field}: {reason}" in assert_problem(answer, 400)["detail"]
    assert stored(plane)["long_term"] == []


def test_one_record_id_in_records_of_two_kinds_is_400(plane: ControlPlane) -> None:
    """Record ids were checked table by table, a table a kind: a snapshot and a job of one id were stored."""
    registration = register(plane)
    twice = [own(registration, "cluster_snapshot", record_id="r1"), own(registration, "job", record_id="r1")]
    answer = post(plane, registration, sealed(registration, *twice))
    assert (
        "out of bounds: record_id: the same record id in records of two kinds" in assert_problem(answer, 400)["detail"]
    )
    assert stored(plane)["long_term"] == []


def test_a_job_that_ends_before_it_starts_is_taken_as_an_earlier_release_sends_it(plane: ControlPlane) -> None:
    """Its plugin stamps the end with the clock, which may have stepped back: refused, the batch was lost."""
    registration = register(plane)
    at = datetime.now(UTC) - timedelta(minutes=1)
    job = own(registration, "job", status="finished", started_at=at, finished_at=at - timedelta(seconds=30))
    assert post(plane, registration, sealed(registration, job)).status_code == 202
    [stored_job] = [r for r in stored(plane)["long_term"] if r["kind"] == "job"]
    assert stored_job["finished_at"] == at - timedelta(seconds=30)


def test_a_running_jobs_progress_is_bounded_like_a_jobs(plane: ControlPlane) -> None:
    """A snapshot's running jobs become job records when their cluster is lost: every field is checked."""
    registration = register(plane)
    progress = pa.struct(JOB_PROGRESS)
    job = {"job_id": "job-1", "started_at": datetime.now(UTC), "tasks_total": 10, "tasks_completed": -5}
    batch = _with_column(own(registration, "cluster_snapshot"), "jobs_running", pa.array([[job]], pa.list_(progress)))
    answer = post(plane, registration, sealed_by_hand(registration, [[batch]]))
    assert "cluster_snapshot.jobs_running tasks_completed: negative" in assert_problem(answer, 400)["detail"]
    assert stored(plane)["long_term"] == []


@pytest.mark.parametrize("entry", [None, {"job_id": None, "tasks_total": 1}], ids=["null entry", "null job_id"])
def test_a_running_job_without_an_id_is_400_not_500(plane: ControlPlane, entry: dict[str, Any] | None) -> None:
    """The control plane keeps each running job by its id, to record it if the cluster ends first."""
    registration = register(plane)
    running = pa.array([[entry]], pa.list_(pa.struct(JOB_PROGRESS)))
    batch = _with_column(own(registration, "cluster_snapshot"), "jobs_running", running)
    answer = post(plane, registration, sealed_by_hand(registration, [[batch]]))
    assert "running job that is null or has no job_id" in assert_problem(answer, 400)["detail"]
    assert stored(plane)["long_term"] == []


def test_a_thousand_users_in_one_batch_is_400(plane: ControlPlane) -> None:
    registration = register(plane)
    records = [own(registration, user=f"user-{n}") for n in range(1000)]
    answer = post(plane, registration, sealed(registration, *records))
    assert "distinct accounts and users" in assert_problem(answer, 400)["detail"]
    assert (
        stored(plane)["long_term"] == []
        and plane.pipeline.keyring.live_version(
            plane.pipeline.keyring.subject_ref("acme"), plane.pipeline.keyring.user_ref("acme", "user-7")
        )
        is None
    )


def test_a_compressed_batch_is_refused_before_it_expands(plane: ControlPlane) -> None:
    """~800 MB of zstd-compressed Arrow in a sealed batch of a few hundred KB: refused, no big allocation."""
    registration = register(plane)
    (table,) = tables_from_records([own(registration, "software_env", image="x" * 8_000_000)])
    bomb = sealed_by_hand(registration, [table.to_batches() * 100], compression="zstd")
    assert len(bomb[1]) < 1024 * 1024
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    answer = post(plane, registration, bomb)
    assert "compressed" in assert_problem(answer, 400)["detail"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024
    assert stored(plane)["long_term"] == []


def _earlier_snapshots_claiming(registration: dict[str, Any], rows: int) -> bytes:
    """A length-framed Arrow stream of 333 snapshots as an earlier release sent them (no ``jobs_running``),
    whose record batch claims ``rows`` rows (the batch's length and its columns'): its body is unchanged."""
    (table,) = tables_from_records([own(registration, user="ann") for _ in range(333)])
    table = table.drop_columns(["jobs_running"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    stream = sink.getvalue().to_pybytes()
    schema_end = 8 + int.from_bytes(stream[4:8], "little")
    length = int.from_bytes(stream[schema_end + 4 : schema_end + 8], "little")
    batch = stream[schema_end + 8 : schema_end + 8 + length].replace(
        (333).to_bytes(8, "little"), rows.to_bytes(8, "little")
    )
    forged = stream[: schema_end + 8] + batch + stream[schema_end + 8 + length :]
    return len(forged).to_bytes(4, "big") + forged


def test_a_batch_claiming_more_rows_than_its_buffers_hold_is_refused_before_anything_is_allocated(
    plane: ControlPlane,
) -> None:
    """An earlier release's table is given its later fields as nulls, one per row it claims: 134 million
    from a sealed batch of 70 KB were 1.2 GB allocated before any check refused it (2**40 killed serve)."""
    registration = register(plane)
    forged = sealed_plaintext(registration, _earlier_snapshots_claiming(registration, 2**27))
    assert len(forged[1]) < 100 * 1024
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # counts what Arrow allocates from here on
    default = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        answer = post(plane, registration, forged)
    finally:
        pa.set_memory_pool(default)
    assert "buffer" in assert_problem(answer, 400)["detail"].lower()
    assert pool.max_memory() < 16 * 1024 * 1024
    assert stored(plane)["long_term"] == []


def _kind_column_reaching_past_its_data(end: int) -> bytes:
    """A length-framed Arrow stream whose one text value's end offset is forged to ``end`` bytes."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema({"kind": pa.string()})) as writer:
        writer.write_table(pa.table({"kind": ["ABCDEFGH"]}))
    stream = bytearray(sink.getvalue().to_pybytes())
    offsets = stream.rfind((0).to_bytes(4, "little") + (8).to_bytes(4, "little"), 0, stream.rfind(b"ABCDEFGH"))
    stream[offsets + 4 : offsets + 8] = end.to_bytes(4, "little")
    return len(stream).to_bytes(4, "big") + bytes(stream)


def test_an_offset_past_the_batch_reads_nothing_beyond_it(plane: ControlPlane) -> None:
    """A forged offset is refused before any kernel follows it: nothing of the server's memory comes back
    (and, 2 GiB further, no crash)."""
    registration = register(plane)
    answer = post(plane, registration, sealed_plaintext(registration, _kind_column_reaching_past_its_data(65_536)))
    detail = assert_problem(answer, 400)["detail"]
    assert "unreadable record table: In column 0: Invalid: Length spanned by binary offsets" in detail
    assert "ABCDEFGH" not in detail and len(detail) < 300


@pytest.mark.parametrize(
    "kind",
    [
        pa.array([["cluster_snapshot"]]),
        pa.array([{"kind": "cluster_snapshot"}]),
        pa.array([[("cluster_snapshot", 1)]], pa.map_(pa.string(), pa.int64())),
        pa.array([b"cluster_snapshot"]),
        pa.array(["cluster_snapshot"], pa.large_string()),
    ],
    ids=["list", "struct", "map", "binary", "large_string"],
)
def test_a_kind_column_of_another_type_is_400_not_500(plane: ControlPlane, kind: pa.Array) -> None:
    registration = register(plane)
    answer = post(plane, registration, sealed_by_hand(registration, [pa.table({"kind": kind}).to_batches()]))
    assert "kind column must hold text" in assert_problem(answer, 400)["detail"]
    with plane.client(registration["token"]) as cluster:  # and the connection still serves
        assert cluster.get("/v1/health").status_code == 200


def test_two_tables_of_one_kind_in_a_batch_are_400_and_store_nothing(plane: ControlPlane) -> None:
    """A batch framed by hand with two job tables: admission reads a batch by kind, and their segments
    would share an id (one table silently dropped as a replay, a lost job's late end let through)."""
    registration = register(plane)
    (first,) = tables_from_records([own(registration, "job", job_id="job-1")])
    (second,) = tables_from_records([own(registration, "job", job_id="job-2")])
    answer = post(plane, registration, sealed_by_hand(registration, [first.to_batches(), second.to_batches()]))
    assert "a second job table" in assert_problem(answer, 400)["detail"]
    assert all(records == [] for records in stored(plane).values())


@pytest.mark.parametrize("where", ["schema", "field", "nested field"])
def test_arrow_metadata_in_a_batch_is_400_and_stores_nothing(plane: ControlPlane, where: str) -> None:
    """Metadata is no record field, so no bound covered it: 7 MB of it went into every day's segment
    of both stores (a 7.5 MB batch filled 585 MB of disk)."""
    registration = register(plane)
    (table,) = tables_from_records([own(registration, "cluster_snapshot")])
    blob = {b"x": b"y" * 1_000}
    if where == "schema":
        table = table.replace_schema_metadata(blob)
    else:
        name = "kind" if where == "field" else "jobs_running"
        index = table.schema.get_field_index(name)
        field = table.schema.field(index)
        if where == "nested field":  # the running job's struct type, one level down
            struct = field.type.value_type
            tagged = pa.struct([struct.field(0).with_metadata(blob), *list(struct)[1:]])
            field = field.with_type(pa.list_(pa.field("item", tagged)))
        else:
            field = field.with_metadata(blob)
        table = pa.Table.from_arrays(table.columns, schema=table.schema.set(index, field))
    answer = post(plane, registration, sealed_by_hand(registration, [table.to_batches()]))
    assert "Arrow metadata" in assert_problem(answer, 400)["detail"]
    assert all(records == [] for records in stored(plane).values())


def test_batches_that_cannot_be_opened_are_audited_by_id_without_their_content(plane: ControlPlane) -> None:
    registration = register(plane)
    (table,) = tables_from_records([own(registration, "software_env", image="registry.acme/ann-private:1")])
    refused = {
        "compressed": sealed_by_hand(registration, [table.to_batches()], compression="zstd"),
        "malformed Arrow": sealed_plaintext(registration, (16).to_bytes(4, "big") + b"ann-private-bytes"),
        "bad framing": sealed_plaintext(registration, (1 << 20).to_bytes(4, "big") + b"short"),
    }
    for what, batch in refused.items():
        answer = post(plane, registration, batch)
        assert answer.status_code == 400, (what, answer.text)
    audited = rejections(plane)
    assert [entry["batch_id"] for entry in audited] == [batch_id for batch_id, _ in refused.values()]
    assert {entry["reason"] for entry in audited} == {"could not be opened"}
    assert "ann" not in repr(audited) and "acme" not in repr(audited)
    assert stored(plane)["long_term"] == []


def test_the_plugin_sets_a_batch_out_of_bounds_aside_and_never_retries_it(plane: ControlPlane, tmp_path: Path) -> None:
    registration = register(plane)
    delivery = HTTPDelivery(
        plane.url,
        registration["token"],
        load_public_key(registration["intake_public_key"]),
        cluster_id=registration["cluster_id"],
    )
    spool = Spool(tmp_path / "spool")
    emitter = Emitter(delivery, spool, retry_max=0.2)
    emitter.start()
    emitter.submit([own(registration, n_workers=-1)])
    assert emitter.close(timeout=30.0) is True
    delivery.close()
    assert (emitter.stats.batches_refused, emitter.stats.batches_delivered) == (1, 0)
    assert len(spool.refused_files()) == 1 and list((tmp_path / "spool").glob("*.batch")) == []
    assert len(rejections(plane)) == 1  # one attempt, never retried


# -- environments are per account; cluster tokens read nothing -----------------------------------


def test_another_account_cannot_reveal_replace_or_outdate_an_environment(plane: ControlPlane) -> None:
    acme, globex = register(plane, "acme", "ann"), register(plane, "globex", "bob")
    secret = {"image": "registry.acme/secret:1", "python_version": "3.11.9", "packages": {"acme-internal": "7.0"}}
    assert post(plane, acme, sealed(acme, own(acme, "software_env", env_id="x", **secret))).status_code == 202
    with plane.member("acme", "ann") as ann:
        (env,) = ann.get("/v1/software-envs").json()
        assert ann.patch(f"/v1/software-envs/{env['env_id']}", json={"visibility": "private"}).status_code == 200
    later = datetime.now(UTC) + timedelta(minutes=5)
    reports = [
        own(globex, "software_env", env_id=env["env_id"], **secret),  # the same id and content
        own(
            globex,
            "software_env",
            env_id=env["env_id"],
            image="evil",
            python_version="3.0",
            packages={},
            observed_at=later,
        ),
    ]
    assert post(plane, globex, sealed(globex, *reports)).status_code == 202
    with (
        plane.member("acme", "ann") as ann,
        plane.member("initech", "eve") as eve,
        plane.member("globex", "bob") as bob,
    ):
        listed = {e["env_id"]: e for e in ann.get("/v1/software-envs").json()}
        mine = listed[env["env_id"]]  # besides globex's two, public ones
        assert (mine["image"], mine["visibility"], len(listed)) == (secret["image"], "private", 3)
        assert env["env_id"] not in {e["env_id"] for e in eve.get("/v1/software-envs").json()}
        theirs = bob.get("/v1/software-envs").json()
        assert env["env_id"] not in {e["env_id"] for e in theirs} and len(theirs) == 2  # globex's own two records
        assert bob.patch(f"/v1/software-envs/{env['env_id']}", json={"visibility": "public"}).status_code == 404


@pytest.mark.parametrize(
    "path", ["/v1/software-envs", "/v1/records", "/v1/clusters", "/v1/erasure-requests", "/metrics"]
)
def test_a_cluster_token_reads_nothing(plane: ControlPlane, path: str) -> None:
    registration = register(plane)
    with plane.client(registration["token"]) as cluster:
        assert_problem(cluster.get(path), 403)


@pytest.mark.parametrize(
    ("offset", "status"),
    [
        (timedelta(minutes=-10), 202),
        (timedelta(minutes=-20), 400),
        (timedelta(minutes=10), 202),
        (timedelta(minutes=20), 400),
    ],
    ids=["skew-before-registration", "before-registration", "skew-ahead", "ahead"],
)
def test_timestamps_lie_within_the_clusters_life_give_or_take_the_clock_skew(
    plane: ControlPlane, offset: timedelta, status: int
) -> None:
    registration = register(plane)
    answer = post(plane, registration, sealed(registration, own(registration, observed_at=datetime.now(UTC) + offset)))
    assert answer.status_code == status, answer.text


def test_two_clusters_started_with_one_home_keep_their_spools_apart(plane: ControlPlane, tmp_path: Path) -> None:
    """A killed cluster's batches wait for ``spool replay`` with its config; the next cluster started on the
    same host (same home) used to replay them as its own, each refused (another cluster's) and set aside."""
    dead, live = register(plane), register(plane)
    home = tmp_path / "scheduler-host"

    def spool_of(registration: dict[str, Any]) -> Spool:
        with dask.config.set(cluster_settings(registration, home)):
            return Spool(Settings.from_config().spool_dir)

    spool_of(dead).append(*sealed(dead, own(dead, n_workers=1)))  # left by the killed scheduler
    delivery = HTTPDelivery(
        plane.url, live["token"], load_public_key(live["intake_public_key"]), cluster_id=live["cluster_id"]
    )
    emitter = Emitter(delivery, spool_of(live), retry_max=0.2)
    emitter.start()
    emitter.submit([own(live, n_workers=2)])
    assert emitter.close(timeout=30.0) is True
    delivery.close()
    assert (emitter.stats.batches_replayed, emitter.stats.batches_refused) == (0, 0) and rejections(plane) == []
    with dask.config.set(cluster_settings(dead, home)):
        replayed = run("spool", "replay", "--timeout", "20")
    assert replayed.exit_code == 0, replayed.output
    assert sorted(r["n_workers"] for r in stored(plane)["long_term"]) == [1, 2]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"kind": "job", "tasks_total": 1, "tasks_completed": 10**15}, "job.tasks_completed"),
        ({"kind": "job", "tasks_total": 4, "tasks_completed": 3, "tasks_erred": 2}, "job.tasks_completed"),
        ({"kind": "job", "status": "pwned"}, "job.status"),
        (
            {"jobs_running": [{"job_id": "j", "tasks_total": 1, "tasks_completed": 5}]},
            "cluster_snapshot.jobs_running tasks_completed",
        ),
    ],
    ids=["completed-over-total", "completed-and-erred-over-total", "unknown-status", "running-over-total"],
)
def test_a_job_whose_fields_disagree_is_400(plane: ControlPlane, record: dict[str, Any], field: str) -> None:
    """Each field in bounds, together impossible: 10^15 tasks completed of 1 would skew every usage report."""
    registration = register(plane)
    kind = record.pop("kind", "cluster_snapshot")
    answer = post(plane, registration, sealed(registration, own(registration, kind, **record)))
    assert field in assert_problem(answer, 400)["detail"]
    assert stored(plane)["long_term"] == []
