"""``enforce``, ``report`` and ``keys``: the retention pass, its report and the master key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli.core import OUT_FOLDER, CheckFailed, UTCTime, command, main, open_pipeline, report_skipped
from pipeline.output import Output


@main.group()
def keys() -> None:
    """Master key operations."""


@command(keys, "rotate")
def keys_rotate(out: Output) -> None:
    """New master key version; data keys re-wrapped, data untouched."""
    pipeline = open_pipeline()
    version, rewrapped, _entry = pipeline.rotate_master()
    out.result(
        {"master_key_version": version, "keys_rewrapped": rewrapped},
        f"master key version {version}; {rewrapped} keys re-wrapped",
    )


@command(keys, "retire")
@click.option("--now", type=UTCTime(), default=None, help="Retire as of this time [default: now].")
def keys_retire(out: Output, now: Any) -> None:
    """Destroy master key versions past the backup window that wrap no live key (runs with enforce too)."""
    from pipeline.retention.retirement import retire_master_keys

    pipeline = open_pipeline()
    retired = retire_master_keys(pipeline, now)
    versions = [
        {
            "version": v.version,
            "superseded_at": v.superseded_at,
            "retired_at": v.retired_at,
            "retires_at": v.retires_at(pipeline.settings.retire_after),
        }
        for v in pipeline.keyring.master_versions()
    ]
    out.result(
        {"retired": retired, "versions": versions},
        f"master key versions retired: {', '.join(map(str, retired)) or 'none due'}",
    )


def _formats(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """Every format of every ``--format`` given (repeated, each may list several)."""
    from pipeline.reports.render import FORMATS

    value = ",".join(values)
    chosen = [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise click.BadParameter(f"{value!r}: choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(chosen))


@command(main)
@click.option("--out", "out_dir", required=True, type=OUT_FOLDER)
@click.option(
    "--format",
    "formats",
    default=["html,json,csv"],
    multiple=True,
    show_default=True,
    callback=_formats,
    help="Comma-separated, or repeated: html, json, csv.",
)
@click.option("--show-names", is_flag=True, help="Label accounts by name (decrypted) instead of subject refs.")
@click.option("--now", type=UTCTime(), default=None, help="Measure ages and deadlines at this time [default: now].")
@click.option(
    "--engine",
    type=click.Choice(["duckdb", "dask"]),
    default="duckdb",
    show_default=True,
    help="duckdb: every store, on this machine; dask: the S3 archive, on the Dask cluster at --scheduler.",
)
@click.option("--scheduler", default=None, help="Dask scheduler address for --engine dask (tcp://HOST:8786).")
def report(
    out: Output, out_dir: Path, formats: list[str], show_names: bool, now: Any, engine: str, scheduler: str | None
) -> None:
    """Compliance report files: inventory, retention, deletion requests, audit, usage."""
    from pipeline.reports import build_report, write_report
    from pipeline.runtime import Unreadable

    if (engine == "dask") != (scheduler is not None):
        raise click.UsageError("--engine dask and --scheduler ADDRESS go together")
    pipeline = open_pipeline()
    if scheduler is not None:
        from pipeline.reports.dask_engine import build_archive_report

        built = build_archive_report(pipeline, scheduler, now=now, show_names=show_names)
    else:
        built = build_report(pipeline, now=now, show_names=show_names, progress=sys.stderr.isatty())
    written = write_report(built, out_dir, formats)
    summary = {
        "files": [str(p) for p in written],
        "now": built.now,
        "simulated_clock": now is not None,
        "retention": built.retention_status,
        "overdue_records": built.overdue_records,
        "audit": built.audit["status"],
        "deletion_requests_overdue": built.deletion_requests["overdue"],
        "unreadable_segments": len(built.unreadable_segments),
        "foreign_files": len(built.foreign_files),
        "out_of_range_records": len(built.out_of_range_records),
    }
    out.result(
        summary,
        lambda d: (
            (f"report as of --now {d['now'].isoformat()}\n" if d["simulated_clock"] else "")
            + f"retention {d['retention']} ({d['overdue_records']:,} records past their limit); {d['audit']}; "
            f"{d['deletion_requests_overdue']} deletion requests overdue\n" + "\n".join(f"  {f}" for f in d["files"])
        ),
    )
    skipped = built.unreadable_segments + built.out_of_range_records
    report_skipped(pipeline, [Unreadable(**u) for u in skipped])


@command(main)
@click.option("--now", type=UTCTime(), default=None, help="Enforce as of this time [default: now].")
def enforce(out: Output, now: Any) -> None:
    """One retention pass and the pending deletion requests, then exit (for cron)."""
    from pipeline.records import utcnow
    from pipeline.retention.enforcer import enforce as enforce_retention
    from pipeline.retention.requests import list_requests

    pipeline = open_pipeline()
    simulated = now is not None  # a --now is marked as such in the output and the pass's audit entry
    now = now or utcnow()
    report = enforce_retention(pipeline, now, simulated=simulated, requests=True)  # each step runs on its own
    requests = list_requests(pipeline)
    overdue = [r.request_id for r in requests if r.overdue(now)]
    failed = [r.request_id for r in requests if r.state == "failed"]  # still owed, whoever processed them
    summary = {
        "retention": report.as_dict(),
        "requests": [{"request_id": r.request_id, "state": r.state, "error": r.error} for r in report.requests],
        "failed_requests": failed,
        "overdue_requests": overdue,
        "failed_steps": report.failed_steps,
    }
    lines = [report.summary()]
    lines += [
        f"deletion request {r.request_id}: {r.state}" + (f" ({r.error})" if r.error else "") for r in report.requests
    ]
    if failed:
        lines.append(f"{len(failed)} deletion requests failed (retried with back-off): {', '.join(failed)}")
    if overdue:
        lines.append(f"{len(overdue)} deletion requests overdue: {', '.join(overdue)}")
    out.result(summary, "\n".join(lines))
    problems = [f"{len(failed)} deletion requests failed, {len(overdue)} overdue"] if failed or overdue else []
    if report.failures:  # e.g. a locked Cloud Logging bucket with another retention
        problems.append(f"retention of {', '.join(report.failures)} does not match the policy")
    problems += [f"step {step} failed: {reason}" for step, reason in report.failed_steps.items()]
    if problems:  # cron and CronJobs alert on the exit status
        raise CheckFailed("; ".join(problems))
