"""Emitter and spool: bounded close, sealed spool files, replay, corrupt files, malformed records."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dask.config
from conftest import embedded_emitter, make_record, sealed_batch

from pipeline.config import Settings, spool_folder
from pipeline.delivery import EmbeddedDelivery
from pipeline.emitter import Emitter
from pipeline.errors import StoreUnavailable
from pipeline.principals import Principal
from pipeline.runtime import Pipeline
from pipeline.spool import Spool, SpooledBatch


def _ids(pipeline: Pipeline, store: str) -> Counter[str]:
    return Counter(r["record_id"] for r in pipeline.read_records(store))


def test_close_is_bounded_and_leaves_undelivered_batches_in_the_spool(home: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    with dask.config.set({"pipeline.cloud-logging.url": f"file://{blocked}/logs"}):
        settings = Settings.from_config()
    emitter = embedded_emitter(Pipeline.open(settings, create=True))
    emitter.submit([make_record() for _ in range(5)])
    emitter.submit([make_record("software_env", env_id="e1", packages={"dask": "1"})])
    deadline = time.monotonic() + 120  # a busy machine may take a while to try the first delivery
    while emitter.stats.delivery_failures < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert emitter.close(timeout=1.0) is False
    assert time.monotonic() - started < 60  # bounded (the thread is joined for timeout + 5 s), not a speed check
    left = sorted(settings.spool_dir.glob("*.batch"))
    assert left and emitter.stats.delivery_failures >= 1
    assert not _ids(Pipeline.open(settings), "long_term")  # its transaction comes last: nothing half-written

    blocked.unlink()  # the logging store is back: a new emitter replays, the retry rewrites nothing twice
    again = embedded_emitter(Pipeline.open(settings))
    assert again.close(timeout=10.0) is True
    assert again.stats.batches_replayed == len(left) == again.stats.batches_delivered
    assert list(settings.spool_dir.glob("*.batch")) == []
    pipeline = Pipeline.open(settings)
    for store in ("long_term", "cloud_logging"):
        ids = _ids(pipeline, store)
        assert len(ids) == 6 and max(ids.values()) == 1


def test_records_linger_to_share_one_batch_and_flush_or_close_seals_them_at_once(
    home: Path, settings: Settings
) -> None:
    pipeline = Pipeline.open(settings, create=True)
    emitter = embedded_emitter(pipeline, linger=3600.0)
    emitter.submit([make_record()])
    emitter.submit([make_record("software_env", env_id="e1", packages={"dask": "1"})])
    time.sleep(0.3)  # the thread is awake yet leaves the records to linger
    assert emitter.stats.batches_spooled == 0 and not list(settings.spool_dir.glob("*.batch"))
    assert emitter.flush(timeout=60.0) is True  # a flush does not wait out the hour
    assert (emitter.stats.batches_spooled, emitter.stats.records_sealed, emitter.stats.batches_delivered) == (1, 2, 1)

    emitter.submit([make_record() for _ in range(3)])
    emitter.submit([make_record()])
    assert emitter.close(timeout=60.0) is True  # nor does close: what lingered is delivered, in one batch
    assert (emitter.stats.batches_spooled, emitter.stats.records_sealed) == (2, 6)
    assert len(_ids(pipeline, "long_term")) == 6


class _SlowToForget(Spool):
    """A spool on a busy disk: forgetting a delivered batch (unlink, then sync the folder) takes a while."""

    def remove(self, batch: SpooledBatch) -> None:
        time.sleep(0.3)
        super().remove(batch)


def test_a_flush_returns_once_its_batches_are_delivered_and_out_of_the_spool(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    delivery = EmbeddedDelivery(lambda: pipeline, Principal.embedded_cluster("acme", None))
    emitter = Emitter(delivery, _SlowToForget(settings.spool_dir), linger=3600.0)
    emitter.start()
    for _ in range(3):
        emitter.submit([make_record()])
        assert emitter.flush(timeout=60.0) is True
        assert emitter.stats.batches_delivered == emitter.stats.batches_spooled  # not one still being forgotten
        assert list(settings.spool_dir.glob("*.batch")) == []
    assert emitter.close(timeout=60.0) is True and len(_ids(pipeline, "long_term")) == 3


def test_an_emitter_opens_nothing_until_its_first_batch_is_due(home: Path, settings: Settings) -> None:
    """A scheduler killed within its first linger spends no CPU on imports, the key or an earlier spool."""
    pipeline = Pipeline.open(settings, create=True)
    earlier = Spool(settings.spool_dir)
    earlier.append(
        "left-by-an-earlier-process", sealed_batch(pipeline, [make_record()], "left-by-an-earlier-process")[1]
    )
    opened: list[Pipeline] = []
    delivery = EmbeddedDelivery(lambda: opened.append(pipeline) or pipeline, Principal.embedded_cluster("acme", None))
    emitter = Emitter(delivery, Spool(settings.spool_dir), linger=3600.0)
    emitter.start()
    emitter.submit([make_record()])
    time.sleep(0.3)
    assert opened == [] and emitter.stats.batches_replayed == 0
    assert emitter.flush(timeout=60.0) is True  # due now: the key, the earlier batch and this one
    assert len(opened) == 1 and (emitter.stats.batches_replayed, emitter.stats.batches_delivered) == (1, 2)
    assert emitter.close(timeout=60.0) is True and len(_ids(pipeline, "long_term")) == 2


def test_records_are_sealed_and_spooled_while_the_keyring_is_unreachable_at_start(
    home: Path, settings: Settings
) -> None:
    pipeline = Pipeline.open(settings, create=True)
    earlier = embedded_emitter(pipeline)
    earlier.submit([make_record()])
    assert earlier.close(timeout=60.0) is True  # an earlier scheduler learnt the intake public key

    def unreachable() -> Pipeline:
        raise StoreUnavailable("metadata database unavailable: connection refused")

    down = Emitter(
        EmbeddedDelivery(unreachable, Principal.embedded_cluster("acme", None)),
        Spool(settings.spool_dir),
        retry_max=0.2,
    )
    down.start()
    down.submit([make_record() for _ in range(3)])
    assert down.close(timeout=2.0) is False  # nothing delivered, yet nothing left only in memory
    assert down.stats.records_sealed == 3 and len(list(settings.spool_dir.glob("*.batch"))) == 1

    again = embedded_emitter(pipeline)  # the database is back: the spool is replayed
    assert again.close(timeout=60.0) is True
    assert len(_ids(pipeline, "long_term")) == 4


def test_a_new_cluster_of_a_home_seals_and_spools_during_an_outage_with_the_homes_key(
    home: Path, settings: Settings
) -> None:
    """Each cluster spools in a folder of its own: a cluster started while the keyring was unreachable
    had no key remembered there, held its records in memory and lost them at close."""
    pipeline = Pipeline.open(settings, create=True)
    shared = spool_folder(settings.home, None)
    earlier = Emitter(
        EmbeddedDelivery(lambda: pipeline, Principal.embedded_cluster("acme", "cluster-a")),
        Spool(spool_folder(settings.home, "cluster-a"), key_folder=shared),
        retry_max=0.2,
    )
    earlier.start()
    earlier.submit([make_record(cluster_id="cluster-a")])
    assert earlier.close(timeout=60.0) is True

    def unreachable() -> Pipeline:
        raise StoreUnavailable("metadata database unavailable: connection refused")

    fresh = spool_folder(settings.home, "cluster-b")
    down = Emitter(
        EmbeddedDelivery(unreachable, Principal.embedded_cluster("acme", "cluster-b")),
        Spool(fresh, key_folder=shared),
        retry_max=0.2,
    )
    down.start()
    down.submit([make_record(cluster_id="cluster-b") for _ in range(3)])
    assert down.close(timeout=2.0) is False
    assert down.stats.records_sealed == 3 and len(list(fresh.glob("*.batch"))) == 1


def test_account_records_never_reach_the_logging_store(home: Path, settings: Settings) -> None:
    emitter = embedded_emitter(Pipeline.open(settings, create=True))
    emitter.submit([make_record("account", username="ann", email="ann@acme.test"), make_record()])
    assert emitter.close(timeout=10.0)
    pipeline = Pipeline.open(settings)
    assert sorted(r["kind"] for r in pipeline.read_records("long_term")) == ["account", "cluster_snapshot"]
    assert [r["kind"] for r in pipeline.read_records("cloud_logging")] == ["cluster_snapshot"]


def test_spool_files_hold_no_plaintext(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    secret = make_record("account", username="ann-secret-name", email="ann@acme.test")
    spool = Spool(settings.spool_dir)
    raw = spool.directory.joinpath(f"{spool.append(*sealed_batch(pipeline, [secret])).batch_id}.batch").read_bytes()
    for clear in (b"ann-secret-name", b"ann@acme.test", b"acme", secret["record_id"].encode()):
        assert clear not in raw


def test_corrupt_spool_file_is_set_aside_and_the_rest_delivered(home: Path, settings: Settings) -> None:
    spool = Spool(settings.spool_dir)
    (settings.spool_dir / "00000000000000000001-deadbeef.batch").write_bytes(b"PLSPOOL2 garbage")
    pipeline = Pipeline.open(settings, create=True)
    spool.append(*sealed_batch(pipeline, [make_record()]))
    emitter = embedded_emitter(pipeline)
    assert emitter.close(timeout=10.0)
    assert emitter.stats.corrupt_spool_files == 1
    assert [p.name for p in spool.corrupt_files()] == ["00000000000000000001-deadbeef.batch"]
    assert len(list(pipeline.read_records("cloud_logging"))) == 1


def test_a_spool_file_renamed_from_its_batch_is_set_aside_and_the_rest_sent(home: Path, settings: Settings) -> None:
    """A copy named ``00-é.batch`` could never be sent (its name is the Idempotency-Key, and not ASCII):
    it was retried for ever, and every batch behind it waited."""
    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    kept = spool.append(*sealed_batch(pipeline, [make_record()]))
    copy = settings.spool_dir / "00-é.batch"
    copy.write_bytes((settings.spool_dir / f"{kept.batch_id}.batch").read_bytes())
    emitter = embedded_emitter(pipeline)
    assert emitter.close(timeout=10.0)
    assert emitter.stats.corrupt_spool_files == 1
    assert [p.name for p in spool.corrupt_files()] == ["00-é.batch"]
    assert spool.pending_files() == [] and len(list(pipeline.read_records("cloud_logging"))) == 1


def test_spool_entries_that_are_no_regular_files_or_too_large_are_set_aside_unread(
    home: Path, settings: Settings
) -> None:
    """Code on a cluster writes its spool folder, and a dask-gateway delivers it after the scheduler stops:
    a FIFO named ``x.batch`` (or ``intake.pub``) held the reader's thread for an hour, six of them every new
    cluster's registration; a link to ``/dev/zero`` was read into memory (r26)."""
    import os

    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    kept = spool.append(*sealed_batch(pipeline, [make_record()]))
    os.mkfifo(settings.spool_dir / "00000000000000000001-fifo.batch")
    os.mkfifo(settings.spool_dir / "intake.pub")
    (settings.spool_dir / "00000000000000000002-zero.batch").symlink_to("/dev/zero")
    with open(settings.spool_dir / "00000000000000000003-huge.batch", "wb") as huge:
        huge.truncate(9 * 2**20)  # sparse: larger than any sealed batch
    emitter = embedded_emitter(pipeline)
    assert emitter.close(timeout=10.0)
    assert emitter.stats.corrupt_spool_files == 3
    assert [p.name for p in spool.corrupt_files()] == [
        "00000000000000000001-fifo.batch",
        "00000000000000000002-zero.batch",
        "00000000000000000003-huge.batch",
    ]
    assert spool.pending_files() == [] and [r["record_id"] for r in pipeline.read_records("cloud_logging")] == [
        r["record_id"] for r in pipeline.read_records("long_term")
    ]
    assert f"{kept.batch_id}.batch" not in os.listdir(settings.spool_dir)
    assert (settings.spool_dir / "intake.pub").is_file()  # the FIFO replaced by the key, never read


def test_a_batch_refused_for_good_is_set_aside_counted_and_not_retried(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    forged = spool.append(*sealed_batch(pipeline, [make_record(account="globex")]))
    emitter = embedded_emitter(pipeline)  # a cluster of acme replaying a batch naming globex
    emitter.submit([make_record()])
    assert emitter.close(timeout=10.0)
    assert emitter.stats.batches_refused == 1 and emitter.stats.batches_delivered == 1
    assert [p.name for p in spool.refused_files()] == [f"{forged.batch_id}.batch"]
    assert spool.pending_files() == []
    assert [r["account"] for r in pipeline.read_records("long_term")] == ["acme"]


def test_a_spooled_batch_of_a_name_ingest_refuses_is_set_aside_not_retried_for_ever(
    home: Path, settings: Settings
) -> None:
    """A plugin configured with a name holding a control character spooled batches that failed delivery for
    ever, and the batches of every later scheduler of its home waited behind them."""
    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    bad = spool.append(*sealed_batch(pipeline, [make_record(account="bad\tname")]))
    emitter = embedded_emitter(pipeline, account="bad\tname")  # the plugin that spooled it, started again
    assert emitter.close(timeout=10.0)
    assert emitter.stats.batches_refused == 1
    assert [p.name for p in spool.refused_files()] == [f"{bad.batch_id}.batch"]
    emitter = embedded_emitter(pipeline)  # the next scheduler of the home
    emitter.submit([make_record()])
    assert emitter.close(timeout=10.0) and spool.pending_files() == []
    assert [r["account"] for r in pipeline.read_records("long_term")] == ["acme"]


def test_a_malformed_record_is_dropped_and_counted_without_blocking_the_rest(home: Path, settings: Settings) -> None:
    emitter = embedded_emitter(Pipeline.open(settings, create=True))
    emitter.submit([make_record(n_workers="not a number"), make_record(n_workers=1)])
    assert emitter.flush(10)
    emitter.submit([make_record(n_workers=2)])
    assert emitter.close(timeout=10.0)
    assert emitter.stats.records_dropped == 1
    assert sorted(r["n_workers"] for r in Pipeline.open(settings).read_records("long_term")) == [1, 2]


def test_each_outage_is_logged_once_and_so_is_its_end(home: Path, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """The warning of a second outage was never logged: it read the same as the first one's."""
    blocked = tmp_path / "blocked"
    with dask.config.set({"pipeline.cloud-logging.url": f"file://{blocked}/logs"}):
        settings = Settings.from_config()
    emitter = embedded_emitter(Pipeline.open(settings, create=True))
    with caplog.at_level(logging.INFO, logger="pipeline.emitter"):
        for _outage in range(2):
            shutil.rmtree(blocked, ignore_errors=True)
            blocked.write_text("not a folder")  # the logging store is unreachable
            failures = emitter.stats.delivery_failures
            emitter.submit([make_record()])
            deadline = time.monotonic() + 120
            while emitter.stats.delivery_failures < failures + 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            blocked.unlink()
            assert emitter.flush(timeout=60.0) is True
    assert emitter.close(timeout=10.0) is True
    said = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "pipeline.emitter"]
    assert said == ["metadata emitter could not deliver a batch", "metadata emitter delivers again"] * 2


def test_a_spool_write_that_fails_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A full disk: every retry of the emitter (every 0.1 s) left an empty ``.tmp`` file, 158 in 40 s."""
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from pipeline.spool import Spool\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a file past 4 KiB: EFBIG, as a full disk\n"
        "spool = Spool(Path(sys.argv[1]))\n"
        "try:\n"
        "    spool.append('00000000000000000001-000000000001', b'x' * 100_000)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script, str(tmp_path / "spool")], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.strip() == str(errno.EFBIG), ran.stderr
    assert list((tmp_path / "spool").iterdir()) == []
