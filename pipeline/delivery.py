"""Where the emitter delivers a sealed batch: in-process (embedded) or over HTTP (remote).

One protocol, :class:`Delivery`, two backends chosen by whether
``pipeline.ingest.url`` is set:

- :class:`EmbeddedDelivery` calls :meth:`Pipeline.ingest` in-process as the
  plugin's own cluster (one machine, one user: ``make demo``). The schedulers
  of one process share one :class:`Pipeline` per configuration
  (:meth:`EmbeddedDelivery.shared`): opening one costs more than ingesting a
  short-lived cluster's records.
- :class:`HTTPDelivery` POSTs the batch to ``<pipeline.ingest.url>/v1/ingest``
  with the cluster token; it holds no key that decrypts anything and no
  store or database URL.

A delivery either returns (the batch is stored, now or before), raises
:class:`~pipeline.errors.BatchRefused` (never retry these bytes), raises
:class:`~pipeline.errors.Throttled` (retry after the time it names, no failure)
or raises anything else (retry later with back-off).
"""

from __future__ import annotations

import atexit
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from pipeline.config import Settings, http_url_problem
from pipeline.errors import BatchRefused, ClusterLost, ConfigError, StoreUnavailable, Throttled, TokenRefused
from pipeline.redact import first_line, mask_url, quoted
from pipeline.spool import SpooledBatch

if TYPE_CHECKING:
    import httpx
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from pipeline.principals import Principal
    from pipeline.runtime import Pipeline

__all__ = ["Delivery", "EmbeddedDelivery", "HTTPDelivery", "remote_delivery"]

logger = logging.getLogger(__name__)

_DETAIL_CHARS = 500  # of the control plane's answer, in a log line
#: a 429 without a usable Retry-After waits this long; a longer one is cut to the maximum
_DEFAULT_RETRY_AFTER = 1.0
_MAX_RETRY_AFTER = 3600.0


class Delivery(ABC):
    """Hands sealed batches to the party that holds the intake private key."""

    @abstractmethod
    def public_key(self) -> X25519PublicKey:
        """The intake public key to seal batches to.

        :raises StoreUnavailable: the key cannot be obtained yet (retry later)
        """

    @abstractmethod
    def deliver(self, batch: SpooledBatch) -> None:
        """Hand one sealed batch over; returning means it is stored (now or by an earlier attempt).

        :raises BatchRefused: the target refused the batch for good; never retry it
        :raises TokenRefused: the target refused the credential itself; stop delivering
        :raises Exception: anything else means the target is down or busy; retry with back-off
        """

    def retire(self) -> None:  # noqa: B027 - optional: only a remote cluster holds a credential to give up
        """Everything is delivered and the cluster is closing: give up the right to write.

        :raises Exception: it could not (the credential then lapses at its expiry)
        """

    def close(self) -> None:  # noqa: B027 - optional: not every delivery holds a connection
        """Release connections."""


class EmbeddedDelivery(Delivery):
    """In-process :meth:`Pipeline.ingest`, as the plugin's own cluster principal."""

    def __init__(self, open_pipeline: Callable[[], Pipeline], principal: Principal) -> None:
        self._open_pipeline = open_pipeline
        self.principal = principal
        self._pipeline: Pipeline | None = None

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline, opened on first use (the database may be down when the plugin starts)."""
        if self._pipeline is None:
            self._pipeline = self._open_pipeline()
        return self._pipeline

    def public_key(self) -> X25519PublicKey:
        return self.pipeline.intake_key.public_key()

    def deliver(self, batch: SpooledBatch) -> None:
        self.pipeline.ingest(batch.sealed, self.principal, idempotency_key=batch.batch_id)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()

    @classmethod
    def shared(cls, settings: Settings, principal: Principal) -> EmbeddedDelivery:
        """A delivery through this process's one pipeline for ``settings``, closed with its last delivery."""
        return _SharedEmbeddedDelivery(settings, principal)


@dataclass
class _Opened:
    pipeline: Pipeline
    users: int = 0


class _SharedPipelines:
    """This process's open pipelines by settings, with how many deliveries use each.

    When its last delivery closes, a pipeline writes its ingest summary and stays
    open for the next scheduler of the same configuration, so a process that runs
    cluster after cluster (a notebook, a test suite) opens the database once. At
    most one is kept idle. It is closed when another configuration is opened, when
    its SQLite database file was removed or replaced (a home folder deleted between
    two clusters), and at exit. One lock serialises the ingests: a process runs
    few schedulers, and SQLite takes one writer anyway.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._open: dict[Settings, _Opened] = {}
        atexit.register(self.close_idle)

    def acquire(self, settings: Settings) -> Pipeline:
        from pipeline.db import engine_for  # here: a remote plugin needs no database code
        from pipeline.runtime import Pipeline

        with self.lock:
            self._close_idle(keep=settings)
            opened = self._open.get(settings)
            if (
                opened is not None
                and not opened.users
                and opened.pipeline.keyring.engine is not engine_for(settings.long_term_url)
            ):
                self._close(settings)  # its database file was removed or replaced (see engine_for)
                opened = None
            if opened is None:
                opened = self._open[settings] = _Opened(Pipeline.open(settings, create=True))
            opened.users += 1
            return opened.pipeline

    def release(self, settings: Settings) -> None:
        with self.lock:
            opened = self._open[settings]
            opened.users -= 1
            if not opened.users:
                opened.pipeline.summarise_ingest()

    def close_idle(self) -> None:
        with self.lock:
            self._close_idle(keep=None)

    def _close_idle(self, keep: Settings | None) -> None:
        for settings in [s for s, opened in self._open.items() if not opened.users and s != keep]:
            self._close(settings)

    def _close(self, settings: Settings) -> None:
        try:
            self._open.pop(settings).pipeline.close()
        except Exception as exc:  # a store gone away: nothing is pending in it (the summary was written)
            logger.warning("could not close an idle pipeline: %s", first_line(exc))


_SHARED = _SharedPipelines()


class _SharedEmbeddedDelivery(EmbeddedDelivery):
    def __init__(self, settings: Settings, principal: Principal) -> None:
        super().__init__(lambda: _SHARED.acquire(settings), principal)
        self._settings = settings

    def public_key(self) -> X25519PublicKey:
        pipeline = self.pipeline
        with _SHARED.lock:
            return pipeline.intake_key.public_key()

    def deliver(self, batch: SpooledBatch) -> None:
        pipeline = self.pipeline
        with _SHARED.lock:
            pipeline.ingest(batch.sealed, self.principal, idempotency_key=batch.batch_id)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline = None
            _SHARED.release(self._settings)


class HTTPDelivery(Delivery):
    """``POST <url>/v1/ingest`` with a bearer token and the batch id as idempotency key.

    ``retire`` posts ``<url>/v1/clusters/<cluster_id>/close``, which revokes the token.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        public_key: X25519PublicKey,
        *,
        cluster_id: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = url.rstrip("/") + "/v1/ingest"
        self.close_endpoint = f"{url.rstrip('/')}/v1/clusters/{cluster_id}/close" if cluster_id else None
        from pipeline.intake import MEDIA_TYPE

        self._public_key = public_key
        self._headers = {"Content-Type": MEDIA_TYPE}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout
        self._transport = transport
        self._http: httpx.Client | None = None

    def _client(self) -> httpx.Client:
        """Made on first use, on the emitter's thread: importing httpx and its SSL context cost a starting
        scheduler 0.2 s (its command line pulls in rich)."""
        if self._http is None:
            import httpx

            from pipeline.apiclient import http_client

            timeout = httpx.Timeout(self._timeout, connect=5.0)
            self._http = http_client(headers=self._headers, timeout=timeout, transport=self._transport)
        return self._http

    def public_key(self) -> X25519PublicKey:
        return self._public_key

    def deliver(self, batch: SpooledBatch) -> None:
        client = self._client()
        import httpx

        from pipeline.apiclient import unreachable

        try:
            response = client.post(self.endpoint, content=batch.sealed, headers={"Idempotency-Key": batch.batch_id})
        except httpx.HTTPError as exc:
            raise StoreUnavailable(unreachable(f"ingest endpoint {mask_url(self.endpoint)}", exc)) from exc
        if response.is_success:
            return
        detail = _detail(response).removeprefix(f"batch {batch.batch_id} refused: ")  # said once, below
        answer = f"ingest endpoint {mask_url(self.endpoint)} answered {response.status_code}: {detail}"
        if response.status_code == 429:
            raise Throttled(answer, _retry_after(response))
        if response.status_code >= 500:
            raise StoreUnavailable(answer)
        if response.status_code == 401:  # the token, not the batch: revoked, expired, or its cluster closed
            raise TokenRefused(f"the control plane refused this cluster's token: {answer}")
        if response.status_code == 403 and ClusterLost.MARK in answer:  # and every batch it makes from now on
            raise TokenRefused(f"the control plane ended this cluster: {answer}")
        raise BatchRefused(answer)

    def retire(self) -> None:
        if self.close_endpoint is None:
            raise ConfigError("pipeline.cluster-id is not set: the cluster token stays valid until it expires")
        client = self._client()
        import httpx

        from pipeline.apiclient import unreachable

        try:
            response = client.post(self.close_endpoint)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(unreachable(self.close_endpoint, exc)) from exc
        if not response.is_success:
            raise StoreUnavailable(f"{self.close_endpoint} answered {response.status_code}: {_detail(response)}")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


def _retry_after(response: httpx.Response) -> float:
    """The seconds a 429's ``Retry-After`` asks for (whole seconds or an HTTP date), at most an hour."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return _DEFAULT_RETRY_AFTER
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), _MAX_RETRY_AFTER)


def _detail(response: httpx.Response) -> str:
    """The problem+json ``detail`` (or ``title``), else the first line of the body, shortened."""
    try:
        problem = response.json()
        text = str(problem.get("detail") or problem.get("title") or problem) if isinstance(problem, dict) else ""
    except ValueError:
        text = ""
    text = text or response.text or response.reason_phrase
    line = (text.splitlines() or [""])[0]
    return line if len(line) <= _DETAIL_CHARS else line[: _DETAIL_CHARS - 1].rsplit(" ", 1)[0] + "…"


def remote_delivery(settings: Settings) -> HTTPDelivery | None:
    """The :class:`HTTPDelivery` ``pipeline.ingest.*`` configures; None when no ingest URL is set (embedded).

    :raises ConfigError: an ingest URL that is not http(s)://HOST..., or without a token or a valid public key
    """
    if not settings.ingest_url:
        return None
    if problem := http_url_problem(settings.ingest_url):
        raise ConfigError(f"pipeline.ingest.url {quoted(mask_url(settings.ingest_url))} {problem}")
    if not settings.ingest_token:
        raise ConfigError("pipeline.ingest.url is set but pipeline.ingest.token is not")
    if not settings.ingest_public_key:
        raise ConfigError("pipeline.ingest.url is set but pipeline.ingest.public-key is not")
    from pipeline.intake import load_public_key  # only a remote plugin needs it at start

    return HTTPDelivery(
        settings.ingest_url,
        settings.ingest_token,
        load_public_key(settings.ingest_public_key),
        cluster_id=settings.cluster_id,
    )
