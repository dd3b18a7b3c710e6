"""Rows of the long-term store whose header columns were altered into values of another type.

SQLite keeps any value in any column: a time made text, a count made text, a key version made
a float. The column types' conversions failed the whole read with a traceback; now the row is a
segment no key opens, named by ``records`` and ``report`` (exit 1), everything else shown, and
an erasure still removes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import make_record
from sqlalchemy import select, text

from pipeline.cli import main
from pipeline.db import segments
from pipeline.retention.requests import file_request, process_pending
from pipeline.runtime import Pipeline

ALTERATIONS = [
    "min_observed_at = 'garbage'",
    "max_observed_at = 12",
    "n_records = 'lots'",
    "key_version = 'x'",
    "key_version = 1.5",
]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def pipeline(home: Path) -> Iterator[Pipeline]:
    """On SQLite only: PostgreSQL's column types refuse these values."""
    opened = Pipeline.open(create=True)
    yield opened
    opened.close()


def alter(pipeline: Pipeline, change: str) -> str:
    """Alter acme's one long-term row; returns its segment id."""
    pipeline.write_records([make_record(account="acme"), make_record(account="globex")])
    acme = pipeline.subject_ref("acme")
    with pipeline.keyring.engine.begin() as conn:
        [segment_id] = conn.scalars(select(segments.c.segment_id).where(segments.c.subject_ref == acme))
        conn.execute(text(f"UPDATE segments SET {change} WHERE segment_id = :id"), {"id": segment_id})
    return segment_id


@pytest.mark.parametrize("change", ALTERATIONS)
def test_records_names_the_altered_row_and_shows_the_rest(pipeline: Pipeline, change: str) -> None:
    segment_id = alter(pipeline, change)
    result = run("records", "--store", "long_term", "--json")
    assert result.exit_code == 1, result.output
    assert [r["account"] for r in map(json.loads, result.stdout.splitlines())] == ["globex"]
    unreadable, failed = result.stderr.splitlines()
    assert unreadable.startswith(f"unreadable segment {segment_id} in long_term: ")
    assert failed == "check failed: 1 segment(s) could not be read; every other record was shown"


@pytest.mark.parametrize("change", ALTERATIONS)
def test_report_names_the_altered_row_and_counts_the_rest(pipeline: Pipeline, tmp_path: Path, change: str) -> None:
    segment_id = alter(pipeline, change)
    result = run("report", "--out", str(tmp_path / "r"), "--format", "json")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1].startswith("check failed: 1 segment(s) could not be read")
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [(u["store"], u["segment_id"]) for u in doc["unreadable_segments"]] == [("long_term", segment_id)]
    assert pipeline.subject_ref("globex") in {row["subject_ref"] for row in doc["usage"]["accounts"]}


def test_an_erasure_removes_an_altered_row(pipeline: Pipeline) -> None:
    alter(pipeline, "min_observed_at = 'garbage'")
    file_request(pipeline, "acme")
    [done] = process_pending(pipeline)
    assert done.state == "completed", done.error
    assert {s.subject_ref for s in pipeline.stores["long_term"].scan()} == {pipeline.subject_ref("globex")}
