"""Clusters: register one (and issue its write-only token), list the caller's, close one.

A registered cluster gets a cluster token bound to its account and cluster id,
the control plane's ingest URL and the intake public key: everything its
plugin needs to write, nothing that reads; and its own TLS credentials (a CA,
scheduler / worker / client certificates and keys, see :mod:`pipeline.security.tls`).
When the plugin closes with its spool empty it closes the cluster with its own
token, which revokes that token: a closed cluster's credentials write nothing
more. The account name is kept sealed
under the account's data key beside its HMAC ref (see :mod:`pipeline.server.names`):
erasing the account leaves its clusters listed without names.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select, update

from pipeline.db import clusters, transaction
from pipeline.errors import OutputError
from pipeline.fsmodes import FOLDER_MODE, output_folder, write_private
from pipeline.intake import intake_private_key, public_key_text
from pipeline.principals import Principal
from pipeline.records import utcnow
from pipeline.runtime import Pipeline
from pipeline.security.tls import dask_tls_config, issue_credentials
from pipeline.server.auth import TokenStore, require
from pipeline.server.names import NameBox

__all__ = [
    "ROLE_FILES",
    "ClusterRegistry",
    "Registration",
    "check_role_files",
    "cluster_config",
    "role_configs",
    "router",
    "write_role_files",
]


@dataclass(frozen=True)
class Registration:
    """A new cluster and the secrets its plugin needs (shown once)."""

    cluster_id: str
    account: str
    name: str | None
    image: str | None
    token_id: str
    token: str
    expires_at: datetime | None
    ingest_url: str
    intake_public_key: str
    tls: dict[str, str]  # the cluster's CA, role certificates and private keys (PEM): shown once

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cluster_config(registration: dict[str, Any]) -> dict[str, Any]:
    """The dask config a registered cluster runs with: section ``pipeline``, and ``distributed.comm``
    for TLS with the cluster's own certificates."""
    return {
        **dask_tls_config(registration["tls"]),
        "pipeline": {
            "account": registration["account"],
            "cluster-id": registration["cluster_id"],
            "image": registration["image"],
            "ingest": {
                "url": registration["ingest_url"],
                "token": registration["token"],
                "public-key": registration["intake_public_key"],
            },
        },
    }


#: the file ``clusters create --out DIR`` writes for each role
ROLE_FILES = {"scheduler": "scheduler.yaml", "worker": "worker.yaml", "client": "client.yaml"}


def role_configs(registration: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One dask config per role (``scheduler``, ``worker``, ``client``), each with only its own key.

    A worker or client host must not hold the scheduler's key (it would let it pose as the
    scheduler) nor the cluster token (it would let it write as the cluster): only the
    scheduler's config has ``pipeline.ingest``.
    """
    tls = registration["tls"]
    configs = {}
    for role in ROLE_FILES:
        own = {"cert": tls[f"{role}_cert"], "key": tls[f"{role}_key"]}
        configs[role] = {
            "distributed": {
                "comm": {"require-encryption": True, "tls": {"ca-file": tls["ca_cert"], role: own}},
            },
        }
    configs["scheduler"]["pipeline"] = cluster_config(registration)["pipeline"]
    return configs


def check_role_files(out_dir: Path) -> None:
    """Refuse a folder that already holds a role file (before registering: nothing is issued in vain).

    :raises OutputError: a role file is there (another cluster's credentials would be overwritten)
    """
    taken = [name for name in ROLE_FILES.values() if (out_dir / name).exists()]
    if taken:
        raise OutputError(f"{out_dir} already holds {', '.join(taken)}; give another --out folder")


def write_role_files(registration: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write each role's dask config to ``out_dir`` (0600 files in a folder created 0700); their paths by role.

    :raises OutputError: the folder or a file cannot be written, or a role file is already there
    """
    import yaml

    check_role_files(out_dir)
    written = {}
    with output_folder(out_dir):
        os.chmod(out_dir, FOLDER_MODE)  # an existing folder too: it now holds private keys
        for role, config in role_configs(registration).items():
            path = written[role] = out_dir / ROLE_FILES[role]
            try:
                write_private(path, yaml.safe_dump(config, sort_keys=False).encode(), replace=False)
            except FileExistsError:
                raise OutputError(f"{path} appeared while writing; give another --out folder") from None
    return written


class ClusterRegistry:
    """The ``clusters`` table."""

    def __init__(self, pipeline: Pipeline, tokens: TokenStore | None = None) -> None:
        self.pipeline = pipeline
        self.tokens = tokens or TokenStore(pipeline)
        self.names = NameBox(pipeline.keyring)

    def register(
        self, account: str, ingest_url: str, *, name: str | None = None, image: str | None = None
    ) -> Registration:
        """A new cluster of ``account`` with a cluster token valid for ``pipeline.server.cluster-token-ttl``."""
        public_key = public_key_text(intake_private_key(self.pipeline.keyring))  # first: nothing issued if it fails
        cluster_id = f"cluster-{uuid.uuid4().hex[:12]}"
        ttl = timedelta(seconds=self.pipeline.settings.cluster_token_ttl)
        issued = self.tokens.create("cluster", account, cluster_id=cluster_id, ttl=ttl)
        subject_ref = self.pipeline.keyring.subject_ref(account)
        names = {"account": account, "name": name, "image": image}
        with transaction(self.pipeline.keyring.engine, "registering a cluster") as conn:
            conn.execute(
                insert(clusters).values(
                    cluster_id=cluster_id,
                    subject_ref=subject_ref,
                    token_id=issued.token_id,
                    names=self.names.seal(cluster_id, names, subject_ref=subject_ref),
                    created_at=utcnow(),
                )
            )
        validity = timedelta(seconds=self.pipeline.settings.tls_validity)
        tls = issue_credentials(self.pipeline.keyring, account, cluster_id, validity=validity)
        return Registration(
            cluster_id,
            account,
            name,
            image,
            issued.token_id,
            issued.token,
            issued.expires_at,
            ingest_url,
            public_key,
            tls.to_json(),
        )

    def close(self, cluster_id: str, token_id: str, *, now: datetime | None = None) -> None:
        """Revoke the cluster's token ``token_id`` and mark the cluster closed (idempotent)."""
        now = now or utcnow()
        self.tokens.revoke(token_id, now=now)  # first: a crash in between leaves no open token of a closed cluster
        with transaction(self.pipeline.keyring.engine, "closing a cluster") as conn:
            conn.execute(
                update(clusters)
                .where(clusters.c.cluster_id == cluster_id, clusters.c.closed_at.is_(None))
                .values(closed_at=now)
            )

    def list(self, account: str | None = None) -> list[dict[str, Any]]:
        """Clusters of ``account`` (``None``: of every account), oldest first."""
        query = select(clusters).order_by(clusters.c.created_at)
        if account is not None:
            query = query.where(clusters.c.subject_ref == self.pipeline.keyring.subject_ref(account))
        with transaction(self.pipeline.keyring.engine, "listing clusters") as conn:
            rows = conn.execute(query).all()
        erased = {"account": None, "name": None, "image": None}
        return [
            {
                "cluster_id": row.cluster_id,
                **(self.names.open(row.cluster_id, row.names, subject_ref=row.subject_ref) or erased),
                "created_at": row.created_at,
                "closed_at": row.closed_at,
            }
            for row in rows
        ]


class ClusterIn(BaseModel):
    """``POST /v1/clusters`` body."""

    model_config = ConfigDict(extra="forbid")
    account: str = Field(min_length=1, max_length=200)
    name: str | None = Field(default=None, max_length=200)
    image: str | None = Field(default=None, max_length=2000)


router = APIRouter(tags=["clusters"])


@router.post("/v1/clusters", status_code=201)
def register_cluster(
    body: ClusterIn,
    request: Request,
    principal: Annotated[Principal, Depends(require("member", "admin"))],
) -> dict[str, Any]:
    """Register a cluster of the caller's account: its id, cluster token, ingest URL, intake public key and
    TLS credentials."""
    if not principal.may_read(body.account):
        raise HTTPException(403, "a member may register clusters of their own account only")
    ingest_url = str(request.base_url).rstrip("/")
    return request.app.state.clusters.register(body.account, ingest_url, name=body.name, image=body.image).as_dict()


@router.post("/v1/clusters/{cluster_id}/close", status_code=204)
def close_cluster(
    cluster_id: str, request: Request, principal: Annotated[Principal, Depends(require("cluster"))]
) -> Response:
    """The cluster's plugin closed with everything delivered: revoke its token, mark it closed."""
    if principal.cluster_id != cluster_id:
        raise HTTPException(403, "a cluster token may close its own cluster only")
    registry: ClusterRegistry = request.app.state.clusters
    assert principal.token_id is not None  # every authenticated principal names its token
    registry.close(cluster_id, principal.token_id)
    return Response(status_code=204)


@router.get("/v1/clusters")
def list_clusters(
    request: Request, principal: Annotated[Principal, Depends(require("member", "admin"))]
) -> list[dict[str, Any]]:
    """Clusters of the caller's account (admin: of every account)."""
    account = None if principal.sees_every_account else principal.account
    registry: ClusterRegistry = request.app.state.clusters
    return registry.list(account)
