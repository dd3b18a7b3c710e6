"""The ``metadata-pipeline`` command (also ``python -m pipeline``).

Exit status: 0 success, 1 a failed check, 2 bad usage or bad input (one line on
stderr naming what is wrong).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.output import Output
from pipeline.records import DATA_TYPES
from pipeline.retention.policy import STORES

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


class CheckFailed(Exception):
    """A check ran and found a problem: exit status 1."""


def command(group: click.Group, name: str | None = None, **attrs: Any) -> Callable[[F], F]:
    """A subcommand with ``--json`` and the error → exit status mapping."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, json_output: bool, **kwargs: Any) -> Any:
            out = Output(json_output)
            try:
                return fn(out, *args, **kwargs)
            except CheckFailed as exc:
                click.echo(f"check failed: {exc}", err=True)
                sys.exit(1)
            except PipelineError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(2)

        wrapper = click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")(wrapper)
        return group.command(name, **attrs)(wrapper)  # type: ignore[return-value]

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dask-metadata-pipeline")
def main() -> None:
    """Metadata and audit pipeline with retention enforcement for Dask clusters."""


def open_pipeline(*, create: bool = False):  # noqa: ANN201 - imported lazily for a fast --help
    from pipeline.runtime import Pipeline

    return Pipeline.open(Settings.from_config(), create=create)


@command(main)
def init(out: Output) -> None:
    """Create keys and schema under the configured home (idempotent)."""
    pipeline = open_pipeline(create=True)
    s = pipeline.settings
    info = {
        "home": s.home,
        "long_term": s.long_term_url,
        "cloud_logging": s.cloud_logging_url,
        "keys": s.keys_url,
        "policy": str(s.policy_path),
    }
    out.result(info, lambda d: "initialised\n" + "\n".join(f"  {k:<14} {v}" for k, v in d.items()))


@command(main)
@click.option("--tasks", default=2000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--account", default="demo", show_default=True)
@click.option("--user", default=None, help="User the cluster belongs to.")
def demo(out: Output, tasks: int, account: str, user: str | None) -> None:
    """Run a workload on a local Dask cluster with the plugin and show what was stored."""
    from pipeline.demo import run_demo

    summary = run_demo(tasks=tasks, account=account, user=user)
    out.result(summary, _render_demo)


def _render_demo(summary: dict[str, Any]) -> str:
    lines = [
        f"cluster {summary['cluster_id']}: {summary['tasks']} tasks in {summary['jobs']} jobs, "
        f"{summary['erred']} erred on purpose",
        f"records stored for account {summary['account']!r}:",
    ]
    for store, counts in summary["stored"].items():
        shown = ", ".join(f"{t}={n}" for t, n in counts.items()) or "nothing"
        lines.append(f"  {store:<14} {shown}")
    for job in summary["job_records"]:
        lines.append(
            f"  job {job['job_id'][:8]}: {job['tasks_completed']} completed, {job['tasks_erred']} erred, "
            f"{job['compute_seconds']:.3f} s compute, prefixes {', '.join(job['task_prefixes'])}"
        )
    lines.append(f"home: {summary['home']}")
    return "\n".join(lines)


@main.group()
def accounts() -> None:
    """Account metadata (long-term store, encrypted)."""


@command(accounts, "add")
@click.option("--account", required=True)
@click.option("--username", required=True)
@click.option("--email", required=True)
@click.option("--team", default=None)
@click.option("--quota", "quotas", multiple=True, metavar="NAME=NUMBER", help="Repeatable.")
def accounts_add(out: Output, account: str, username: str, email: str, team: str | None, quotas: tuple[str, ...]) -> None:
    """Register account metadata."""
    import uuid

    from pipeline.records import utcnow

    parsed: dict[str, float] = {}
    for item in quotas:
        name, _, value = item.partition("=")
        try:
            parsed[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not NAME=NUMBER", param_hint="--quota") from None
    record = {
        "record_id": uuid.uuid4().hex,
        "data_type": "account",
        "kind": "account",
        "account": account,
        "user": username,
        "cluster_id": "-",
        "observed_at": utcnow(),
        "username": username,
        "email": email,
        "team": team,
        "quotas": parsed,
    }
    written = open_pipeline(create=True).write_records([record])
    out.result({"account": account, "written": written}, f"account {account!r} stored in {', '.join(written)}")


@command(main)
@click.option("--account", default=None)
@click.option("--data-type", type=click.Choice(DATA_TYPES), default=None)
@click.option("--store", type=click.Choice(STORES), default="long_term", show_default=True)
def records(out: Output, account: str | None, data_type: str | None, store: str) -> None:
    """Print decrypted records (JSON lines with --json)."""
    pipeline = open_pipeline()
    rows = pipeline.read_records(store, account=account, data_type=data_type)
    n = out.rows(
        rows,
        lambda r: f"{r['observed_at']:%Y-%m-%d %H:%M:%S}  {r['data_type']}/{r['kind']:<16} "
        f"{r['account']}  {r['user'] or '-'}  {r['cluster_id']}",
    )
    if not out.as_json:
        click.echo(f"{n} records in {store}", err=True)


@main.group()
def keys() -> None:
    """Master key operations."""


@command(keys, "rotate")
def keys_rotate(out: Output) -> None:
    """New master key version; data keys re-wrapped, data untouched."""
    pipeline = open_pipeline()
    version, rewrapped = pipeline.keyring.rotate_master()
    out.result(
        {"master_key_version": version, "keys_rewrapped": rewrapped},
        f"master key version {version}; {rewrapped} keys re-wrapped",
    )
