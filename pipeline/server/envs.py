"""Software environments: public by default, private on an owning account's request.

The control plane computes an environment's ``env_id`` on ingest, from its content
within the account (see :func:`pipeline.environment.environment_id`), so each account
has records of its own: another account reporting the same content, or an id it read,
never reveals, replaces or outdates them. Visibility and the newest record are kept
per (account ref, env id); the listing never says which account an environment is of.
Cluster tokens read nothing here.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from pipeline.db import env_visibility, insert_ignoring_duplicates, transaction
from pipeline.principals import Principal
from pipeline.records import rows_from_table, utcnow
from pipeline.runtime import Pipeline, Unreadable
from pipeline.segments import Segment
from pipeline.server.auth import current_pipeline, require

__all__ = ["EnvironmentIndex", "router"]

router = APIRouter(tags=["software-envs"])
logger = logging.getLogger(__name__)
Visibility = Literal["public", "private"]


class EnvironmentIndex:
    """The newest record of each (account ref, env id), kept by a ``serve`` between listings.

    An environment gains a record with every cluster that starts in it, so reading every record was
    every listing's cost, for every account, growing with the platform's history. Each listing still
    scans the environment segments and checks their keys (an erasure or a retention pass shows at
    once), but decrypts only the segments it has not read before. A segment read before that is gone
    (erased, expired, its key shredded) may have held an environment's newest record: then it reads
    them all again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: set[str] = set()
        self._newest: dict[tuple[str, str], dict[str, Any]] = {}

    def newest(self, pipeline: Pipeline) -> dict[tuple[str, str], dict[str, Any]]:
        """(subject ref, env id) → the newest record of that environment the account's clusters reported."""
        with self._lock:
            standing = self._update(pipeline)
            if self._read - standing:
                self._read, self._newest = set(), {}
                self._update(pipeline)
            return dict(self._newest)

    def _update(self, pipeline: Pipeline) -> set[str]:
        """Read the segments not read before into the index; the ids of every segment standing."""
        standing: set[str] = set()

        def known(segment: Segment) -> bool:
            standing.add(segment.segment_id)
            return segment.segment_id in self._read

        unreadable: list[Unreadable] = []
        for segment, table in pipeline.read_segments(
            "long_term", data_type="software_env", unreadable=unreadable, known=known
        ):
            for row in rows_from_table(table):
                key = (segment.subject_ref, row["env_id"])
                if key not in self._newest or row["observed_at"] > self._newest[key]["observed_at"]:
                    self._newest[key] = row
            self._read.add(segment.segment_id)
        for problem in unreadable:  # one bad segment or row never hides the other environments
            logger.warning("software environments: skipped %s", problem)
        return standing


def _private(pipeline: Pipeline) -> set[tuple[str, str]]:
    query = select(env_visibility.c.subject_ref, env_visibility.c.env_id).where(
        env_visibility.c.visibility == "private"
    )
    with transaction(pipeline.keyring.engine, "reading environment visibility") as conn:
        return {(row.subject_ref, row.env_id) for row in conn.execute(query)}


@router.get("/v1/software-envs")
def list_envs(
    request: Request,
    principal: Annotated[Principal, Depends(require("member", "admin"))],
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
) -> list[dict[str, Any]]:
    """Public environments plus the caller's account's private ones (admin: all); each id once, the caller's own
    record first."""
    private = _private(pipeline)
    mine = pipeline.keyring.subject_ref(principal.account) if principal.kind == "member" and principal.account else None
    listed: dict[str, dict[str, Any]] = {}
    environments: EnvironmentIndex = request.app.state.environments
    found = environments.newest(pipeline)
    for (ref, env_id), record in sorted(found.items(), key=lambda item: item[0][0] != mine):
        visibility = "private" if (ref, env_id) in private else "public"
        if env_id in listed or (visibility == "private" and ref != mine and not principal.sees_every_account):
            continue
        listed[env_id] = {
            "env_id": env_id,
            "image": record["image"],
            "python_version": record["python_version"],
            "packages": record["packages"],
            "visibility": visibility,
            "observed_at": record["observed_at"],
        }
    return [listed[env_id] for env_id in sorted(listed)]


class VisibilityIn(BaseModel):
    """``PATCH /v1/software-envs/{env_id}`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)  # each value of its own JSON type: no "yes" or 0 for a bool
    visibility: Visibility


@router.patch("/v1/software-envs/{env_id}")
def set_visibility(
    env_id: str,
    body: VisibilityIn,
    request: Request,
    principal: Annotated[Principal, Depends(require("member"))],
    pipeline: Annotated[Pipeline, Depends(current_pipeline)],
) -> dict[str, Any]:
    """Make an environment of the caller's account public or private (for that account)."""
    assert principal.account is not None  # a member token is always bound to an account
    ref = pipeline.keyring.subject_ref(principal.account)
    environments: EnvironmentIndex = request.app.state.environments
    if pipeline.keyring.key_state(ref) == "unknown" or (ref, env_id) not in environments.newest(pipeline):
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
