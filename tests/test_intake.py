"""HPKE sealing of batches: round trip, and every way an attacker might alter or relabel one."""

from __future__ import annotations

import pytest
from conftest import make_record
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pipeline.errors import ConfigError, IntakeError
from pipeline.intake import (
    MAGIC,
    MAX_SEALED_BYTES,
    intake_private_key,
    load_public_key,
    open_batch,
    public_key_text,
    seal_batch,
)

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
    assert opened.batch_id == BATCH
    assert opened.records == records


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
        ({**make_record(), "password": "x"}, "record 0: cluster_snapshot record has unknown field"),
        ({**make_record(), "account": None}, "record 0: cluster_snapshot record lacks account"),
        ({**make_record(), "data_type": "account"}, "has data_type 'account', expected 'cluster_jobs'"),
        ({**make_record(), "observed_at": "yesterday"}, "observed_at 'yesterday' is not an ISO 8601"),
        ({**make_record(), "observed_at": "2026-01-01T00:00:00"}, "must be a timestamp with a time zone"),
    ],
)
def test_records_are_validated_against_their_schema(key: X25519PrivateKey, record: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # the cluster side refuses to seal it ...
        seal_batch(key.public_key(), BATCH, [record])
    from pipeline.intake import _SUITE, _info

    forged = MAGIC + bytes([len(BATCH)]) + BATCH.encode()  # ... and a forger sealing it by hand is refused on open
    body = __import__("json").dumps([record], default=str).encode()
    with pytest.raises(IntakeError, match=f"batch {BATCH}: "):
        open_batch(key, forged + _SUITE.encrypt(body, key.public_key(), info=_info(BATCH)))


@pytest.mark.parametrize(
    "text", ["", "mp-intake-x25519:", "mp-intake-x25519:!!!", "ssh-ed25519 AAAA", "mp-intake-x25519:AAAA"]
)
def test_a_bad_public_key_setting_names_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match="pipeline.ingest.public-key"):
        load_public_key(text)
