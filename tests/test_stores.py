"""One behaviour suite for every Store backend (see STORE_FACTORIES in conftest)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conftest import make_record, raw_at_rest

from pipeline.records import rows_from_table
from pipeline.runtime import seal_records
from pipeline.segments import open_segment
from pipeline.stores.cloud_logging import CloudLoggingStore

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _segments(keyring, *, account="acme", user=None, days=(0,), n=3):  # noqa: ANN001, ANN202
    records = [
        make_record(account=account, user=user, observed_at=T0 + timedelta(days=d, minutes=i), n_workers=i)
        for d in days
        for i in range(n)
    ]
    return seal_records(keyring, records)


def test_write_scan_round_trip_decrypts_exact_records(store, keyring) -> None:
    segments = _segments(keyring, days=(0, 1))
    assert store.write(segments) == 2
    scanned = list(store.scan())
    assert sorted(s.segment_id for s in scanned) == sorted(s.segment_id for s in segments)
    rows = [r for s in scanned for r in rows_from_table(open_segment(keyring, s))]
    assert sorted(r["n_workers"] for r in rows) == [0, 0, 1, 1, 2, 2]
    assert all(r["observed_at"].tzinfo is not None for r in rows)
    assert [s.min_observed_at for s in scanned] == sorted(s.min_observed_at for s in scanned)


def test_nothing_in_clear_at_rest(store, keyring, request) -> None:  # noqa: ANN001
    secrets = ["Plaintext Corp", "ann.lee@plaintext-corp.test", "registry.plaintext-corp.test/ann"]
    records = [
        make_record(account=secrets[0], user=secrets[1], observed_at=T0 + timedelta(days=d), n_workers=d)
        for d in (0, 1)
    ] + [make_record("software_env", account=secrets[0], user=secrets[1], observed_at=T0, image=secrets[2])]
    assert store.write(seal_records(keyring, records)) == 3
    raw = raw_at_rest(request, store)
    assert len(raw) > 1_000  # the reader sees the data, so the check below can fail
    for secret in secrets:
        assert secret.encode().lower() not in raw.lower(), f"{secret!r} in clear in {store.url}"
    rows = [r for s in store.scan() for r in rows_from_table(open_segment(keyring, s))]
    assert {r["account"] for r in rows} == {secrets[0]}  # there, inside the ciphertext


def test_write_is_idempotent(store, keyring) -> None:
    segments = _segments(keyring)
    assert store.write(segments) == 1
    again = store.write(segments)
    assert sum(s.n_records for s in store.scan()) == 3
    assert again == (1 if isinstance(store, CloudLoggingStore) else 0)  # it lists nothing to tell a replay


def test_scan_filters_by_subject_type_and_headers_only(store, keyring) -> None:
    store.write(_segments(keyring, account="acme") + _segments(keyring, account="globex"))
    acme = keyring.subject_ref("acme")
    found = list(store.scan(subject_ref=acme, with_payload=False))
    assert [s.subject_ref for s in found] == [acme]
    assert found[0].payload == b""
    assert list(store.scan(data_type="software_env")) == []


def test_expire_removes_only_what_is_older_than_the_limit(store, keyring) -> None:
    store.write(_segments(keyring, days=(0, 1, 2)))
    removed = store.expire("cluster_jobs", T0 + timedelta(days=1, hours=1))
    assert (removed.segments, removed.records) == (2, 6)
    left = list(store.scan())
    assert [s.min_observed_at for s in left] == [T0 + timedelta(days=2)]
    assert store.expire("software_env", T0 + timedelta(days=10)).segments == 0


def test_expire_leaves_a_straddling_segment_to_the_caller(store, keyring) -> None:
    store.write(_segments(keyring, n=3))  # records at 12:00, 12:01, 12:02
    assert store.expire("cluster_jobs", T0 + timedelta(minutes=1)).segments == 0
    assert len(list(store.scan())) == 1


def test_erase_account_and_single_user(store, keyring) -> None:
    store.write(
        _segments(keyring, account="acme", user="ann")
        + _segments(keyring, account="acme", user="bob")
        + _segments(keyring, account="globex")
    )
    acme = keyring.subject_ref("acme")
    removed = store.erase(acme, keyring.user_ref("acme", "ann"))
    assert (removed.segments, removed.records) == (1, 3)
    assert {s.user_ref for s in store.scan(subject_ref=acme)} == {keyring.user_ref("acme", "bob")}
    assert store.erase(acme).records == 3
    assert list(store.scan(subject_ref=acme)) == []
    assert len(list(store.scan())) == 1


def test_delete_by_id(store, keyring) -> None:
    segments = _segments(keyring, days=(0, 1))
    store.write(segments)
    assert store.delete([segments[0].segment_id]).segments == 1
    assert [s.segment_id for s in store.scan()] == [segments[1].segment_id]


def test_straddling_finds_only_segments_across_the_limit(store, keyring) -> None:
    store.write(_segments(keyring, days=(0, 1, 2), n=3))  # each day: 12:00, 12:01, 12:02
    cut = T0 + timedelta(days=1, minutes=1)
    found = list(store.straddling("cluster_jobs", cut))
    assert [(s.min_observed_at, s.max_observed_at) for s in found] == [
        (T0 + timedelta(days=1), T0 + timedelta(days=1, minutes=2))
    ]
    assert found[0].payload  # complete: the caller decrypts and rewrites it
    assert list(store.straddling("cluster_jobs", T0 + timedelta(days=1))) == []  # oldest == limit: kept whole
    assert list(store.straddling("software_env", cut)) == []


def test_a_stray_file_in_the_local_store_is_skipped_listed_and_left_in_place(tmp_path, keyring) -> None:  # noqa: ANN001
    from pipeline.stores.localfiles import LocalFileStore

    store = LocalFileStore(f"file://{tmp_path}/logs")
    written = _segments(keyring)
    store.write(written)
    stray = next((tmp_path / "logs").rglob("*.seg")).parent / "notes.seg"
    stray.write_text("not a segment")
    assert sorted(s.segment_id for s in store.scan()) == sorted(s.segment_id for s in written)
    assert store.foreign_files() == [str(stray)]
    assert store.erase(written[0].subject_ref).segments == len(written)
    assert stray.read_text() == "not a segment"
