"""API tokens: issue, list, revoke, and turn a bearer token into a :class:`Principal`.

A token is ``mp_`` + 43 url-safe characters (32 random bytes). Only its
SHA-256 is stored, so a copy of the database opens nothing; the account and
user it speaks for are kept as HMAC refs plus names sealed under their data
key (see :mod:`pipeline.server.names`), so erasing them also ends their tokens.
A ``gateway`` token names the accounts it registers clusters for (``*``: any):
operator configuration rather than a data subject, so sealed under the staff key.
Every request looks its token up again, so a
revocation takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import bindparam, case, func, insert, select, update

from pipeline.db import api_tokens, keyring_keys, reading, transaction
from pipeline.errors import AuthenticationError, InvalidBinding, TokenNotFound
from pipeline.principals import TOKEN_SHAPE, Principal
from pipeline.records import utcnow
from pipeline.server.names import NameBox
from pipeline.server.threads import in_thread
from pipeline.subject_names import normalise

if TYPE_CHECKING:
    from pipeline.runtime import Pipeline

__all__ = [
    "PRINCIPAL",
    "TOKEN_KINDS",
    "IssuedToken",
    "TokenInfo",
    "TokenStore",
    "authenticated",
    "bearer_token",
    "cluster_principal",
    "current_pipeline",
    "require",
]

TOKEN_KINDS = ("member", "admin", "cluster", "gateway")
#: where the app's guard leaves the principal of a request it authenticated before reading its body
PRINCIPAL = "principal"
TOKEN_PREFIX = "mp_"

#: a token by its hash, with its names' live key version, in one query; built once (every request runs it)
_BY_TOKEN = (
    select(
        api_tokens,
        case((keyring_keys.c.wrapped.is_not(None), keyring_keys.c.key_version)).label("live_version"),
    )
    .select_from(
        api_tokens.outerjoin(
            keyring_keys, keyring_keys.c.key_id == func.coalesce(api_tokens.c.user_ref, api_tokens.c.subject_ref)
        )
    )
    .where(api_tokens.c.token_sha256 == bindparam("sha256"))
)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """What ``tokens list`` shows: everything but the token."""

    token_id: str
    kind: str
    account: str | None
    user: str | None
    cluster_id: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    accounts: tuple[str, ...] = ()  # a gateway token's

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class IssuedToken:
    """A token as created: the only moment its secret exists outside its holder."""

    token_id: str
    token: str
    kind: str
    account: str | None
    user: str | None
    cluster_id: str | None = None
    expires_at: datetime | None = None
    accounts: tuple[str, ...] = ()  # a gateway token's

    def as_dict(self) -> dict[str, Any]:
        """The fields ``tokens create --json`` prints (a gateway token's ``accounts`` too)."""
        fields = {
            "token_id": self.token_id,
            "token": self.token,
            "kind": self.kind,
            "account": self.account,
            "user": self.user,
        }
        return {**fields, "accounts": list(self.accounts)} if self.kind == "gateway" else fields


class TokenStore:
    """The ``api_tokens`` table, with names sealed and tokens hashed."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.engine = pipeline.keyring.engine
        self.names = NameBox(pipeline.keyring)

    def create(
        self,
        kind: str,
        account: str | None = None,
        user: str | None = None,
        *,
        cluster_id: str | None = None,
        accounts: Sequence[str] = (),
        ttl: timedelta | None = None,
        now: datetime | None = None,
    ) -> IssuedToken:
        """Issue a token; ``cluster`` tokens expire after ``ttl``; a ``gateway`` token names ``accounts``.

        :raises InvalidBinding: the kind or its binding (account, user, cluster id, accounts) is wrong
        """
        accounts = tuple(map(normalise, accounts))
        _check_binding(kind, account, user, cluster_id, accounts)
        # kept as refs are made (NFC): a name typed with a combining accent showed in whoami and records as typed
        account, user = (None if name is None else normalise(name) for name in (account, user))
        now = now or utcnow()
        token_id = secrets.token_hex(8)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        keyring = self.pipeline.keyring
        subject_ref = keyring.subject_ref(account) if account is not None else None
        user_ref = keyring.user_ref(account, user) if account is not None else None
        expires_at = now + ttl if ttl is not None else None
        with transaction(self.engine, "issuing an API token") as conn:
            conn.execute(
                insert(api_tokens).values(
                    token_id=token_id,
                    token_sha256=token_sha256(token),
                    kind=kind,
                    subject_ref=subject_ref,
                    user_ref=user_ref,
                    cluster_id=cluster_id,
                    names=self.names.seal(
                        token_id, _names(account, user, accounts), subject_ref=subject_ref, user_ref=user_ref
                    ),
                    created_at=now,
                    expires_at=expires_at,
                )
            )
        self.pipeline.audit.append(
            "token.created",
            subject_ref=subject_ref,
            details={"token_id": token_id, "kind": kind, "cluster_id": cluster_id},
        )
        return IssuedToken(token_id, token, kind, account, user, cluster_id, expires_at, accounts)

    def list(self) -> list[TokenInfo]:
        """Every token ever issued, oldest first."""
        with transaction(self.engine, "listing API tokens") as conn:
            rows = conn.execute(select(api_tokens).order_by(api_tokens.c.created_at)).all()
        return [self._info(row) for row in rows]

    def get(self, token_id: str) -> TokenInfo:
        """One token, as ``tokens list`` shows it.

        :raises TokenNotFound:
        """
        with transaction(self.engine, "reading an API token") as conn:
            row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
        if row is None:
            raise TokenNotFound(token_id)
        return self._info(row)

    def revoke(self, token_id: str, *, now: datetime | None = None) -> TokenInfo:
        """Revoke a token (idempotent); its next request is refused.

        :raises TokenNotFound:
        """
        with transaction(self.engine, "revoking an API token") as conn:
            revoked = conn.execute(
                update(api_tokens)
                .where(api_tokens.c.token_id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now or utcnow())
            ).rowcount
            row = conn.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
        if row is None:
            raise TokenNotFound(token_id)
        if revoked:  # once: closing a closed cluster again must not grow the audit trail
            self.pipeline.audit.append("token.revoked", subject_ref=row.subject_ref, details={"token_id": token_id})
        return self._info(row)

    def authenticate(self, token: str, *, now: datetime | None = None) -> Principal:
        """The principal a bearer token speaks for.

        :raises AuthenticationError: malformed, unknown, revoked or expired
        """
        if not TOKEN_SHAPE.fullmatch(token):
            raise AuthenticationError("malformed token: expected mp_ and 43 url-safe characters")
        with reading(self.engine, "checking an API token") as conn:
            row = conn.execute(_BY_TOKEN, {"sha256": token_sha256(token)}).first()
        if row is None:
            raise AuthenticationError("unknown token")
        if row.revoked_at is not None:
            raise AuthenticationError("token revoked")
        if row.expires_at is not None and (now or utcnow()) >= row.expires_at:
            raise AuthenticationError("token expired")
        names = self.names.open_at(
            row.token_id, row.names, subject_ref=row.subject_ref, user_ref=row.user_ref, live_version=row.live_version
        )
        if names is None:
            raise AuthenticationError("token of an erased account or user")
        registered_at = row.created_at if row.kind == "cluster" else None  # a cluster token is issued on registration
        return Principal(
            row.kind,
            names["account"],
            names["user"],
            row.cluster_id,
            row.token_id,
            registered_at=registered_at,
            accounts=tuple(names.get("accounts", ())),
        )

    def _names(self, row: Any) -> dict[str, Any] | None:
        """The account and user a token speaks for; ``None`` once an erasure shredded them."""
        return self.names.open(row.token_id, row.names, subject_ref=row.subject_ref, user_ref=row.user_ref)

    def _info(self, row: Any) -> TokenInfo:
        names = self._names(row) or {"account": None, "user": None}
        return TokenInfo(
            row.token_id,
            row.kind,
            names["account"],
            names["user"],
            row.cluster_id,
            row.created_at,
            row.expires_at,
            row.revoked_at,
            tuple(names.get("accounts", ())),
        )


def _names(account: str | None, user: str | None, accounts: tuple[str, ...]) -> dict[str, Any]:
    """What a token's sealed names hold: its account and user, and a gateway token's accounts."""
    return (
        {"account": account, "user": user, "accounts": list(accounts)}
        if accounts
        else {"account": account, "user": user}
    )


def _check_binding(
    kind: str, account: str | None, user: str | None, cluster_id: str | None, accounts: tuple[str, ...]
) -> None:
    if kind not in TOKEN_KINDS:
        raise InvalidBinding(f"unknown token kind {kind!r} (known: {', '.join(TOKEN_KINDS)})")
    for what, value in (
        ("account", account),
        ("user", user),
        ("cluster id", cluster_id),
        *(("account", a) for a in accounts),
    ):
        if value is not None and not value.strip():
            raise InvalidBinding(f"{kind} token: the {what} must not be empty")
    if kind == "gateway" and (not accounts or account is not None or user is not None or cluster_id is not None):
        raise InvalidBinding("a gateway token needs one --account or more ('*': any account) and no --user")
    if kind != "gateway" and accounts:
        raise InvalidBinding(f"a {kind} token names one account, not a list")
    if kind == "admin" and (account is not None or cluster_id is not None):
        raise InvalidBinding("an admin token sees every account: give no --account")
    if kind == "member" and (account is None or user is None):
        raise InvalidBinding("a member token needs --account and --user")
    if kind == "cluster" and (account is None or cluster_id is None):
        raise InvalidBinding("a cluster token needs an account and a cluster id")


# The dependencies are coroutines: FastAPI runs a plain function in the thread pool, and each hop
# there waits for the GIL behind the batches being written (milliseconds under load, per hop).


async def current_pipeline(request: Request) -> Pipeline:
    """FastAPI dependency: the open pipeline the app serves."""
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


_bearer = HTTPBearer(auto_error=False, description="An `mp_` token from `metadata-pipeline tokens create`.")


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header's value; None for any other."""
    scheme, _, token = authorization.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


async def authenticated(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """FastAPI dependency: the caller's principal (401 without a valid bearer token)."""
    return await _principal(request, credentials.credentials if credentials is not None else None)


def require(*kinds: str) -> Callable[[Principal], Awaitable[Principal]]:
    """FastAPI dependency: an authenticated principal of one of ``kinds`` (403 otherwise)."""

    async def dependency(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        return _of_kind(principal, kinds)

    return dependency


async def cluster_principal(request: Request) -> Principal:
    """``require("cluster")`` without FastAPI's dependency resolution, for ingest's hot path."""
    token = bearer_token(request.headers.get("authorization", ""))
    return _of_kind(await _principal(request, token), ("cluster",))


async def _principal(request: Request, token: str | None) -> Principal:
    known: Principal | None = getattr(request.state, PRINCIPAL, None)
    if known is not None:  # a request with a body, authenticated by the app's guard before it was read
        return known
    if token is None:
        raise AuthenticationError("missing bearer token: send Authorization: Bearer mp_...")
    tokens: TokenStore = request.app.state.tokens
    return await in_thread(tokens.authenticate, token)


def _of_kind(principal: Principal, kinds: Sequence[str]) -> Principal:
    """:raises HTTPException: 403, the principal is of none of ``kinds``"""
    if principal.kind not in kinds:
        raise HTTPException(403, f"a {principal.kind} token may not do this (needs: {' or '.join(kinds)})")
    return principal
