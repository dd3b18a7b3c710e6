"""The ``metadata-pipeline`` command (also ``python -m pipeline``).

Exit status: 0 success, 1 a failed check, 2 bad usage or bad input (one line on
stderr naming what is wrong).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlparse

import click

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.output import Output
from pipeline.records import DATA_TYPES
from pipeline.redact import mask_url, printable, quoted
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
                click.echo(f"check failed: {printable(str(exc))}", err=True)
                sys.exit(1)
            except PipelineError as exc:
                click.echo(f"error: {printable(str(exc))}", err=True)
                sys.exit(2)

        wrapper = click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")(wrapper)
        return group.command(name, **attrs)(wrapper)  # type: ignore[return-value]

    return decorate


class OneLineGroup(click.Group):
    """Bad usage (an unknown option, a value a parameter refuses) is one line on stderr, exit 2."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as exc:
            click.echo(f"error: {printable(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(status if isinstance(status, int) else 0)


class Text(click.ParamType):
    """A name or free text from the command line: it must be valid UTF-8.

    Arguments that are not UTF-8 reach Python as lone surrogates (``$'\\xff'`` → ``'\\udcff'``),
    which no store, hash or terminal can encode.
    """

    name = "TEXT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{quoted(value)} is not valid UTF-8 text", param, ctx)
        return value


TEXT = Text()


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dask-metadata-pipeline")
def main() -> None:
    """Metadata and audit pipeline with retention enforcement for Dask clusters."""
    pipeline_logger = logging.getLogger("pipeline")
    if not pipeline_logger.handlers:  # commands report through their one line; `serve` configures logging
        pipeline_logger.addHandler(logging.NullHandler())


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
        "long_term": mask_url(s.long_term_url),
        "cloud_logging": mask_url(s.cloud_logging_url),
        "keys": mask_url(s.keys_url),
        "policy": str(s.policy_path),
        "intake_public_key": pipeline.intake_public_key,
    }
    pipeline.audit.append("init", details={"home": str(s.home), "policy_sha256": pipeline.policy.sha256})
    out.result(info, lambda d: "initialised\n" + "\n".join(f"  {k:<14} {v}" for k, v in d.items()))


@command(main)
@click.option("--tasks", default=2000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--account", default="demo", show_default=True, type=TEXT)
@click.option("--user", default=None, type=TEXT, help="User the cluster belongs to.")
@click.option("--remote", is_flag=True, help="Through a control plane on loopback: the cluster only writes.")
def demo(out: Output, tasks: int, account: str, user: str | None, remote: bool) -> None:
    """Run a workload on a local Dask cluster with the plugin and show what was stored."""
    from pipeline.demo import run_demo

    summary = run_demo(tasks=tasks, account=account, user=user, remote=remote)
    out.result(summary, _render_demo)


def _render_demo(summary: dict[str, Any]) -> str:
    lines = [
        f"cluster {summary['cluster_id']}: {summary['tasks']} tasks in {summary['jobs']} jobs, "
        f"{summary['erred']} erred on purpose",
        f"cluster ran over TLS ({summary['scheduler_address']}, certificates of its own CA)"
        if summary["tls"]
        else f"cluster ran WITHOUT TLS ({summary['scheduler_address']})",
        "workers got an AWS session token (refreshed before it expires)"
        if summary["aws_session_token"]
        else "no local AWS credentials: workers had none (public data only)",
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
@click.option("--account", required=True, type=TEXT)
@click.option("--username", required=True, type=TEXT)
@click.option("--email", required=True, type=TEXT)
@click.option("--team", default=None, type=TEXT)
@click.option("--quota", "quotas", multiple=True, type=TEXT, metavar="NAME=NUMBER", help="Repeatable.")
def accounts_add(
    out: Output, account: str, username: str, email: str, team: str | None, quotas: tuple[str, ...]
) -> None:
    """Register account metadata."""
    import uuid

    from pipeline.records import utcnow

    parsed: dict[str, float] = {}
    for item in quotas:
        name, _, value = item.partition("=")
        try:
            parsed[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"{quoted(item)} is not NAME=NUMBER", param_hint="--quota") from None
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
@click.option("--account", default=None, type=TEXT)
@click.option("--data-type", type=click.Choice(DATA_TYPES), default=None)
@click.option("--store", type=click.Choice(STORES), default="long_term", show_default=True)
def records(out: Output, account: str | None, data_type: str | None, store: str) -> None:
    """Print decrypted records (JSON lines with --json); with a login, those the token may see.

    A segment that does not decrypt, or a record that cannot be read, is named on stderr,
    every other record is printed, and the exit status is 1.
    """
    from pipeline.runtime import Unreadable

    client = api_client()
    pipeline, unreadable = None, list[Unreadable]()
    if client is None:
        pipeline = open_pipeline()
        rows = pipeline.read_records(store, account=account, data_type=data_type, unreadable=unreadable)
        n = out.rows(rows, _render_record)
    else:
        with client:
            params = {"account": account, "data_type": data_type, "store": store}
            n = out.rows(_records_and_skipped(client.lines("/v1/records", params), unreadable), _render_record)
    if not out.as_json:
        click.echo(f"{n} records in {store}", err=True)
    if pipeline is not None:
        _report_skipped(pipeline, unreadable)
    elif unreadable:
        _report_skipped(None, unreadable)


def _records_and_skipped(lines: Iterator[dict[str, Any]], unreadable: list[Any]) -> Iterator[dict[str, Any]]:
    """The records of a ``GET /v1/records`` stream; its ``skipped`` lines go to ``unreadable``."""
    from pipeline.runtime import Unreadable

    for line in lines:
        if "skipped" in line and "record_id" not in line:
            unreadable.append(Unreadable(**line["skipped"]))
        else:
            yield line


def _report_skipped(pipeline: Any, unreadable: list[Any]) -> None:
    """One stderr line per skipped segment, record and store with foreign files; exit 1 for a segment.

    A segment that does not decrypt is damage (or tampering) to look into. A record out of
    range was stored before ingest checked bounds; it is named on every read, and failing
    every read for it would change nothing.

    :param pipeline: None for a read through the control plane (its foreign files are not ours to list)
    """
    for store, found in pipeline.foreign_files().items() if pipeline is not None else ():
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        click.echo(printable(f"skipped {len(found)} foreign file(s) in {store}: {shown}"), err=True)
    for problem in unreadable:
        click.echo(printable(str(problem)), err=True)
    damaged = sum(problem.record_id is None for problem in unreadable)
    if damaged:
        raise CheckFailed(f"{damaged} segment(s) could not be read; every other record was shown")


def _render_record(r: Any) -> str:
    when = str(r["observed_at"])[:19].replace("T", " ")
    return f"{when}  {r['data_type']}/{r['kind']:<16} {r['account']}  {r['user'] or '-'}  {r['cluster_id']}"


def api_client():  # noqa: ANN201 - an ApiClient, imported lazily for a fast --help
    """A client of the control plane when ``login`` saved credentials; ``None`` works on the local home."""
    from pipeline.apiclient import ApiClient, Credentials

    credentials = Credentials.load(Settings.from_config().api_url)
    return None if credentials is None else ApiClient(credentials)


@main.group()
def spool() -> None:
    """The local delivery spool of a scheduler's plugin."""


@command(spool, "replay")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to keep retrying delivery.")
def spool_replay(out: Output, timeout: float) -> None:
    """Deliver the batches a stopped scheduler left in the spool (in-process, or to pipeline.ingest.url)."""
    from pipeline.delivery import Delivery, EmbeddedDelivery, remote_delivery
    from pipeline.emitter import Emitter
    from pipeline.errors import SpoolError, StoreUnavailable
    from pipeline.principals import Principal
    from pipeline.spool import Spool

    settings = Settings.from_config()
    delivery: Delivery | None = remote_delivery(settings)  # a cluster's spool: post it with the cluster's token
    if delivery is None:  # on the machine holding the master key: replay as the operator
        pipeline = open_pipeline()  # now, so a bad key or database fails fast
        delivery = EmbeddedDelivery(lambda: pipeline, Principal("operator"))
    queue = Spool(settings.spool_dir)
    corrupt_before, refused_before = set(queue.corrupt_files()), set(queue.refused_files())
    emitter = Emitter(delivery, queue, retry_max=settings.retry_max)
    emitter.start()
    delivered_all = emitter.close(timeout)
    corrupt = sorted(set(queue.corrupt_files()) - corrupt_before)
    refused = sorted(set(queue.refused_files()) - refused_before)
    summary = {
        "batches_replayed": emitter.stats.batches_replayed,
        "batches_delivered": emitter.stats.batches_delivered,
        "batches_left": len(queue.pending_files()),
        "corrupt_files": [str(p) for p in corrupt],
        "refused_files": [str(p) for p in refused],
    }
    if corrupt or refused:
        raise SpoolError(
            f"{len(corrupt)} corrupt spool file(s) set aside in {queue.corrupt_dir}"
            f"{': ' + ', '.join(p.name for p in corrupt) if corrupt else ''}; "
            f"{len(refused)} refused batch(es) set aside in {queue.refused_dir}"
            f"{' (' + str(emitter.stats.last_error) + ')' if refused else ''}; "
            f"{summary['batches_delivered']} other batches delivered"
        )
    if not delivered_all:
        raise StoreUnavailable(f"{summary['batches_left']} batches left in the spool: {emitter.stats.last_error}")
    out.result(summary, f"{summary['batches_delivered']} of {summary['batches_replayed']} spooled batches delivered")


class UTCTime(click.ParamType):
    """An ISO 8601 instant; without a zone it is taken as UTC."""

    name = "ISO8601"

    #: ages and deadlines of up to 100 years either side must stay within datetime's range
    EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value)
            parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        except (ValueError, OverflowError):
            self.fail(f"{quoted(value)} is not an ISO 8601 time like 2026-01-31T12:00:00Z", param, ctx)
        if not self.EARLIEST <= parsed < self.LATEST:
            self.fail(
                f"{quoted(value)} is out of range ({self.EARLIEST:%Y-%m-%d} to {self.LATEST:%Y-%m-%d})", param, ctx
            )
        return parsed


@main.group()
def keys() -> None:
    """Master key operations."""


@command(keys, "rotate")
def keys_rotate(out: Output) -> None:
    """New master key version; data keys re-wrapped, data untouched."""
    pipeline = open_pipeline()
    version, rewrapped = pipeline.keyring.rotate_master()
    pipeline.audit.append("key.rotated", details={"master_key_version": version, "keys_rewrapped": rewrapped})
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


def _formats(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from pipeline.reports.render import FORMATS

    chosen = [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise click.BadParameter(f"{value!r}: choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(chosen))


@command(main)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--format",
    "formats",
    default="html,json,csv",
    show_default=True,
    callback=_formats,
    help="Comma-separated: html, json, csv.",
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
    _report_skipped(pipeline, [Unreadable(**u) for u in skipped])


@main.group()
def audit() -> None:
    """The tamper-evident audit trail."""


@command(audit, "verify")
def audit_verify(out: Output) -> None:
    """Recompute the hash chain and check every signature (exit 1 at the first bad entry)."""
    import dataclasses

    result = open_pipeline().audit.check()
    if result.intact or out.as_json:
        out.result(dataclasses.asdict(result), str(result))
    if not result.intact:
        raise CheckFailed(f"audit entry {result.first_bad_seq}: {result.reason}")


@command(audit, "export")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def audit_export(out: Output, out_dir: Path) -> None:
    """Entries (JSON lines), public key and the verification procedure, for a third party."""
    from pipeline.audit_export import export_audit

    manifest = export_audit(open_pipeline().audit, out_dir)
    out.result(manifest, lambda m: f"{m['entries']:,} entries exported to {m['folder']} (head {m['head'][:16]}…)")


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


@command(main)
@click.option("--no-retention", is_flag=True, help="API only: for extra replicas behind a load balancer.")
def serve(out: Output, no_retention: bool) -> None:
    """The control plane: HTTP API and retention service, until SIGTERM or Ctrl-C."""
    import logging

    from pipeline.server.runner import run_control_plane

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    runs = run_control_plane(open_pipeline(create=True), retention=not no_retention, announce=_announce)
    out.result({"stopped": True, "runs": runs}, f"control plane stopped after {len(runs)} scheduled retention runs")


def _announce(line: str) -> None:
    click.echo(line, err=True)


@main.group()
def tokens() -> None:
    """API tokens for people and clusters (run on the control plane)."""


@command(tokens, "create")
@click.option("--account", default=None, type=TEXT, help="The member's account (admins: none).")
@click.option("--user", default=None, type=TEXT, help="Who holds the token.")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member", show_default=True)
def tokens_create(out: Output, account: str | None, user: str | None, role: str) -> None:
    """Issue a token; it is printed once and only its SHA-256 is kept."""
    from pipeline.server.auth import TokenStore

    issued = TokenStore(open_pipeline(create=True)).create(role, account, user)
    if not out.as_json:
        click.echo(f"{role} token {issued.token_id}; shown only now, store it safely:", err=True)
    out.result(issued.as_dict(), issued.token)


@command(tokens, "list")
def tokens_list(out: Output) -> None:
    """Every token issued (never the token itself), oldest first."""
    from pipeline.server.auth import TokenStore

    out.rows((t.as_dict() for t in TokenStore(open_pipeline()).list()), _render_token)


def _render_token(t: Any) -> str:
    state = "revoked" if t["revoked_at"] else f"expires {t['expires_at']:%Y-%m-%d}" if t["expires_at"] else "active"
    bound = " ".join(str(t[k]) for k in ("account", "user", "cluster_id") if t[k])
    return f"{t['token_id']}  {t['kind']:<7} {state:<18} {bound}"


@command(tokens, "revoke")
@click.argument("token_id")
def tokens_revoke(out: Output, token_id: str) -> None:
    """Revoke a token: its next request is refused."""
    from pipeline.server.auth import TokenStore

    info = TokenStore(open_pipeline()).revoke(token_id).as_dict()
    out.result(info, f"token {token_id} revoked")


@command(main)
@click.option("--url", required=True, type=TEXT, help="The control plane, e.g. https://metadata.example.com")
@click.option("--token", required=True, type=TEXT, help="A member or admin token (mp_...).")
def login(out: Output, url: str, token: str) -> None:
    """Check a token against the control plane and keep it in a 0600 credentials file."""
    from pipeline.apiclient import ApiClient, Credentials

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise click.BadParameter(f"{quoted(mask_url(url))} is not an http(s):// URL", param_hint="--url")
    credentials = Credentials(url.rstrip("/"), token)
    with ApiClient(credentials) as client:
        who = client.json("GET", "/v1/whoami")
    if who["kind"] == "cluster":
        raise click.BadParameter(
            "a cluster token can only ingest; log in with a member or admin token", param_hint="--token"
        )
    path = credentials.save()
    info = {
        "url": mask_url(credentials.url),
        "kind": who["kind"],
        "account": who["account"],
        "user": who["user"],
        "credentials": path,
    }
    out.result(
        info,
        f"logged in to {info['url']} as {who['kind']} {who['account'] or ''} {who['user'] or ''}".rstrip(),
    )


@main.group()
def clusters() -> None:
    """Clusters registered with the control plane."""


@command(clusters, "create")
@click.option("--account", required=True, type=TEXT)
@click.option("--name", default=None, type=TEXT, help="A label for people.")
@click.option("--image", default=None, type=TEXT, help="The cluster's container image URL.")
def clusters_create(out: Output, account: str, name: str | None, image: str | None) -> None:
    """Register a cluster; prints the dask config (YAML) its scheduler needs."""
    import yaml

    from pipeline.server.clusters import ClusterRegistry, cluster_config

    client = api_client()
    if client is None:
        pipeline = open_pipeline(create=True)
        s = pipeline.settings
        url = s.api_url or f"{'https' if s.tls_cert else 'http'}://{s.server_host}:{s.server_port}"
        registration = ClusterRegistry(pipeline).register(account, url, name=name, image=image).as_dict()
    else:
        with client:
            registration = client.json("POST", "/v1/clusters", json={"account": account, "name": name, "image": image})
    out.result(registration, lambda r: yaml.safe_dump(cluster_config(r), sort_keys=False).rstrip())


@command(clusters, "list")
def clusters_list(out: Output) -> None:
    """Clusters of the accounts you may see (JSON lines with --json)."""
    from pipeline.server.clusters import ClusterRegistry

    client = api_client()
    if client is None:
        rows = ClusterRegistry(open_pipeline()).list()
    else:
        with client:
            rows = client.json("GET", "/v1/clusters")
    out.rows(rows, lambda c: f"{c['cluster_id']}  {c['account']}  {c['name'] or '-'}  {str(c['created_at'])[:19]}")


@main.group()
def erase() -> None:
    """Privacy deletion requests (erasure of an account or a user, everywhere)."""


@command(erase, "request")
@click.option("--account", required=True, type=TEXT)
@click.option("--user", default=None, type=TEXT, help="Erase only this user of the account.")
@click.option("--reason", default=None, type=TEXT, help="Why (encrypted under the subject's key, shredded with it).")
@click.option("--suppress", is_flag=True, help="Also drop records observed later, until `erase lift ID`.")
def erase_request(out: Output, account: str, user: str | None, reason: str | None, suppress: bool) -> None:
    """File a deletion request; prints its id (carried out by enforce or serve)."""
    from pipeline.retention.requests import file_request

    client = api_client()
    if client is None:
        filed = file_request(open_pipeline(), account, user, reason, suppress=suppress).as_dict()
    else:
        with client:
            body = {"account": account, "user": user, "reason": reason, "suppress": suppress}
            filed = _request_from_api(client.json("POST", "/v1/erasure-requests", json=body))
    out.result(filed, filed["request_id"])


@command(erase, "retry")
@click.argument("request_id")
def erase_retry(out: Output, request_id: str) -> None:
    """Carry out a failed (or open) request now, whatever its back-off says."""
    from pipeline.retention.requests import retry_request

    request = retry_request(open_pipeline(), request_id)
    out.result(request.as_dict(), lambda d: _render_request(d, receipt=True))
    if request.state != "completed":
        raise CheckFailed(f"deletion request {request_id} is {request.state}: {request.error}")


@command(erase, "lift")
@click.argument("request_id")
def erase_lift(out: Output, request_id: str) -> None:
    """End the suppression of a request filed with --suppress: later records are accepted again."""
    from pipeline.records import utcnow
    from pipeline.tombstones import lift

    pipeline = open_pipeline()
    now = utcnow()
    lift(pipeline.keyring.engine, request_id, now)
    pipeline.audit.append("erasure.lifted", details={"request_id": request_id, "lifted_at": now.isoformat()})
    out.result({"request_id": request_id, "lifted_at": now}, f"suppression of {request_id} lifted")


@command(erase, "status")
@click.argument("request_id")
def erase_status(out: Output, request_id: str) -> None:
    """State and receipt of one request."""
    from pipeline.retention.requests import get_request

    client = api_client()
    if client is None:
        request = get_request(open_pipeline(), request_id).as_dict()
    else:
        with client:
            request = _request_from_api(client.json("GET", f"/v1/erasure-requests/{quote(request_id, safe='')}"))
    out.result(request, lambda d: _render_request(d, receipt=True))


@command(erase, "list")
def erase_list(out: Output) -> None:
    """Every request, oldest first (JSON lines with --json)."""
    from pipeline.retention.requests import list_requests

    client = api_client()
    if client is None:
        out.rows((r.as_dict() for r in list_requests(open_pipeline())), _render_request)
    else:
        with client:
            out.rows(map(_request_from_api, client.json("GET", "/v1/erasure-requests")), _render_request)


def _request_from_api(d: dict[str, Any]) -> dict[str, Any]:
    """A request as the API sends it, its times parsed back as the local path has them."""
    from datetime import datetime

    times = ("created_at", "deadline", "updated_at", "completed_at")
    return {k: datetime.fromisoformat(v) if k in times and v is not None else v for k, v in d.items()}


def _render_request(d: Any, receipt: bool = False) -> str:
    flags = " OVERDUE" if d["overdue"] else (" (completed late)" if d["completed_late"] else "")
    line = f"{d['request_id']}  {d['state']:<11} {d['scope']:<7} deadline {d['deadline']:%Y-%m-%d}{flags}"
    if not receipt:
        return line
    lines = [line]
    if d["error"]:
        lines.append(f"  error: {d['error']}")
    if d["receipt"].get("note"):
        lines.append(f"  {d['receipt']['note']}")
    for store, got in d["receipt"].get("stores", {}).items():
        when = got.get("erased_at", "not finished")
        lines.append(f"  {store:<14} {got['records']} records in {got['segments']} segments removed ({when})")
    key = d["receipt"].get("key")
    if key:
        lines.append(f"  data key: {key['state']}" + (f" at {key['destroyed_at']}" if "destroyed_at" in key else ""))
    if d["final_at"]:
        lines.append(
            f"  final on {d['final_at']:%Y-%m-%d %H:%M} UTC (a backup from before it opens the data until then)"
        )
    if d["receipt"].get("reason_sha256"):
        lines.append(f"  reason SHA-256: {d['receipt']['reason_sha256']}")
    return "\n".join(lines)
