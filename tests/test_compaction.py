"""Compaction of the local logging store: closed days merged, nothing lost or doubled, even on a crash."""

from __future__ import annotations

import functools
import os
import stat
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import make_record

from pipeline.errors import StoreRefused
from pipeline.records import rows_from_table
from pipeline.retention import enforcer
from pipeline.runtime import Pipeline, seal_records
from pipeline.segments import open_segment
from pipeline.stores import localfiles
from pipeline.stores.localfiles import LocalFileStore

NOW = datetime(2026, 1, 3, 9, 0, tzinfo=UTC)
DAYS = (NOW - timedelta(days=2), NOW - timedelta(days=1), NOW)  # two closed days and today


@pytest.fixture
def pipeline(settings) -> Pipeline:  # noqa: ANN001
    """Hourly deliveries for two accounts (one with two users) on two closed days and today."""
    pipeline = Pipeline.open(settings, create=True)
    store = pipeline.stores["cloud_logging"]
    for day in DAYS:
        for hour in range(8):
            at = day.replace(hour=hour)
            records = [
                make_record(account="acme", user="ann", observed_at=at, n_workers=hour),
                make_record(account="acme", user="bob", observed_at=at, n_workers=hour),
                make_record(account="globex", observed_at=at, n_workers=hour),
                make_record("job", account="globex", observed_at=at, tasks_total=hour),
            ]
            store.write(seal_records(pipeline.keyring, records))
    return pipeline


def _store(pipeline: Pipeline) -> LocalFileStore:
    store = pipeline.stores["cloud_logging"]
    assert isinstance(store, LocalFileStore)
    return store


def _records(pipeline: Pipeline, *, damaged: str = "") -> Counter[str]:
    """Every record id the store yields, with how often (each must be 1); the ``damaged`` segment skipped."""
    fresh = LocalFileStore(_store(pipeline).url)  # what a process started after a crash sees
    intact = (s for s in fresh.scan() if s.segment_id != damaged)
    return Counter(r["record_id"] for s in intact for r in rows_from_table(open_segment(pipeline.keyring, s)))


def _files_per_folder(store: LocalFileStore, day: datetime) -> list[int]:
    folder = store.root / "cluster_jobs" / day.strftime("%Y-%m-%d")
    return sorted(len(list(sub.glob("*.seg"))) for sub in folder.iterdir() if sub.is_dir())


def _compact(pipeline: Pipeline):  # noqa: ANN202
    today = NOW.replace(hour=0)
    return _store(pipeline).compact(today, functools.partial(enforcer._merge, pipeline))


def test_closed_days_become_one_file_per_subject_kind_and_user(pipeline: Pipeline) -> None:
    before = _records(pipeline)
    store = _store(pipeline)
    assert _files_per_folder(store, DAYS[0]) == [16, 16]  # acme: 8 x ann + 8 x bob; globex: 8 x 2 kinds
    merged = _compact(pipeline)
    assert (merged.segments, merged.records) == (64, 64)
    assert _files_per_folder(store, DAYS[0]) == [2, 2] and _files_per_folder(store, DAYS[1]) == [2, 2]
    assert _files_per_folder(store, DAYS[2]) == [16, 16]  # today is still being written: left alone
    assert _records(pipeline) == before and set(before.values()) == {1}
    assert _compact(pipeline).segments == 0  # a second run has nothing to do
    expired = store.expire("cluster_jobs", DAYS[2].replace(hour=0))
    assert expired.records == sum(1 for r in before) * 2 // 3  # the two closed days, counted from names


def test_a_replayed_delivery_after_compaction_is_not_doubled(pipeline: Pipeline) -> None:
    store = _store(pipeline)
    old = list(store.scan(data_type="cluster_jobs"))
    _compact(pipeline)
    before = _records(pipeline)
    assert store.write([s for s in old if s.max_observed_at < DAYS[2].replace(hour=0)]) == 0
    assert _records(pipeline) == before


class Crash(Exception):
    pass


def _crash_after_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LocalFileStore, "write", lambda self, segments: (_ for _ in ()).throw(Crash()))


def _crash_after_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localfiles, "_settle", lambda folder, journal: (_ for _ in ()).throw(Crash()))


def _crash_mid_unlink(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.unlink
    calls = Counter[str]()

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".seg"):
            calls["seg"] += 1
            if calls["seg"] == 3:
                raise Crash()
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)


def _crash_between_merged_files(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.link
    calls = Counter[str]()

    def link(src: str, dst: str) -> None:
        calls["link"] += 1
        if calls["link"] == 2:  # the first merge of the folder landed, the second did not
            raise Crash()
        real(src, dst)

    monkeypatch.setattr(os, "link", link)


@pytest.mark.parametrize(
    "crash", [_crash_after_journal, _crash_between_merged_files, _crash_after_link, _crash_mid_unlink]
)
def test_a_crash_at_any_point_loses_and_doubles_nothing(pipeline: Pipeline, monkeypatch, crash) -> None:  # noqa: ANN001
    before = _records(pipeline)
    with monkeypatch.context() as patch:
        crash(patch)
        with pytest.raises(Crash):
            _compact(pipeline)
    assert _records(pipeline) == before  # a process started after the crash sees each record once
    _compact(pipeline)  # the next pass finishes the job
    assert _records(pipeline) == before
    assert _files_per_folder(_store(pipeline), DAYS[0]) == [2, 2]
    assert not [p for p in _store(pipeline).root.rglob(".compacting")]


def test_a_retention_pass_compacts_and_audits_it(pipeline: Pipeline) -> None:
    report = enforcer.enforce(pipeline, NOW)
    assert report.compacted["cloud_logging"].segments == 64
    entry = pipeline.audit.last("retention.pass")
    assert entry.details["compacted"] == {"cloud_logging": {"segments": 64, "records": 64}}
    assert "compacted 64 segments" in report.summary()


def test_compaction_files_are_owner_only_and_never_foreign(pipeline: Pipeline, monkeypatch) -> None:  # noqa: ANN001
    store = _store(pipeline)
    old = os.umask(0o022)
    try:
        with monkeypatch.context() as patch:
            _crash_after_journal(patch)  # leaves a journal and the day's merged ids behind
            with pytest.raises(Crash):
                _compact(pipeline)
        own = {p.name for p in store.root.rglob(".*")}
        assert {".compacting", ".merged-ids"} <= own
        _compact(pipeline)
    finally:
        os.umask(old)
    written = [store.root, *store.root.rglob("*")]
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in written if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert wrong == {}
    fresh = LocalFileStore(store.url)
    assert sum(1 for _ in fresh.scan()) > 0 and fresh.foreign_files() == []
    report = enforcer.enforce(pipeline, NOW)
    assert report.foreign_files == {} and "foreign" not in report.summary()


def test_a_damaged_file_with_a_segment_name_is_neither_merged_nor_removed(pipeline: Pipeline) -> None:
    """Not foreign: its name is a segment's, so readers name it unreadable (tests/test_damaged_segment_files.py)."""
    store = _store(pipeline)
    before = _records(pipeline)
    folder = next(p for p in (store.root / "cluster_jobs" / DAYS[0].strftime("%Y-%m-%d")).iterdir() if p.is_dir())
    stray = folder / f"{'f' * 32}~{next(folder.glob('*.seg')).name.split('~', 1)[1]}"  # a name like its neighbours'
    stray.write_text("not a segment\n")
    merged = _compact(pipeline)
    assert merged.segments == 64  # the 64 real ones of the two closed days
    assert stray.read_text() == "not a segment\n"
    assert store.foreign_files() == []
    assert _records(pipeline, damaged="f" * 32) == before


@pytest.mark.parametrize(("step", "erased_as"), [("compact", "seal"), ("cut", "open_segment")])
def test_an_erasure_finishing_mid_rewrite_leaves_nothing_readable(
    pipeline: Pipeline, monkeypatch, step, erased_as
) -> None:  # noqa: ANN001
    """The erasure of ann completes while the pass rewrites her segments (the request job of ``serve`` runs
    beside its retention job), after it read them or as it seals: the rewrite must not seal them anew."""
    from pipeline.retention.requests import file_request, process_pending

    file_request(pipeline, "acme", "ann")
    read, seal, erased = enforcer.open_segment, enforcer.seal, []

    def erase_if_ann(table) -> None:  # noqa: ANN001
        if not erased and table.column("user")[0].as_py() == "ann":
            erased.extend(process_pending(pipeline))

    def read_then_erase(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        table = read(*args, **kwargs)
        erase_if_ann(table)
        return table

    def erase_then_seal(keyring, subject_ref, user_ref, table, **kwargs):  # noqa: ANN001, ANN003, ANN202
        erase_if_ann(table)
        return seal(keyring, subject_ref, user_ref, table, **kwargs)

    hooks = {"open_segment": read_then_erase, "seal": erase_then_seal}
    monkeypatch.setattr(enforcer, erased_as, hooks[erased_as])
    store = _store(pipeline)
    if step == "compact":
        enforcer._compact(pipeline, enforcer.RetentionReport(NOW), "cloud_logging", store, NOW)
    else:
        [segment, *_] = [s for s in store.scan() if s.user_ref == pipeline.keyring.user_ref("acme", "ann")]
        enforcer._cut(pipeline, store, segment, segment.max_observed_at)
    assert [r.state for r in erased] == ["completed"]
    assert [r for r in pipeline.read_records("cloud_logging", account="acme") if r["user"] == "ann"] == []


def _immutable(path: Path) -> bool:
    """Make ``path`` immutable (``chattr +i``, as an operator may); whether the file system allows it."""
    import shutil
    import subprocess

    chattr = shutil.which("chattr")
    return chattr is not None and subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0


def test_a_merged_file_the_system_will_not_remove_is_left_out_and_every_read_goes_on(pipeline: Pipeline) -> None:
    """Compaction's settling unlinked each source as every listing began: one it could not remove (a file
    made immutable) failed every read of the store, ``records`` and ``report`` alike, from then on."""
    import subprocess

    before = _records(pipeline)
    store = _store(pipeline)
    folder = store.root / "cluster_jobs" / DAYS[0].strftime("%Y-%m-%d")
    source = sorted(next(iter(folder.iterdir())).glob("*.seg"))[0]
    if not _immutable(source):
        pytest.skip("chattr +i is not available here")
    try:
        merged = _compact(pipeline)
        assert merged.segments == 64  # every merge landed; the one source stays
        assert source.exists()
        assert _records(pipeline) == before  # its records once: in the merge
        assert _compact(pipeline).segments == 0  # its folder is left as it is (its journal must stay)
        owner = localfiles._Name.parse(source.name)
        assert owner is not None
        with pytest.raises(StoreRefused, match="Operation not permitted"):  # its subject erased: named, not left
            store.erase(source.parent.name, owner.user_ref)
        assert set(_records(pipeline).values()) == {1}  # each record once: the merge still hides it
    finally:
        subprocess.run(["chattr", "-i", str(source)], check=True)
    assert set(_records(pipeline).values()) == {1} and not source.exists()  # settled by the next listing


def _held(path: Path, how: str) -> bool:
    """Hold ``path`` as an operator may (immutable, or a read-only bind mount on itself); whether it could."""
    import subprocess

    if how == "immutable":
        return _immutable(path)
    bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if bound and subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
        _released(path, how)
        return False
    return bound


def _released(path: Path, how: str) -> None:
    import subprocess

    subprocess.run(["chattr", "-i", str(path)] if how == "immutable" else ["umount", str(path)], check=True)


@pytest.mark.parametrize(
    ("held", "how"), [("a file", "immutable"), ("its folder (r40)", "immutable"), ("its folder (r41)", "a mount")]
)
def test_a_file_the_system_will_not_remove_keeps_no_other_from_expiring(
    pipeline: Pipeline, held: str, how: str
) -> None:
    """Expiry stopped at the first file it could not remove (one account's, made immutable for a legal hold):
    every other account's records of that day and of every later day past the limit stayed, and what the pass
    had removed was counted nowhere (r37). A hold on the account's folder stopped it at the folder: immutable
    (r40), or a read-only mount, which ``rmdir`` calls busy (r41)."""
    store = _store(pipeline)
    before = _records(pipeline)
    folder = store.root / "cluster_jobs" / DAYS[0].strftime("%Y-%m-%d") / pipeline.keyring.subject_ref("acme")
    kept = sorted(folder.glob("*.seg"))[:1] if held == "a file" else sorted(folder.glob("*.seg"))
    path = kept[0] if held == "a file" else folder
    if not _held(path, how):
        pytest.skip(f"{how} is not available here")
    try:
        report = enforcer.enforce(pipeline, now=NOW + timedelta(days=31))  # every day past the 30-day limit
        # a held folder takes no compaction journal either: that step fails too, named
        assert set(report.failed_steps) - {"compact:cloud_logging"} == {"expire:cloud_logging/cluster_jobs"}
        assert report.failed_steps["expire:cloud_logging/cluster_jobs"].startswith(
            f"{len(kept) + (held != 'a file')} path(s) past the limit not removed; the first: {kept[0]}: "
            + ("Operation not permitted" if how == "immutable" else "Read-only file system")
        )
        assert sorted(store.root.rglob("*.seg")) == kept  # every other file went
        removed = report.removed["cloud_logging"]["cluster_jobs"]
        assert removed.records == removed.segments == len(before) - len(kept)  # one record a file
    finally:
        _released(path, how)
    assert enforcer.enforce(pipeline, now=NOW + timedelta(days=31)).failed_steps == {}
    assert not list(store.root.rglob("*.seg"))


def test_a_day_past_the_bound_is_merged_into_several_segments_each_within_it(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of a subject's day went into one merge, read whole: a cluster sending large batches all day
    had compaction, and every report reading the merge, hold the day in memory (GBs on a 2 GB day)."""
    before = _records(pipeline)
    store = _store(pipeline)
    folder = store.root / "cluster_jobs" / DAYS[0].strftime("%Y-%m-%d")
    sources = [p.stat().st_size for p in folder.rglob("*.seg")]
    bound = 3 * max(sources)  # a run of at least 3 of a group's 8 files
    monkeypatch.setattr(localfiles, "MAX_MERGED_BYTES", bound)
    _compact(pipeline)
    merged = [p.stat().st_size for p in folder.rglob("*.seg")]
    assert 2 * 2 * 2 <= len(merged) < len(sources)  # every group of 8 in at least 2 merges, fewer files
    assert max(merged) <= bound
    assert _records(pipeline) == before
    _compact(pipeline)  # merges that fit together are merged again: never past the bound
    assert max(p.stat().st_size for p in folder.rglob("*.seg")) <= bound
    assert _records(pipeline) == before


def _killed_write(store: LocalFileStore, segment) -> Path:  # noqa: ANN001
    """What a write killed before its link leaves: the segment's header and ciphertext under a temporary name."""
    path = store._path(segment)
    leftover = path.parent / f".tmp-{uuid.uuid4().hex}"
    leftover.write_bytes(localfiles._header(segment) + b"\n" + segment.payload)
    return leftover


@pytest.mark.parametrize("by", ["user erasure", "account erasure", "expiry"])
def test_a_write_killed_before_its_link_leaves_nothing_past_an_erasure_or_expiry(pipeline: Pipeline, by: str) -> None:
    """A ``serve`` killed between writing a segment's temporary file and linking it left the file: hidden from
    listings, it outlived the erasure of its user (a completed receipt) and every expiry of its day."""
    store = _store(pipeline)
    [ann] = [s for s in seal_records(pipeline.keyring, [make_record(account="acme", user="ann", observed_at=DAYS[0])])]
    leftover = _killed_write(store, ann)
    if by == "user erasure":
        store.erase(ann.subject_ref, ann.user_ref)
    elif by == "account erasure":
        store.erase(ann.subject_ref)
    else:
        store.expire("cluster_jobs", DAYS[1])
    assert not leftover.exists()
    assert [p.name for p in leftover.parent.glob(".tmp-*")] == []


@pytest.mark.parametrize("by", ["account erasure", "expiry"])
def test_a_write_killed_in_its_header_leaves_nothing_past_its_accounts_erasure_or_its_days_expiry(
    pipeline: Pipeline, by: str
) -> None:
    """A temporary file cut before its header was whole (or empty) was taken for an operator's: the account's
    erasure completed and left it, with the folder named by the account's ref. An operator's ``.tmp-notes``
    is no name the store writes: it stays, and is listed as foreign."""
    store = _store(pipeline)
    [ann] = seal_records(pipeline.keyring, [make_record(account="acme", user="ann", observed_at=DAYS[0])])
    folder = _killed_write(store, ann).parent
    cut = [folder / f".tmp-{uuid.uuid4().hex}" for _ in range(2)]
    cut[0].write_bytes(b"")
    cut[1].write_bytes(localfiles._header(ann)[:40])
    (folder / ".tmp-notes").write_text("an operator's")
    if by == "account erasure":
        store.erase(ann.subject_ref)
    else:
        store.expire("cluster_jobs", DAYS[1])
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-notes"]
    assert store.foreign_files() == [str(folder / ".tmp-notes")]


def test_a_folder_or_a_journal_named_as_a_temporary_is_no_reason_to_stop_an_erasure(pipeline: Pipeline) -> None:
    """A folder named ``.tmp-*`` made every erasure and expiry of its subject fail (it was opened as a file);
    a compaction journal's temporary a killed write left outlived the account's erasure, naming its files."""
    store = _store(pipeline)
    [ann] = seal_records(pipeline.keyring, [make_record(account="acme", user="ann", observed_at=DAYS[0])])
    folder = store._path(ann).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".tmp-not-a-file").mkdir()
    (folder / ".tmp-not-a-file" / ".tmp-notes").write_text("an operator's")
    (folder / f".{localfiles._JOURNAL}.tmp-0123").write_text("a journal's line")
    store.erase(ann.subject_ref, ann.user_ref)
    assert (folder / ".tmp-not-a-file").is_dir()  # foreign: left in place
    store.erase(ann.subject_ref)
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-not-a-file"]
