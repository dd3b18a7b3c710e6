"""The Cloud Logging bucket a :class:`~pipeline.stores.cloud_logging.CloudLoggingStore` writes to.

Read, created and kept in line with the policy through ConfigServiceV2 (gRPC):
:meth:`LogBucketConfig.set_up` (``metadata-pipeline init``) creates a bucket of
the pipeline's own, a sink that routes only the store's logs into it and an
exclusion on the ``_Default`` sink; :meth:`LogBucketConfig.apply_retention`
(every retention pass) sets its retention to the policy's. A bucket that holds
other logs (``_Default``, or one another sink routes into) is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.auth.exceptions import DefaultCredentialsError
from google.cloud.logging_v2.services.config_service_v2 import ConfigServiceV2Client
from google.cloud.logging_v2.services.config_service_v2.transports import ConfigServiceV2GrpcTransport
from google.cloud.logging_v2.types import (
    CreateBucketRequest,
    CreateExclusionRequest,
    CreateSinkRequest,
    GetBucketRequest,
    ListSinksRequest,
    LogBucket,
    LogExclusion,
    LogSink,
    UpdateBucketRequest,
)
from google.protobuf.field_mask_pb2 import FieldMask

from pipeline.errors import ConfigError, StoreError, StoreUnavailable
from pipeline.redact import first_line

__all__ = ["DEFAULT_BUCKET", "BucketRetention", "LogBucketConfig", "guarded"]

#: the project's shared bucket, the one where logs.delete removes entries
DEFAULT_BUCKET = "_Default"
#: the longest retention a log bucket takes
MAX_DAYS = 3650
_T = TypeVar("_T")


def guarded(where: str, action: str, fn: Callable[[], _T]) -> _T:
    """Call Google, mapping its errors to :class:`StoreUnavailable` (retry) or :class:`StoreError`."""
    try:
        return fn()
    except (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.TooManyRequests, gexc.InternalServerError) as exc:
        raise StoreUnavailable(f"{where} unavailable during {action}: {first_line(exc)}") from exc
    except gexc.RetryError as exc:
        raise StoreUnavailable(f"{where} unavailable during {action}: {first_line(exc)}") from exc
    except gexc.GoogleAPIError as exc:
        raise StoreError(f"{where} refused {action}: {first_line(exc)}") from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise StoreUnavailable(f"{where} unreachable during {action}: {first_line(exc)}") from exc


@dataclass(frozen=True)
class BucketRetention:
    """What a retention pass found on the log bucket and did about it."""

    bucket: str
    found_days: int
    wanted_days: int
    locked: bool
    updated: bool
    #: sinks that route other logs into the bucket: it is never changed
    shared_with: tuple[str, ...] = ()
    #: data types whose limit is shorter than the bucket's one retention: kept longer than the policy says
    kept_longer: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return (self.updated or self.found_days == self.wanted_days) and not self.kept_longer

    def as_dict(self) -> dict[str, Any]:
        found = {
            "bucket": self.bucket,
            "found_days": self.found_days,
            "wanted_days": self.wanted_days,
            "locked": self.locked,
            "updated": self.updated,
            "status": "PASS" if self.ok else "FAIL",
        }
        if self.shared_with:
            found["holds_other_logs"] = list(self.shared_with)
        if self.kept_longer:
            found["kept_longer"] = list(self.kept_longer)
        return found


class LogBucketConfig:
    """One log bucket (``projects/P/locations/L/buckets/B``) and the store's log filter."""

    def __init__(self, bucket: str, log_filter: str, endpoint: str | None = None) -> None:
        """:param endpoint: ``HOST:PORT`` of a plaintext gRPC ConfigServiceV2 (an emulator); else Google's"""
        self.bucket = bucket
        self.location, _, self.bucket_id = bucket.rpartition("/buckets/")
        self.project = bucket.split("/")[1]
        self.log_filter = log_filter
        #: the project's _Default: logs.delete acts there, and it always holds other logs (its sink
        #: routes everything not excluded)
        self.is_default = self.bucket_id == DEFAULT_BUCKET
        self._endpoint = endpoint
        self._config: ConfigServiceV2Client | None = None

    def _call(self, action: str, fn: Callable[[], _T]) -> _T:
        return guarded(f"Cloud Logging {self.project}", action, fn)

    def apply_retention(self, limits: Mapping[str, timedelta]) -> dict[str, Any] | None:
        """Set the log bucket's retention to the policy's longest limit.

        A locked bucket, or one that holds other logs, with another retention is a FAIL; so is
        a shorter limit of another data type in a bucket of the pipeline's own, whose entries
        cannot be deleted: they stay as long as the bucket keeps any.
        """
        wanted = _days(limits)
        if wanted is None:
            return None
        kept_longer = () if self.is_default else _shorter(limits, wanted)
        bucket = self._read_bucket()
        found, locked = int(bucket.retention_days), bool(bucket.locked)
        shared = self._other_writers()
        updated = False
        if found != wanted and not locked and not shared:
            request = UpdateBucketRequest(
                name=self.bucket,
                bucket=LogBucket(name=self.bucket, retention_days=wanted),
                update_mask=FieldMask(paths=["retention_days"]),
            )
            config = self._client()
            self._call("setting the log bucket's retention", lambda: config.update_bucket(request=request))
            updated = True
        return BucketRetention(self.bucket, found, wanted, locked, updated, shared, kept_longer).as_dict()

    def set_up(self, limits: Mapping[str, timedelta]) -> dict[str, Any] | None:
        """Create the bucket of the pipeline's own, its sink and the exclusion on ``_Default`` (each once)."""
        if self.is_default:  # nothing to create, and it is not ours to change
            return self.apply_retention(limits)
        wanted = _days(limits) or MAX_DAYS  # until_deleted: as long as a bucket keeps anything
        config, parent = self._client(), f"projects/{self.project}"
        bucket = LogBucket(retention_days=wanted, description="metadata-pipeline entries; made by its init")
        sink = LogSink(name=self.bucket_id, destination=f"logging.googleapis.com/{self.bucket}", filter=self.log_filter)
        exclusion = LogExclusion(name=self.bucket_id, filter=self.log_filter)
        steps: dict[str, Callable[[], object]] = {
            self.bucket: lambda: config.create_bucket(
                request=CreateBucketRequest(parent=self.location, bucket_id=self.bucket_id, bucket=bucket)
            ),
            f"{parent}/sinks/{self.bucket_id}": lambda: config.create_sink(
                request=CreateSinkRequest(parent=parent, sink=sink)
            ),
            f"{parent}/exclusions/{self.bucket_id}": lambda: config.create_exclusion(
                request=CreateExclusionRequest(parent=parent, exclusion=exclusion)
            ),
        }
        created = []
        for name, create in steps.items():
            try:
                self._call(f"creating {name}", create)
                created.append(name)
            except StoreError as exc:
                if not isinstance(exc.__cause__, gexc.Conflict):  # AlreadyExists: made by an earlier init
                    raise
        return {**(self.apply_retention(limits) or {}), "created": created}

    def _read_bucket(self) -> LogBucket:
        request = GetBucketRequest(name=self.bucket)
        config = self._client()
        return self._call("reading the log bucket", lambda: config.get_bucket(request=request))

    def _sinks(self) -> list[LogSink]:
        config = self._client()
        request = ListSinksRequest(parent=f"projects/{self.project}")
        return self._call("listing the log sinks", lambda: list(config.list_sinks(request=request)))

    def _other_writers(self) -> tuple[str, ...]:
        """Sinks that route logs other than this store's into the bucket (``_Default`` always has one)."""
        sinks = self._sinks()
        destination = f"logging.googleapis.com/{self.bucket}"
        others = [
            sink.name
            for sink in sinks
            if sink.destination == destination
            and not sink.disabled
            and (sink.name != self.bucket_id or sink.filter != self.log_filter)
        ]
        return tuple(sorted(set(others) | ({DEFAULT_BUCKET} if self.is_default else set())))

    def retention_days(self) -> int:
        return int(self._read_bucket().retention_days)

    def require(self) -> None:
        """Refuse to write or read before ``init`` made the bucket, its sink and the exclusion on ``_Default``:
        without the sink entries land in ``_Default`` only, where reads never look; without the exclusion
        a copy of each lands there too, which expiry and erasure never reach.

        :raises StoreError: one is missing, naming it and the command that makes it
        """
        try:
            self._read_bucket()
        except StoreError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                raise StoreError(f"log bucket {self.bucket} does not exist: run `metadata-pipeline init`") from exc
            raise
        if self.is_default:
            return
        missing = [
            what for what, found in (("sink", self._routed), ("exclusion on _Default", self._excluded)) if not found()
        ]
        if missing:
            raise StoreError(
                f"log bucket {self.bucket} has no {' and no '.join(missing)} for the pipeline's logs "
                "(an init that stopped part way): run `metadata-pipeline init`"
            )

    def _routed(self) -> bool:
        """Whether this store's sink routes its logs into the bucket."""
        destination = f"logging.googleapis.com/{self.bucket}"
        return any(k.name == self.bucket_id and k.destination == destination and not k.disabled for k in self._sinks())

    def _excluded(self) -> bool:
        """Whether the exclusion that keeps this store's logs out of ``_Default`` is there."""
        config = self._client()
        name = f"projects/{self.project}/exclusions/{self.bucket_id}"
        try:
            found = self._call("reading the log exclusion", lambda: config.get_exclusion(name=name))
        except StoreError as exc:
            if isinstance(exc.__cause__, gexc.NotFound):
                return False
            raise
        return not found.disabled

    def _client(self) -> ConfigServiceV2Client:
        if self._config is None:
            if self._endpoint:
                channel = grpc.insecure_channel(self._endpoint)
                self._config = ConfigServiceV2Client(transport=ConfigServiceV2GrpcTransport(channel=channel))
            else:
                try:
                    self._config = ConfigServiceV2Client()
                except DefaultCredentialsError as exc:
                    raise ConfigError(
                        f"Cloud Logging {self.project}: no Google credentials for its configuration API "
                        f"(config-endpoint= names a local one): {first_line(exc)}"
                    ) from exc
        return self._config

    def close(self) -> None:
        if self._config is not None:
            self._config.transport.close()
            self._config = None


def _days(limits: Mapping[str, timedelta]) -> int | None:
    """The bucket retention a policy asks for: its longest finite limit, in whole days."""
    finite = [limit for limit in limits.values() if limit is not None]
    return math.ceil(max(finite) / timedelta(days=1)) if finite else None


def _shorter(limits: Mapping[str, timedelta], days: int) -> tuple[str, ...]:
    """The data types whose limit is shorter than ``days`` whole days."""
    return tuple(sorted(t for t, limit in limits.items() if limit is not None and limit < timedelta(days=days)))
