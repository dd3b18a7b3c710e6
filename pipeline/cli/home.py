"""``init``, ``serve``, ``demo`` and ``accounts``: the pipeline home and its control plane."""

from __future__ import annotations

import logging
from typing import Any

import click

from pipeline.cli.core import API_NAME, NAME, TEXT, CheckFailed, check_control_plane_host, command, main, open_pipeline
from pipeline.config import Settings
from pipeline.output import Output
from pipeline.redact import mask_url, quoted


@command(main)
def init(out: Output) -> None:
    """Create keys and schema under the configured home (idempotent); upgrades an earlier release's data."""
    from pipeline.upgrade import upgrade_data

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
    set_up = {}  # e.g. the Cloud Logging bucket of the pipeline's own, its sink and exclusion
    for name, store in pipeline.stores.items():
        found = store.set_up({t: limit for where, t, limit in pipeline.policy.limits() if where == name})
        if found is not None:
            set_up[name] = info[f"{name}_set_up"] = found
    upgraded = upgrade_data(pipeline)  # what an earlier release sealed under another key layout
    if upgraded:
        info["upgraded"] = upgraded
    details = {"home": str(s.home), "policy_sha256": pipeline.policy.sha256}
    pipeline.audit.append("init", details={**details, "set_up": set_up} if set_up else details)
    out.result(info, lambda d: "initialised\n" + "\n".join(f"  {k:<14} {v}" for k, v in d.items()))
    failed = [name for name, found in set_up.items() if found.get("status") == "FAIL"]
    if failed:  # as enforce says of the same bucket
        raise CheckFailed(f"retention of {', '.join(failed)} does not match the policy (see {failed[0]}_set_up)")


@command(main)
@click.option("--tasks", default=2000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--account", default="demo", show_default=True, type=NAME)
@click.option("--user", default=None, type=NAME, help="User the cluster belongs to.")
@click.option(
    "--remote", is_flag=True, help="Through a control plane in a process of its own: the cluster only writes."
)
def demo(out: Output, tasks: int, account: str, user: str | None, remote: bool) -> None:
    """Run a workload on a local Dask cluster with the plugin and show what was stored."""
    from pipeline.demo import run_demo

    check_control_plane_host(Settings.from_config())  # a demo would make this machine a second pipeline
    summary = run_demo(tasks=tasks, account=account, user=user, remote=remote)
    out.result(summary, _render_demo)


def _render_demo(summary: dict[str, Any]) -> str:
    lines = [
        f"cluster {summary['cluster_id']}: {summary['tasks']} tasks in {summary['jobs']} jobs, "
        f"{summary['erred']} erred on purpose",
        f"cluster ran over TLS ({summary['scheduler_address']}, certificates of its own CA)"
        if summary["tls"]
        else f"cluster ran WITHOUT TLS ({summary['scheduler_address']})",
        "code on the scheduler found no key (remote mode: the cluster only writes)"
        if not summary["keys_in_reach_of_the_scheduler"]
        else "code on the scheduler could read the keys (embedded mode is single-tenant): "
        + ", ".join(summary["keys_in_reach_of_the_scheduler"]),
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
@click.option("--account", required=True, type=API_NAME)
@click.option("--username", required=True, type=NAME)
@click.option("--email", required=True, type=NAME)
@click.option("--team", default=None, type=TEXT)
@click.option("--quota", "quotas", multiple=True, type=TEXT, metavar="NAME=NUMBER", help="Repeatable.")
def accounts_add(
    out: Output, account: str, username: str, email: str, team: str | None, quotas: tuple[str, ...]
) -> None:
    """Register account metadata.

    The record's ids derive from what it says and the day, so running the command again after a
    store was unreachable (exit 2, the other stores written) completes the write without a copy.
    """
    import decimal
    import json
    import math

    from pipeline.errors import PolicyError, SubjectSuppressed
    from pipeline.limits import MAX_NUMBER
    from pipeline.records import utcnow

    parsed: dict[str, float] = {}
    for item in quotas:
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise click.BadParameter(f"{quoted(item)} is not NAME=NUMBER", param_hint="--quota") from None
        if not math.isfinite(number) or number < 0:  # NaN and Infinity are no JSON: `records --json` broke on them
            raise click.BadParameter(f"{quoted(item)}: a quota is a finite number, 0 or more", param_hint="--quota")
        if decimal.Decimal(value) > MAX_NUMBER:  # as typed: 2**53 + 1 reads as 2**53
            raise click.BadParameter(f"{quoted(item)}: a quota is at most 2**53", param_hint="--quota")
        if not name.strip() or name in parsed:  # a map names each key once; the later one was kept unsaid
            why = "names no quota" if not name.strip() else f"names quota {quoted(name)} a second time"
            raise click.BadParameter(f"{quoted(item)} {why}", param_hint="--quota")
        parsed[name] = number
    pipeline = open_pipeline(create=True)
    now = utcnow()
    said = json.dumps([username, email, team, parsed, f"{now:%Y-%m-%d}"], sort_keys=True)
    digest = pipeline.keyring.subject_ref(account, said)  # keyed like every ref: guessing the e-mail confirms nothing
    record = {
        "record_id": digest[:32],
        "data_type": "account",
        "kind": "account",
        "account": account,
        "user": username,
        "cluster_id": "-",
        "observed_at": now,
        "username": username,
        "email": email,
        "team": team,
        "quotas": parsed,
    }
    if not any(name in pipeline.stores for name in pipeline.policy.stores_for("account")):
        raise PolicyError(pipeline.policy.path, "stores", "no store keeps account records: nothing would be stored")
    written = pipeline.write_records([record], segment_seed=f"account/{digest}")
    if not written:  # a tombstone dropped it (audited as ingest.dropped)
        raise SubjectSuppressed(
            f"{quoted(account)}, user {quoted(username)}: an erasure of them is open, or suppresses them until lifted"
        )
    out.result({"account": account, "written": written}, f"account {account!r} stored in {', '.join(written)}")


@command(main)
@click.option("--no-retention", is_flag=True, help="API only: for extra replicas behind a load balancer.")
def serve(out: Output, no_retention: bool) -> None:
    """The control plane: HTTP API and retention service, until SIGTERM or Ctrl-C."""

    from pipeline.server.runner import check_serving, run_control_plane

    check_serving(Settings.from_config(), retention=not no_retention)  # before a new home's keys are made
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    runs = run_control_plane(open_pipeline(create=True), retention=not no_retention, announce=_announce)
    out.result({"stopped": True, "runs": runs}, f"control plane stopped after {len(runs)} scheduled retention runs")


def _announce(line: str) -> None:
    click.echo(line, err=True)
