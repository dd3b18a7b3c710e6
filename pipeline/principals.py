"""Who is asking: the principal behind a request, a token or a local command.

The control plane decides whose data it is from the principal, never from what
a request or record says about itself. Every path that reads, writes or erases
data takes one:

- ``cluster``: bound to one account, its owner's user (none: an account-level
  service cluster) and one cluster id; may only ingest, and its records are its own.
- ``member``: a person of one account (and user); sees that account's data.
- ``admin``: compliance/privacy staff; sees every account.
- ``gateway``: a dask-gateway server; may register clusters for its ``accounts``
  (``*``: any) and close the ones it registered, and nothing else: it reads nothing.
- ``operator``: a command run on the control plane itself with the metadata
  database and master key at hand (no token involved); it can do anything the
  keys allow, so it is treated as an admin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pipeline.subject_names import same

__all__ = ["ANY_ACCOUNT", "KINDS", "TOKEN_SHAPE", "Principal"]

#: an API token as issued: ``mp_`` and 32 random bytes, url-safe base64
TOKEN_SHAPE = re.compile(r"mp_[A-Za-z0-9_-]{43}")

Kind = Literal["cluster", "member", "admin", "gateway", "operator"]
KINDS: tuple[str, ...] = ("cluster", "member", "admin", "gateway", "operator")
#: a gateway token's account pattern for "any account"
ANY_ACCOUNT = "*"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller; ``account``/``user``/``cluster_id`` scope what it may touch.

    ``embedded`` marks an in-process plugin: its records name the users (and may carry the
    ``account`` records) its own configuration gives, unchecked, since embedded mode is
    single-tenant and its scheduler holds every key anyway.
    ``registered_at`` is when a cluster was registered: its records cannot be older.
    ``accounts`` are the accounts a gateway token registers clusters for.
    """

    kind: Kind
    account: str | None = None
    user: str | None = None
    cluster_id: str | None = None
    token_id: str | None = None
    embedded: bool = False
    registered_at: datetime | None = None
    accounts: tuple[str, ...] = ()

    @property
    def sees_every_account(self) -> bool:
        return self.kind in ("admin", "operator")

    def may_read(self, account: str) -> bool:
        """Whether records of ``account`` are visible to this principal."""
        return self.sees_every_account or (self.kind == "member" and same(self.account, account))

    def may_register(self, account: str) -> bool:
        """Whether this principal may register a cluster of ``account``."""
        if self.kind == "gateway":
            return ANY_ACCOUNT in self.accounts or any(same(a, account) for a in self.accounts)
        return self.may_read(account)

    @property
    def actor(self) -> str:
        """How the audit trail names this principal (no clear name beyond the token's own id)."""
        if self.token_id is None:
            return self.kind
        return f"{self.kind}-token:{self.token_id}"

    @classmethod
    def embedded_cluster(cls, account: str, cluster_id: str | None) -> Principal:
        """The principal of an in-process (embedded) plugin: its own configured account and cluster.

        ``cluster_id`` None (no ``pipeline.cluster-id`` configured, so each scheduler
        start gets a new id) scopes to the account only, so a restarted embedded
        scheduler can replay its predecessor's spool. Tokens always name a cluster.
        """
        return cls("cluster", account=account, cluster_id=cluster_id, embedded=True)
