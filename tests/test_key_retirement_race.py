"""No data key is wrapped under a superseded master key version (issue 19).

A data key created while the rotation that follows an erasure runs was wrapped
under the old version: that version then never retired, and the receipt's
``final_at`` promised a date on which nothing happened.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import make_record
from freezegun import freeze_time
from sqlalchemy import select

from pipeline.config import Settings
from pipeline.db import keyring_keys
from pipeline.retention.enforcer import enforce
from pipeline.retention.requests import file_request, not_final, process_pending
from pipeline.runtime import Pipeline

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _wrapped_under(pipeline: Pipeline) -> set[int]:
    with pipeline.keyring.engine.connect() as conn:
        return set(conn.scalars(select(keyring_keys.c.master_version).where(keyring_keys.c.wrapped.is_not(None))))


def test_keys_created_during_the_rotation_after_an_erasure_never_hold_back_retirement(database: str) -> None:
    with freeze_time(T0):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
        pipeline.write_records([make_record(account="acme", user="ann"), make_record(account="globex")])
        for n in range(300):  # enough live keys that the re-wrap takes a while
            pipeline.keyring.cipher(pipeline.keyring.subject_ref(f"warm-{n}"))

        stop, created, errors = threading.Event(), [], []

        def create_keys(worker: int) -> None:
            n = 0
            while not stop.is_set() or n < 5:
                try:
                    pipeline.keyring.cipher(pipeline.keyring.subject_ref(f"new-{worker}-{n}"))
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return
                created.append((worker, n))
                n += 1

        threads = [threading.Thread(target=create_keys, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        try:
            file_request(pipeline, "acme", "ann")
            [done] = process_pending(pipeline)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert errors == [] and done.state == "completed", (errors, done.error)
        assert len(created) >= 20

    current = max(v.version for v in pipeline.keyring.master_versions())
    assert _wrapped_under(pipeline) == {current}  # not one key left under the superseded version

    [final] = not_final(pipeline)
    assert final.final_at == T0 + timedelta(days=35)
    with freeze_time(final.final_at + timedelta(minutes=1)):
        assert enforce(pipeline).retired_master_versions == [current - 1]
        assert not_final(pipeline) == []


def test_a_key_an_older_release_left_under_a_superseded_version_is_re_wrapped_before_retirement(home: Path) -> None:
    from sqlalchemy import update

    from pipeline.keys import _aad

    with freeze_time(T0):
        pipeline = Pipeline.open(Settings.from_config(), create=True)
        pipeline.write_records([make_record(account="globex", n_workers=8)])
        pipeline.keyring.rotate_master()
        ref = pipeline.keyring.subject_ref("globex")
        version, _ = pipeline.keyring.cipher(ref)
        with pipeline.keyring.engine.begin() as conn:  # what the race left behind before this release
            row = conn.execute(select(keyring_keys).where(keyring_keys.c.key_id == ref)).one()
            key = pipeline.keyring.provider.unwrap(row.master_version, row.wrapped, _aad(ref, version))
            _, old = pipeline.keyring.provider.wrap(key, _aad(ref, version), 1)
            conn.execute(update(keyring_keys).where(keyring_keys.c.key_id == ref).values(master_version=1, wrapped=old))
    assert 1 in _wrapped_under(pipeline)

    with freeze_time(T0 + timedelta(days=35, minutes=1)):
        assert enforce(pipeline).retired_master_versions == [1]
    assert _wrapped_under(pipeline) == {2}
    assert pipeline.audit.last("key.rewrapped").details["keys_rewrapped"] == 1
    assert [r["n_workers"] for r in Pipeline.open().read_records(account="globex")] == [8]


def test_a_key_destroyed_while_a_rotation_re_wraps_stays_destroyed(pipeline: Pipeline, monkeypatch) -> None:  # noqa: ANN001
    """On PostgreSQL the erasure's destroy committed between the rotation's read of the live keys and its
    update, which wrapped the old key again: the request completed, its key live and its data readable."""
    keyring = pipeline.keyring
    victim = keyring.subject_ref("victim")
    keyring.cipher(victim)
    rewrap, destroyed = keyring.provider.rewrap, []
    eraser = threading.Thread(target=lambda: destroyed.append(keyring.destroy(victim)))

    def destroy_meanwhile(*args):  # noqa: ANN002, ANN202
        eraser.start()
        eraser.join(timeout=2)  # it commits now, or waits for the rotation to commit
        return rewrap(*args)

    monkeypatch.setattr(keyring.provider, "rewrap", destroy_meanwhile)
    keyring.rotate_master()
    eraser.join()
    assert destroyed == [1]
    assert keyring.key_state(victim) == "destroyed"
