"""HPKE sealing of batches: round trip, and every way an attacker might alter or relabel one."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pytest
from conftest import make_record
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pipeline.errors import ConfigError, IntakeError
from pipeline.intake import (
    _SUITE,
    MAGIC,
    MAX_SEALED_BYTES,
    _frames,
    _info,
    intake_private_key,
    load_public_key,
    open_batch,
    public_key_text,
    seal_batch,
)
from pipeline.records import rows_from_table, table_from_rows

BATCH = "00000000000000000042-abcdef123456"


@pytest.fixture
def key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def test_round_trip_keeps_every_field(key: X25519PrivateKey) -> None:
    records = [
        make_record(n_workers=3, tasks_by_state={"memory": 2}),
        make_record("job", job_id="j", started_at=make_record()["observed_at"], task_prefixes=["inc"]),
    ]
    public = load_public_key(public_key_text(key))
    opened = open_batch(key, seal_batch(public, BATCH, records))
    assert opened.batch_id == BATCH and opened.n_records == 2
    assert [row for table in opened.tables for row in rows_from_table(table)] == records


def test_the_intake_key_lives_in_the_keyring_and_is_stable(keyring) -> None:  # noqa: ANN001
    first = public_key_text(intake_private_key(keyring))
    assert first == public_key_text(intake_private_key(keyring))
    assert first.startswith("mp-intake-x25519:") and len(first) < 80


def test_a_relabelled_batch_does_not_open(key: X25519PrivateKey) -> None:
    sealed = seal_batch(key.public_key(), BATCH, [make_record()])
    other = BATCH.replace("42", "43")
    relabelled = sealed.replace(BATCH.encode(), other.encode(), 1)
    with pytest.raises(IntakeError, match=f"batch {other} does not decrypt: altered, relabelled"):
        open_batch(key, relabelled)


def test_a_flipped_byte_does_not_open(key: X25519PrivateKey) -> None:
    sealed = bytearray(seal_batch(key.public_key(), BATCH, [make_record()]))
    sealed[-5] ^= 1
    with pytest.raises(IntakeError, match="does not decrypt"):
        open_batch(key, bytes(sealed))


def test_a_batch_sealed_to_another_key_does_not_open(key: X25519PrivateKey) -> None:
    sealed = seal_batch(X25519PrivateKey.generate().public_key(), BATCH, [make_record()])
    with pytest.raises(IntakeError, match="sealed to another intake key"):
        open_batch(key, sealed)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "bad magic"),
        (b"GET / HTTP/1.1", "bad magic"),
        (MAGIC + bytes([5]) + b"a/b\n!", "bad batch id header"),
        (MAGIC + bytes([3]) + b"abc", "bad batch id header"),
        (MAGIC + bytes([3]) + b"abc" + b"x" * 40, "does not decrypt"),
    ],
)
def test_malformed_bodies_are_one_clear_error(key: X25519PrivateKey, body: bytes, message: str) -> None:
    with pytest.raises(IntakeError, match=message):
        open_batch(key, body)


def test_an_oversized_batch_is_refused_naming_the_limit(key: X25519PrivateKey) -> None:
    with pytest.raises(IntakeError, match=f"exceeds the limit of {MAX_SEALED_BYTES} bytes"):
        open_batch(key, MAGIC + b"\x01a" + b"\0" * MAX_SEALED_BYTES)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (make_record(kind="cluster_snapshot", n_workers="many"), "wrong type"),
        ({**make_record(), "kind": "secrets"}, "record 0: unknown record kind 'secrets'"),
        ("not a record", "record 0: unknown record kind None"),
        ({**make_record(), "account": None}, "cluster_snapshot record lacks account"),
        ({**make_record(), "data_type": "account"}, "has a data_type other than 'cluster_jobs'"),
        ({**make_record(), "observed_at": "2026-01-01T00:00:00Z"}, "wrong type"),
    ],
)
def test_the_cluster_side_refuses_to_seal_a_malformed_record(key: X25519PrivateKey, record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        seal_batch(key.public_key(), BATCH, [record])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({**make_record(), "kind": ["cluster_snapshot"]}, "record 2: unknown record kind ['cluster_snapshot']"),
        ("not a record", "record 2: unknown record kind None"),
        ({**make_record(), "kind": "secrets"}, "record 2: unknown record kind 'secrets'"),
    ],
)
def test_a_malformed_record_among_good_ones_is_named_by_its_position(
    key: X25519PrivateKey, bad: object, message: str
) -> None:
    """Records are grouped by kind with one check per distinct type and kind: the one that fails is still
    named (a kind that is a list was an unhashable-type traceback)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        seal_batch(key.public_key(), BATCH, [make_record(), make_record(kind="job"), bad, make_record()])


def _forged(key: X25519PrivateKey, *tables: pa.Table, plaintext: bytes | None = None) -> bytes:
    """What a forger who skips the cluster-side checks could send."""
    if plaintext is None:
        plaintext = _frames(tables)
    header = MAGIC + bytes([len(BATCH)]) + BATCH.encode()
    return header + _SUITE.encrypt(plaintext, key.public_key(), info=_info(BATCH))


def _snapshot_table(**columns: Any) -> pa.Table:
    table = table_from_rows("cluster_snapshot", [make_record()])
    for name, value in columns.items():
        field = table.schema.field(name)
        table = table.set_column(table.schema.get_field_index(name), field, pa.array([value], field.type))
    return table


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([_snapshot_table(data_type="account")], "has a data_type other than 'cluster_jobs'"),
        ([_snapshot_table(account=None)], "cluster_snapshot record lacks account"),
        ([_snapshot_table(kind="job")], "job table does not match the job record schema"),
        ([pa.table({"kind": ["cluster_snapshot"], "password": ["x"]})], "does not match the cluster_snapshot"),
        ([pa.table({"n_workers": [1]})], "must be non-empty and have one kind column"),
        ([pa.table({"kind": ["secrets"]})], "one known record kind, got ['secrets']"),
        ([_snapshot_table().slice(0, 0)], "must be non-empty"),
        ([], "no records"),
    ],
)
def test_a_forged_batch_is_checked_against_the_record_schemas(
    key: X25519PrivateKey, tables: list[pa.Table], message: str
) -> None:
    with pytest.raises(IntakeError, match=f"batch {BATCH}: .*{re.escape(message)}"):
        open_batch(key, _forged(key, *tables))


def test_a_batch_of_an_earlier_releases_plugin_opens_with_the_fields_added_since_as_nulls(
    key: X25519PrivateKey,
) -> None:
    """Its snapshots lack ``jobs_running`` and its job ends ``status``: every such batch was refused
    (400), and the plugin set it aside for good, while its clusters ran on through an upgrade."""
    snapshot = table_from_rows("cluster_snapshot", [make_record(n_workers=2)]).drop_columns(["jobs_running"])
    job = table_from_rows("job", [make_record("job", job_id="j", tasks_total=3)]).drop_columns(["status"])
    opened = open_batch(key, _forged(key, snapshot, job))
    rows = [row for table in opened.tables for row in rows_from_table(table)]
    assert [(r["kind"], r.get("n_workers"), r.get("tasks_total")) for r in rows] == [
        ("cluster_snapshot", 2, None),
        ("job", None, 3),
    ]
    assert (rows[0]["jobs_running"], rows[1]["status"]) == (None, None)
    middle = table_from_rows("cluster_snapshot", [make_record()]).drop_columns(["n_workers"])  # no release sent it
    with pytest.raises(IntakeError, match="cluster_snapshot table does not match the cluster_snapshot record schema"):
        open_batch(key, _forged(key, middle))


@pytest.mark.parametrize(
    ("plaintext", "message"),
    [
        (b"\x00\x00\x00\x10short", "truncated record table"),
        (b"\x00\x00\x00\x05hello", "unreadable record table"),
        (b"\x00\x00\x00\x00", "truncated record table"),
    ],
)
def test_garbage_inside_a_sealed_batch_is_one_clear_error(
    key: X25519PrivateKey, plaintext: bytes, message: str
) -> None:
    with pytest.raises(IntakeError, match=f"batch {BATCH}: {message}"):
        open_batch(key, _forged(key, plaintext=plaintext))


@pytest.mark.parametrize(
    "text", ["", "mp-intake-x25519:", "mp-intake-x25519:!!!", "ssh-ed25519 AAAA", "mp-intake-x25519:AAAA"]
)
def test_a_bad_public_key_setting_names_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match="pipeline.ingest.public-key"):
        load_public_key(text)
