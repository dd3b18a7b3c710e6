"""``clusters create|list|close``: registering clusters and their lifecycle."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from pipeline.cli.core import API_NAME, OUT_FOLDER, TEXT, api_client, command, from_api, main, open_pipeline
from pipeline.config import base_url
from pipeline.errors import ClusterNotFound, ConfigError
from pipeline.output import Output


@main.group()
def clusters() -> None:
    """Clusters registered with the control plane."""


@command(clusters, "create")
@click.option("--account", required=True, type=API_NAME)
@click.option("--user", default=None, type=API_NAME, help="Its owner (admins; a member's cluster is theirs).")
@click.option("--name", default=None, type=TEXT, help="A label for people.")
@click.option("--image", default=None, type=TEXT, help="The cluster's container image URL.")
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=OUT_FOLDER,
    help="Folder (created 0700) for scheduler.yaml, worker.yaml and client.yaml (0600).",
)
def clusters_create(
    out: Output, account: str, user: str | None, name: str | None, image: str | None, out_dir: Path | None
) -> None:
    """Register a cluster owned by you (admin: by --user, or none for an account-level one);
    write one dask config per role to --out (--json: the whole registration)."""
    from pipeline.server.clusters import check_role_files, write_role_files

    if out_dir is None and not out.as_json:
        raise click.UsageError("give --out DIR for the cluster's config files (or --json for automation)")
    if out.as_json and sys.stdout.isatty():
        raise click.UsageError("--json prints the cluster's private keys and token: send it to a file or a program")
    if out_dir is not None:
        check_role_files(out_dir)
    registration = _register_cluster(account, user, name, image)
    if out_dir is None:
        out.result(registration, "")
        return
    try:
        written = write_role_files(registration, out_dir)
    except BaseException:
        _withdraw(registration)  # nobody holds its token now: closed, it writes nothing
        raise
    out.result(registration, lambda r: _render_role_files(r, written))


#: a ``pipeline.server.host`` that listens everywhere and names no host
_EVERY_INTERFACE = ("0.0.0.0", "::", "")


def _register_cluster(account: str, user: str | None, name: str | None, image: str | None) -> dict[str, Any]:
    """A registration through the API with a login, else on the control-plane host itself."""
    from pipeline.server.clusters import ClusterRegistry

    client = api_client()
    if client is None:
        pipeline = open_pipeline(create=True)
        s = pipeline.settings
        if not s.api_url and s.server_host in _EVERY_INTERFACE:
            raise ConfigError(
                f"pipeline.api.url: set it to the URL clusters reach this control plane at; pipeline.server.host "
                f"{s.server_host!r} (every interface) is no address a cluster can connect to"
            )
        url = s.api_url or base_url("https" if s.tls_cert else "http", s.server_host, s.server_port)
        return ClusterRegistry(pipeline).register(account, url, user=user, name=name, image=image).as_dict()
    with client:
        body = {"account": account, "user": user, "name": name, "image": image}
        return from_api(client.json("POST", "/v1/clusters", json=body), ("expires_at",))


def _withdraw(registration: dict[str, Any]) -> None:
    """Close a cluster registered for files that could not be written, as its owner would."""
    from pipeline.server.clusters import ClusterRegistry

    client = api_client()
    if client is None:
        ClusterRegistry(open_pipeline()).close(registration["cluster_id"], registration["token_id"])
        return
    with client:
        client.json("POST", f"/v1/clusters/{registration['cluster_id']}/close")


def _render_role_files(registration: dict[str, Any], written: dict[str, Path]) -> str:
    """Where each file goes and how it is used; no secret (the files hold them)."""
    usage = {
        "scheduler": "dask scheduler --preload pipeline.preload --dashboard-address 127.0.0.1:8787",
        "worker": "dask worker tls://SCHEDULER-HOST:8786",
        "client": "python -c 'from distributed import Client; Client(\"tls://SCHEDULER-HOST:8786\")'",
    }
    lines = [f"cluster {registration['cluster_id']} of account {registration['account']!r} registered; copy each file"]
    lines.append("to the hosts of its role only (0600; it holds that role's private key):")
    lines += [f"  DASK_CONFIG={path} {usage[role]}" for role, path in written.items()]
    return "\n".join(lines)


@command(clusters, "list")
def clusters_list(out: Output) -> None:
    """Clusters of the accounts you may see, with state (open, closed, lost) and last contact."""
    from pipeline.server.clusters import ClusterRegistry

    client = api_client()
    if client is None:
        rows = ClusterRegistry(open_pipeline()).list()
    else:
        with client:
            rows = [from_api(row, _TIMES) for row in client.json("GET", "/v1/clusters")]
    out.rows(rows, _render_cluster)


#: a listed cluster's times
_TIMES = ("created_at", "last_contact_at", "closed_at", "lost_at")


def _render_cluster(c: Any) -> str:
    contact = str(c["last_contact_at"] or "never")[:19].replace("T", " ")
    created = str(c["created_at"])[:19].replace("T", " ")
    named = f"{c['account'] or '-'}  {c['name'] or '-'}"  # an erased account's name is gone
    return f"{c['cluster_id']}  {c['state']:<6} {named}  created {created}  last contact {contact}"


@command(clusters, "close")
@click.argument("cluster_id", type=TEXT)
def clusters_close(out: Output, cluster_id: str) -> None:
    """Close a cluster and revoke its token (its owner or an admin); its running jobs are recorded lost."""
    from pipeline.server.clusters import ClusterRegistry

    client = api_client()
    if client is None:
        registry = ClusterRegistry(open_pipeline())
        found = registry.find(cluster_id)
        if found is None:
            raise ClusterNotFound(cluster_id)
        registry.close(cluster_id, found.token_id, actor="operator")
    else:
        with client:
            client.json("POST", f"/v1/clusters/{quote(cluster_id, safe='')}/close")
    out.result({"cluster_id": cluster_id, "state": "closed"}, f"cluster {cluster_id} closed; its token is revoked")
