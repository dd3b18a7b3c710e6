"""Software environments: public by default, private on an owning account's request.

An environment (``env_id`` is a hash of its content) is owned by every account
whose clusters reported it. It is listed to everyone while any owner leaves it
public; a private one only to its owners and admins. Visibility is kept per
(account ref, env id); the listing never says which accounts own an environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from pipeline.db import env_visibility, insert_ignoring_duplicates, transaction
from pipeline.principals import Principal
from pipeline.records import rows_from_table, utcnow
from pipeline.runtime import Pipeline, Unreadable
from pipeline.server.auth import authenticated, current_pipeline, require

__all__ = ["router"]

router = APIRouter(tags=["software-envs"])
logger = logging.getLogger(__name__)
Visibility = Literal["public", "private"]


@dataclass
class _Env:
    record: dict[str, Any]
    owners: set[str] = field(default_factory=set)


def _environments(pipeline: Pipeline, account: str | None = None) -> dict[str, _Env]:
    """env id → its newest record and the subject refs that reported it."""
    found: dict[str, _Env] = {}
    unreadable: list[Unreadable] = []
    for segment, table in pipeline.read_segments(
        "long_term", account=account, data_type="software_env", unreadable=unreadable
    ):
        for row in rows_from_table(table):
            env = found.setdefault(row["env_id"], _Env(row))
            if row["observed_at"] > env.record["observed_at"]:
                env.record = row
            env.owners.add(segment.subject_ref)
    for problem in unreadable:  # one bad segment or row never hides the other environments
        logger.warning("software environments: skipped %s", problem)
    return found


def _private(pipeline: Pipeline) -> set[tuple[str, str]]:
    query = select(env_visibility.c.subject_ref, env_visibility.c.env_id).where(
        env_visibility.c.visibility == "private"
    )
    with transaction(pipeline.keyring.engine, "reading environment visibility") as conn:
        return {(row.subject_ref, row.env_id) for row in conn.execute(query)}


@router.get("/v1/software-envs")
def list_envs(
    principal: Annotated[Principal, Depends(authenticated)],
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
) -> list[dict[str, Any]]:
    """Public environments plus the caller's account's private ones (admin: all)."""
    private = _private(pipeline)
    mine = pipeline.keyring.subject_ref(principal.account) if principal.kind == "member" and principal.account else None
    listed = []
    for env_id, env in sorted(_environments(pipeline).items()):
        public_owners = {ref for ref in env.owners if (ref, env_id) not in private}
        if mine in env.owners:
            visibility = "private" if (mine, env_id) in private else "public"
        elif public_owners or principal.sees_every_account:
            visibility = "public" if public_owners else "private"
        else:
            continue
        record = env.record
        listed.append(
            {
                "env_id": env_id,
                "image": record["image"],
                "python_version": record["python_version"],
                "packages": record["packages"],
                "visibility": visibility,
                "observed_at": record["observed_at"],
            }
        )
    return listed


class VisibilityIn(BaseModel):
    """``PATCH /v1/software-envs/{env_id}`` body."""

    model_config = ConfigDict(extra="forbid")
    visibility: Visibility


@router.patch("/v1/software-envs/{env_id}")
def set_visibility(
    env_id: str,
    body: VisibilityIn,
    principal: Annotated[Principal, Depends(require("member"))],
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
) -> dict[str, Any]:
    """Make an environment of the caller's account public or private (for that account)."""
    assert principal.account is not None  # a member token is always bound to an account
    ref = pipeline.keyring.subject_ref(principal.account)
    if pipeline.keyring.key_state(ref) == "unknown" or env_id not in _environments(pipeline, principal.account):
        raise HTTPException(404, f"no software environment {env_id!r} in your account")
    now = utcnow()
    with transaction(pipeline.keyring.engine, "setting environment visibility") as conn:
        conn.execute(
            insert_ignoring_duplicates(pipeline.keyring.engine, env_visibility).values(
                subject_ref=ref, env_id=env_id, visibility=body.visibility, updated_at=now
            )
        )
        conn.execute(
            env_visibility.update()
            .where(env_visibility.c.subject_ref == ref, env_visibility.c.env_id == env_id)
            .values(visibility=body.visibility, updated_at=now)
        )
    pipeline.audit.append(
        "env.visibility",
        actor=principal.actor,
        subject_ref=ref,
        details={"env_id": env_id, "visibility": body.visibility},
    )
    return {"env_id": env_id, "visibility": body.visibility}
