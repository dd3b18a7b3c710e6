"""The one protocol every store backend implements.

Stores hold encrypted :class:`~pipeline.segments.Segment` objects and index them
by clear, pseudonymous columns only; they never see keys or plaintext.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any, TypeVar
from urllib.parse import ParseResult, parse_qs, urlparse

from pipeline.errors import ConfigError, StoreError
from pipeline.redact import mask_url
from pipeline.segments import Segment

__all__ = ["Removed", "Store", "noting_deleted", "oldest_first", "url_options"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Removed:
    """What an expiry or erasure took away."""

    segments: int = 0
    records: int = 0
    #: whole objects or logs deleted (S3 keys, Cloud Logging log names), for the erasure receipt
    places: tuple[str, ...] = ()
    #: set when the backend cannot delete what it holds (a Cloud Logging bucket of its own): the
    #: segments counted stay, unreadable once their key is destroyed, until this moment at the latest
    expires_at: datetime | None = None

    def __add__(self, other: Removed) -> Removed:
        expiries = [e for e in (self.expires_at, other.expires_at) if e is not None]
        return Removed(
            self.segments + other.segments,
            self.records + other.records,
            self.places + other.places,
            max(expiries, default=None),
        )


@contextlib.contextmanager
def noting_deleted(deleted: list[str]) -> Iterator[None]:
    """Attach ``deleted`` (the places deleted so far, appended to as the block goes) to a store error
    leaving the block: see :attr:`pipeline.errors.StoreError.deleted`."""
    try:
        yield
    except StoreError as exc:
        exc.deleted = (*exc.deleted, *deleted)
        raise


class Store(ABC):
    """A place segments are kept: SQL database, local files, Cloud Logging, memory."""

    #: the URL this store was opened from
    url: str
    #: whether :meth:`erase` deletes; a store that cannot (a log bucket of its own) leaves a subject's
    #: data to expire, unreadable once the key is destroyed
    deletes: bool = True

    @abstractmethod
    def write(self, segments: Sequence[Segment]) -> int:
        """Store segments idempotently: a segment id already present is left as it is.

        :param segments: sealed segments, any subjects and kinds
        :returns: how many segments were new (a backend that cannot tell without a listing, Cloud
            Logging, counts every one it sent)
        :raises StoreUnavailable: the backend cannot be reached; nothing or only whole
            segments were written, so the same call may simply be retried
        """

    @abstractmethod
    def scan(
        self,
        *,
        subject_ref: str | None = None,
        user_ref: str | None = None,
        data_type: str | None = None,
        kind: str | None = None,
        with_payload: bool = True,
    ) -> Iterator[Segment]:
        """Stream the segments matching every given filter, oldest first.

        :param with_payload: False yields headers only (``payload == b""``), which is
            much cheaper for listings and counts
        """

    @abstractmethod
    def delete(self, segment_ids: Sequence[str]) -> Removed:
        """Remove the given segments (used to rewrite a segment partly past its limit)."""

    @abstractmethod
    def expire(self, data_type: str, before: datetime) -> Removed:
        """Remove every segment of ``data_type`` whose newest record is older than ``before``.

        Segments that straddle ``before`` are left for the caller to rewrite.
        """

    @abstractmethod
    def erase(self, subject_ref: str, user_ref: str | None = None) -> Removed:
        """Remove every segment of a subject, or only those of one of its users."""

    def straddling(self, data_type: str, at: datetime) -> Iterator[Segment]:
        """Segments of ``data_type`` with records on both sides of ``at`` (oldest < at <= newest).

        What :meth:`expire` leaves for the enforcer to rewrite. This version scans
        every segment of the type; backends with an index on the time range override it.
        """
        for segment in self.scan(data_type=data_type):
            if segment.min_observed_at < at <= segment.max_observed_at:
                yield segment

    def apply_retention(self, limits: Mapping[str, timedelta]) -> dict[str, Any] | None:
        """Bring a retention the backend enforces by itself in line with the policy.

        Called once per retention pass with this store's finite limits by data type.
        Backends without one (most) return None.

        :returns: what was found and done, with ``status`` ``PASS`` or ``FAIL`` (e.g. a
            locked Cloud Logging bucket with another retention); recorded in the audit
        """
        return None

    def set_up(self, limits: Mapping[str, timedelta]) -> dict[str, Any] | None:
        """Create what the backend needs once, outside the data path (``metadata-pipeline init``).

        Called with this store's finite limits by data type; idempotent. Backends with
        nothing to set up (most) return None.

        :returns: what was found and created, with ``status`` ``PASS`` or ``FAIL``
        """
        return None

    def compact(self, closed_before: datetime, merge: Callable[[list[Segment]], Segment | None]) -> Removed:
        """Merge a subject's segments of one kind and user in each day closed before ``closed_before``.

        For backends whose cost grows with segment count (local files). Readers see
        every record exactly once at every instant, and after a crash at any point.

        :param merge: seals the given segments' records as one segment whose id derives
            from theirs, or None to leave them (e.g. their key was destroyed)
        :returns: the segments merged away; most backends merge nothing
        """
        return Removed()

    def foreign_files(self) -> list[str]:
        """Things found in the store that are not its segments: skipped, left in place, listed here.

        A stray file is never a reason to stop a scan, a retention pass or an erasure;
        commands report these instead. Backends that hold nothing but segments return [].
        """
        return []

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        """Release connections and handles."""


def url_options(url: str, allowed: Collection[str], form: str) -> tuple[ParseResult, dict[str, str]]:
    """A store URL and its query options.

    :raises ConfigError: an option not in ``allowed``, naming it and the URL's ``form``
    """
    parsed = urlparse(url)
    options = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ConfigError(f"store URL must be {form}, got {mask_url(url)!r} (unknown option {names})")
    return parsed, options


def oldest_first(items: Iterable[_T], day: Callable[[_T], str], key: Callable[[_T], Any]) -> Iterator[_T]:
    """Order a stream that arrives day by day by ``key`` within each day (holding one day at a time)."""
    for _, same_day in groupby(items, day):
        yield from sorted(same_day, key=key)
