"""``spool replay --timeout``: seconds from 0 to a day; anything else is one line naming the option, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_record, one_line, run, sealed_batch

from pipeline.config import Settings
from pipeline.runtime import Pipeline
from pipeline.spool import Spool


@pytest.mark.parametrize("timeout", ["nan", "NaN", "inf", "-inf", "1e308", "-5", "-0.001", "86401", "ten"])
def test_a_timeout_that_is_not_seconds_from_0_to_a_day_is_refused(home: Path, timeout: str) -> None:
    assert run("init").exit_code == 0
    line = one_line(run("spool", "replay", "--timeout", timeout))
    assert line.startswith("error: Invalid value for '--timeout': "), line


def test_refused_timeouts_leave_the_spool_as_it_was(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    spool.append(*sealed_batch(pipeline, [make_record("cluster_snapshot")]))
    for timeout in ("nan", "-5", "inf"):
        one_line(run("spool", "replay", "--timeout", timeout))
    assert len(spool.pending_files()) == 1
    result = run("spool", "replay", "--timeout", "20")
    assert result.exit_code == 0, result.output
    assert "1 of 1 spooled batches delivered" in result.output


@pytest.mark.parametrize("timeout", ["0", "0.5", "86400"])
def test_an_empty_spool_is_replayed_within_any_timeout_in_range(home: Path, timeout: str) -> None:
    assert run("init").exit_code == 0
    result = run("spool", "replay", "--timeout", timeout)
    assert result.exit_code == 0, result.output
    assert "0 of 0 spooled batches delivered" in result.output


def test_the_help_names_the_range() -> None:
    result = run("spool", "replay", "--help")
    assert result.exit_code == 0
    assert "0<=x<=86400" in result.output and "at most a day" in result.output
