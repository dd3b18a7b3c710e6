"""Every error the pipeline raises on purpose.

::

    PipelineError
     ├── ConfigError            bad setting, unknown URL scheme, missing optional extra
     │    └── InvalidBinding    a token's kind, account, user or cluster id is wrong (HTTP 400)
     ├── InvalidName            an account or user name holds a control character (HTTP 400)
     ├── PolicyError            invalid retention policy (file, dotted field, reason)
     ├── KeyringError           missing/wrong/insecure master key, destroyed data key
     ├── UnknownAccountError    an account the keyring has never seen
     ├── StoreError             a store refused or mangled data
     │    ├── StoreRefused      a store refuses until someone changes it (a permission, an immutable file)
     │    └── StoreUnavailable  a store cannot be reached right now (retry later)
     │         ├── Throttled    the control plane asked to wait (HTTP 429 with Retry-After)
     │         └── KeyServiceError  the key service (AWS KMS) did not answer: throttled, denied, unreachable
     ├── SpoolError             a spooled batch is unreadable
     ├── CredentialsError       cluster credentials cannot be issued, found or opened
     ├── BatchRefused           an ingest target refused a sealed batch for good (never retried)
     │    ├── IntakeError       malformed, undecryptable or oversized batch (HTTP 400 / 413)
     │    └── ForbiddenBatch    the batch names another account or cluster, or the caller may not ingest (403)
     ├── SubjectSuppressed      an erasure filed with --suppress keeps the subject's records out
     ├── RequestBusy            another process holds a deletion request (retry once its lease ends)
     ├── TokenRefused           the ingest endpoint refused the cluster's token itself (401): stop delivering
     ├── OutputError            a file or folder a command was asked to write cannot be written
     ├── AuditIntegrityError    the audit trail was altered
     ├── AuthenticationError    a missing, unknown, revoked or expired API token (HTTP 401)
     ├── TokenNotFound          no API token has this id
     ├── ClusterNotFound        no registered cluster has this id
     └── ApiError               the control plane refused a command-line request or cannot be reached

Lower-level exceptions are mapped at the boundary with ``raise ... from exc`` so
that the command line can print one line naming what is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.stores.base import Removed

__all__ = [
    "ApiError",
    "AuditIntegrityError",
    "AuthenticationError",
    "BatchRefused",
    "ClusterNotFound",
    "ConfigError",
    "CredentialsError",
    "ForbiddenBatch",
    "IntakeError",
    "InvalidBinding",
    "InvalidName",
    "KeyServiceError",
    "KeyringError",
    "OutputError",
    "PipelineError",
    "PolicyError",
    "RequestBusy",
    "SpoolError",
    "StoreError",
    "StoreUnavailable",
    "SubjectSuppressed",
    "Throttled",
    "TokenNotFound",
    "TokenRefused",
    "UnknownAccountError",
]


class PipelineError(Exception):
    """Base class: the message is one line a user can act on."""


class ConfigError(PipelineError, ValueError):
    """A configuration value is missing, malformed or names an unknown backend."""


class InvalidBinding(ConfigError):
    """What a token would be bound to is wrong: an unknown kind, a blank name, a missing account."""


class InvalidName(PipelineError, ValueError):
    """An account or user name no subject may have (a control character in it)."""


class PolicyError(PipelineError, ValueError):
    """The retention policy file is invalid."""

    def __init__(self, path: str, field: str, reason: str) -> None:
        self.path, self.field, self.reason = path, field, reason
        super().__init__(f"{path}: {field}: {reason}" if field else f"{path}: {reason}")


class KeyringError(PipelineError):
    """A key cannot be loaded, is insecure, or does not open the data."""


class UnknownAccountError(PipelineError, LookupError):
    """No data of this account is held: never stored, or erased (the same answer for both)."""

    def __init__(self, account: str) -> None:
        super().__init__(f"unknown account {account!r}: no records are stored for it")


class StoreError(PipelineError):
    """A store rejected an operation.

    ``deleted``: the places (S3 keys, Cloud Logging logs) the operation deleted before it failed, which
    no listing shows again: an erasure's receipt names them as it names those of a finished one.
    ``removed``: what an expiry that went on past a refusal removed.
    """

    deleted: tuple[str, ...] = ()
    removed: Removed | None = None


class StoreUnavailable(StoreError):
    """A store cannot be reached; the operation may succeed later."""


class StoreRefused(StoreError):
    """A store refuses the operation until someone changes it (a permission, a read-only file system, an
    immutable file): waiting alone will not help, so an erasure it blocks is ``failed``, not paused."""


class Throttled(StoreUnavailable):
    """The control plane is busy with this tenant: retry no sooner than ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class KeyServiceError(StoreUnavailable):
    """The key service did not unwrap or wrap a key it holds (throttled, access denied, unreachable): an
    outage to wait out (HTTP 503), never a sign that the data was crypto-shredded. Not a
    :class:`KeyringError`, which code takes for that: nothing is skipped or deleted for it."""


class SpoolError(PipelineError):
    """A spooled batch file is corrupt or unreadable."""


class CredentialsError(PipelineError):
    """A cluster's TLS or cloud credentials cannot be issued, found or opened."""


class BatchRefused(PipelineError):
    """A sealed batch was refused for good: retrying the same bytes cannot succeed."""


class IntakeError(BatchRefused, ValueError):
    """A sealed batch is malformed, does not decrypt, is too large, or holds invalid records.

    ``batch_id``: the batch's id once its header was read (the audit trail names it).
    """

    def __init__(self, message: str, *, batch_id: str | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id


class ForbiddenBatch(BatchRefused, PermissionError):
    """The caller may not ingest this batch (another account or cluster, or not a cluster)."""


class ClusterLost(ForbiddenBatch):
    """A batch of a lost cluster observed after the loss (403): none newer will be taken, so its plugin
    stops delivering as for a refused token rather than refusing each batch it makes from then on."""

    #: what every answer of this kind holds in its first line (the plugin tells it by this)
    MARK = "was lost at"


class RequestBusy(PipelineError):
    """Another process holds the lease of a deletion request: it is carrying it out, or died doing so."""


class SubjectSuppressed(PipelineError):
    """A record was not stored: an erasure filed with ``--suppress`` drops its subject's until lifted."""


class TokenRefused(PipelineError):
    """The ingest endpoint refused the cluster's token (revoked, expired, or its cluster closed).

    No batch is at fault and none would be accepted: the plugin stops delivering.
    """


class OutputError(PipelineError):
    """A file or folder a command was asked to write (``--out``) cannot be written."""


class AuditIntegrityError(PipelineError):
    """The audit trail fails verification at a given sequence number."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq, self.reason = seq, reason
        super().__init__(f"audit entry {seq}: {reason}")


class AuthenticationError(PipelineError):
    """A request carries no token, or one that is unknown, revoked or expired."""


class TokenNotFound(PipelineError, LookupError):
    """No API token has this id."""

    def __init__(self, token_id: str) -> None:
        super().__init__(f"no API token with id {token_id!r} (see metadata-pipeline tokens list)")


class ClusterNotFound(PipelineError, LookupError):
    """No registered cluster has this id."""

    def __init__(self, cluster_id: str) -> None:
        super().__init__(f"no cluster {cluster_id!r} (see metadata-pipeline clusters list)")


class ApiError(PipelineError):
    """The control plane answered a command-line request with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)
