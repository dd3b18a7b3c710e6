"""Clusters: register one (and issue its write-only token), list the caller's, close one.

A registered cluster gets a cluster token bound to its account, its owner (the
member who registered it, or the user an admin named; none for an account-level
service cluster) and its cluster id,
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

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select, update

from pipeline.db import clusters, transaction
from pipeline.intake import intake_private_key, public_key_text
from pipeline.principals import Principal
from pipeline.records import utcnow
from pipeline.runtime import Pipeline
from pipeline.security.tls import dask_tls_config, issue_credentials
from pipeline.server.auth import TokenStore, require
from pipeline.server.names import NameBox

__all__ = ["ClusterRegistry", "Registration", "cluster_config", "router"]


@dataclass(frozen=True)
class Registration:
    """A new cluster and the secrets its plugin needs (shown once)."""

    cluster_id: str
    account: str
    user: str | None  # the owner: every record the cluster sends is theirs
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
            "user": registration["user"],
            "cluster-id": registration["cluster_id"],
            "image": registration["image"],
            "ingest": {
                "url": registration["ingest_url"],
                "token": registration["token"],
                "public-key": registration["intake_public_key"],
            },
        },
    }


class ClusterRegistry:
    """The ``clusters`` table."""

    def __init__(self, pipeline: Pipeline, tokens: TokenStore | None = None) -> None:
        self.pipeline = pipeline
        self.tokens = tokens or TokenStore(pipeline)
        self.names = NameBox(pipeline.keyring)

    def register(
        self,
        account: str,
        ingest_url: str,
        *,
        user: str | None = None,
        name: str | None = None,
        image: str | None = None,
    ) -> Registration:
        """A new cluster of ``account`` owned by ``user`` (none: account-level), with a cluster token
        valid for ``pipeline.server.cluster-token-ttl``."""
        public_key = public_key_text(intake_private_key(self.pipeline.keyring))  # first: nothing issued if it fails
        cluster_id = f"cluster-{uuid.uuid4().hex[:12]}"
        ttl = timedelta(seconds=self.pipeline.settings.cluster_token_ttl)
        issued = self.tokens.create("cluster", account, user, cluster_id=cluster_id, ttl=ttl)
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
            user,
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
    user: str | None = Field(default=None, min_length=1, max_length=200)  # an admin's choice; a member owns theirs
    name: str | None = Field(default=None, max_length=200)
    image: str | None = Field(default=None, max_length=2000)


router = APIRouter(tags=["clusters"])


@router.post("/v1/clusters", status_code=201)
def register_cluster(
    body: ClusterIn,
    request: Request,
    principal: Annotated[Principal, Depends(require("member", "admin"))],
) -> dict[str, Any]:
    """Register a cluster of the caller's account, owned by the caller (an admin names the owner, or none):
    its id, cluster token, ingest URL, intake public key and TLS credentials."""
    if not principal.may_read(body.account):
        raise HTTPException(403, "a member may register clusters of their own account only")
    if not principal.sees_every_account and body.user not in (None, principal.user):
        raise HTTPException(403, "a member registers clusters for themselves only; an admin may name another user")
    if body.user is not None and not body.user.strip():
        raise HTTPException(400, "user: must not be blank")
    user = body.user if principal.sees_every_account else principal.user
    ingest_url = str(request.base_url).rstrip("/")
    registry: ClusterRegistry = request.app.state.clusters
    return registry.register(body.account, ingest_url, user=user, name=body.name, image=body.image).as_dict()


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
