"""A file of the local logging store that has a segment's name but not that segment's header.

It is damage, not a stray: ``records`` and ``report`` name it as an unreadable segment and
exit 1 (showing everything else), where a file with any other name is only counted as
foreign. Retention and erasure still remove it by its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import make_record

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.runtime import Pipeline

DAY0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _replace(old: bytes, new: bytes) -> Callable[[Path], None]:
    """Damage that edits the header in place (the payload stays as sealed)."""

    def damage(path: Path) -> None:
        data = path.read_bytes()
        assert old in data.split(b"\n", 1)[0]
        path.write_bytes(data.replace(old, new, 1))

    return damage


def _move_to_neighbour(path: Path) -> None:
    """Put the intact file in another subject's folder of the same day: its header names the first."""
    (other,) = [p for p in path.parent.parent.iterdir() if p != path.parent]
    path.rename(other / path.name)


def _with_header(line: bytes) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        path.write_bytes(line + b"\n" + path.read_bytes().split(b"\n", 1)[1])

    return damage


DAMAGE: dict[str, Callable[[Path], None]] = {
    "overwritten with garbage": lambda path: path.write_bytes(b"garbage\n"),
    "emptied": lambda path: path.write_bytes(b""),
    "header key renamed": _replace(b'"n_records"', b'"count"'),
    "header key version renamed": _replace(b'"key_version"', b'"version"'),
    "header is a list": _with_header(b"[]"),
    "header names another kind": _replace(b'"kind": "cluster_snapshot"', b'"kind": "job"'),
    "header names another segment": _replace(b'"segment_id": "', b'"segment_id": "0'),
    "header names another subject": _move_to_neighbour,
}


def _logs(settings: Settings, observed_at: datetime | None = None) -> tuple[Pipeline, Path]:
    """Acme's two snapshots (one segment), acme's job, globex's snapshot and environment; and acme's
    snapshot file."""
    pipeline = Pipeline.open(settings, create=True)
    at = {} if observed_at is None else {"observed_at": observed_at}
    pipeline.write_records(
        [
            make_record("cluster_snapshot", **at),
            make_record("cluster_snapshot", **at),
            make_record("job", job_id="j1", **at),
            make_record("cluster_snapshot", account="globex", **at),
            make_record("software_env", account="globex", **at),
        ]
    )
    acme = pipeline.keyring.subject_ref("acme")
    (snapshots,) = (settings.home / "logs" / "cluster_jobs").glob(f"*/{acme}/*~cluster_snapshot~*.seg")
    return pipeline, snapshots


def _segment_id(path: Path) -> str:
    return path.name.split("~", 1)[0]


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_records_names_a_damaged_segment_file_shows_the_rest_and_exits_1(
    home: Path, settings: Settings, damage: Callable[[Path], None]
) -> None:
    _pipeline, damaged = _logs(settings)
    damage(damaged)

    result = run("records", "--store", "cloud_logging", "--json")
    assert result.exit_code == 1, result.output
    shown = sorted((r["account"], r["kind"]) for r in map(json.loads, result.stdout.splitlines()))
    assert shown == [("acme", "job"), ("globex", "cluster_snapshot"), ("globex", "software_env")]
    unreadable, failed = result.stderr.splitlines()  # and no foreign file
    assert unreadable.startswith(f"unreadable segment {_segment_id(damaged)} in cloud_logging: ")
    assert failed == "check failed: 1 segment(s) could not be read; every other record was shown"


def test_only_a_file_without_a_segment_name_is_foreign(home: Path, settings: Settings) -> None:
    _pipeline, damaged = _logs(settings)
    damaged.write_bytes(b"garbage\n")
    stray = damaged.parent / "notes.seg"
    stray.write_text("my notes\n")

    result = run("records", "--store", "cloud_logging")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[1:] == [
        f"skipped 1 foreign file(s) in cloud_logging: {stray}",
        f"unreadable segment {_segment_id(damaged)} in cloud_logging: subject or key version 0 was never issued"
        " by this keyring: the segment or its header was altered",
        "check failed: 1 segment(s) could not be read; every other record was shown",
    ]
    assert damaged.read_bytes() == b"garbage\n" and stray.exists()  # a read changes nothing


@pytest.mark.parametrize("damage", ["overwritten with garbage", "header key renamed"])
def test_report_lists_a_damaged_segment_file_as_unreadable_not_foreign(
    home: Path, settings: Settings, tmp_path: Path, damage: str
) -> None:
    pipeline, damaged = _logs(settings)
    DAMAGE[damage](damaged)

    result = run("report", "--out", str(tmp_path / "r"), "--format", "json")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1].startswith("check failed: 1 segment(s) could not be read")
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [(u["store"], u["segment_id"]) for u in doc["unreadable_segments"]] == [
        ("cloud_logging", _segment_id(damaged))
    ]
    assert doc["foreign_files"] == []
    globex = pipeline.keyring.subject_ref("globex")
    assert globex in {row["subject_ref"] for row in doc["usage"]["accounts"]}


def test_retention_removes_a_damaged_segment_file_of_an_expired_day(home: Path, settings: Settings) -> None:
    _pipeline, damaged = _logs(settings, observed_at=DAY0)
    DAMAGE["overwritten with garbage"](damaged)

    result = run("enforce", "--now", (DAY0 + timedelta(days=31)).isoformat(), "--json")
    assert result.exit_code == 0, result.output
    removed = json.loads(result.stdout)["retention"]["removed"]["cloud_logging"]
    assert removed["cluster_jobs"]["records"] == 4  # the damaged file's two, counted by its name
    assert not damaged.exists()
    assert run("records", "--store", "cloud_logging").stdout == ""


def test_retention_does_not_stop_at_a_damaged_segment_file_straddling_its_limit(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records(
        [
            make_record("cluster_snapshot", observed_at=DAY0),
            make_record("cluster_snapshot", observed_at=DAY0 + timedelta(hours=2)),
        ]
    )
    (damaged,) = (settings.home / "logs").rglob("*.seg")
    DAMAGE["header key renamed"](damaged)

    result = run("enforce", "--now", (DAY0 + timedelta(days=30, hours=1)).isoformat(), "--json")
    assert result.exit_code == 0, result.output
    assert not damaged.exists()  # as for a segment whose payload does not decrypt: nothing readable to keep


def test_erasure_removes_a_damaged_segment_file_of_the_subject(home: Path, settings: Settings) -> None:
    from pipeline.retention.requests import file_request, get_request, process_pending

    pipeline, damaged = _logs(settings)
    DAMAGE["overwritten with garbage"](damaged)
    request = file_request(pipeline, "acme")
    process_pending(pipeline)

    done = get_request(pipeline, request.request_id)
    assert (done.state, done.error) == ("completed", None)
    assert done.receipt["stores"]["cloud_logging"]["records"] == 3  # the damaged file's two and the job
    assert not damaged.exists()
    result = run("records", "--store", "cloud_logging", "--json")
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["account"] for line in result.stdout.splitlines()} == {"globex"}
