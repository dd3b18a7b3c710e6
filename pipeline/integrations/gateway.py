"""Every cluster a dask-gateway server starts runs the plugin, registered for the gateway's user.

The operator's ``dask_gateway_config.py`` calls :func:`configure` once, after choosing the
backend. It replaces ``c.DaskGateway.backend_class`` with a subclass of that backend
(local, jobqueue, YARN: every database-backed one) that

- registers the cluster with the control plane when the gateway starts it (its name is
  known there), with the gateway token, for the gateway's authenticated user as owner and
  the account the rule ``pipeline.gateway.account`` gives (``{user}`` or a fixed name);
- gives the cluster token, intake key and identity to the scheduler's environment only
  (``get_scheduler_env``): the gateway stores a cluster's config in clear and gives it to
  workers too, so nothing goes there, and workers get no token;
- appends ``--preload pipeline.preload`` to the scheduler command (the gateway passes its
  own ``--preload``, so ``distributed.scheduler.preload`` would be ignored);
- gives each cluster a ``pipeline.home`` (its spool) of its own;
- closes the cluster in the control plane when the gateway stops it. One whose spool still
  holds batches (the control plane was down at the stop) has them delivered first, in the
  background, with the cluster token this process kept since the start, for up to an hour.
  A scheduler that died with an empty spool is left open: the control plane marks it
  ``lost`` after ``cluster-lost-after``; so is one stopped after the gateway restarted, whose
  token is then gone (it lived only in the scheduler's environment and this process).

Each cluster uses the gateway's own per-cluster TLS; the control plane issues none to a
gateway. Registration and closing run on a worker thread: the gateway's loop never waits
on the control plane.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import string
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dask.config

from pipeline.apiclient import TRUST_VARIABLES, ApiClient, Credentials
from pipeline.config import Settings, http_url_problem, not_text, spool_folder, text_setting
from pipeline.errors import ApiError, ConfigError
from pipeline.principals import TOKEN_SHAPE
from pipeline.redact import first_line, mask_url
from pipeline.server.clusters import plugin_config  # imported with the gateway's config, not on its loop (1 s)
from pipeline.spool import Spool

__all__ = ["GatewaySettings", "configure", "registering_backend"]

#: where a cluster's control-plane id is kept in the gateway's cluster state (no secret)
STATE_KEY = "pipeline_cluster_id"
_PRELOAD = ["--preload", "pipeline.preload"]


@dataclass(frozen=True)
class GatewaySettings:
    """``pipeline.gateway.*``: where the control plane is, the gateway's token, the account rule."""

    url: str
    token_file: Path
    account_rule: str
    home: Path

    @classmethod
    def from_config(cls) -> GatewaySettings:
        """Read and check the dask config (``DASK_PIPELINE__GATEWAY__*`` too).

        :raises ConfigError: a key is missing, the token file unreadable or the account rule malformed
        """
        url, token_file, rule = (
            dask.config.get(f"pipeline.gateway.{key}", None) for key in ("url", "token-file", "account")
        )
        if not url or not token_file:
            raise ConfigError("pipeline.gateway.url and pipeline.gateway.token-file must be set for dask-gateway")
        if problem := http_url_problem(text_setting("gateway.url", url) or ""):
            raise ConfigError(f"pipeline.gateway.url: {mask_url(str(url))!r} {problem}")
        home = Settings.from_config().home
        try:
            base = Path(str(dask.config.get("pipeline.gateway.home")).format(home=home)).expanduser().absolute()
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            raise ConfigError(f"pipeline.gateway.home: only {{home}} may be expanded: {exc}") from exc
        if not isinstance(rule, str):  # DASK_PIPELINE__GATEWAY__ACCOUNT=1e3 is read as a number: account 1000.0
            raise not_text("gateway.account", rule)
        try:  # {user} as it is, nothing else: a format spec or a conversion failed every cluster start
            plain = all(
                field in (None, "user") and not spec and conversion is None
                for _, field, spec, conversion in string.Formatter().parse(rule)
            )
        except ValueError:  # a single { or }
            plain = False
        if not plain or not rule:
            raise ConfigError(f"pipeline.gateway.account: {rule!r} may name {{user}} only (or be a fixed account)")
        settings = cls(str(url).rstrip("/"), Path(str(token_file)).expanduser(), rule, base)
        settings.token()
        return settings

    def token(self) -> str:
        """The gateway token, read again each time (so it can be replaced without a restart).

        :raises ConfigError: the file cannot be read, is empty, or others may read it (a cluster's code,
            running as its user on the gateway's host, would register clusters of any account with it)
        """
        try:
            mode = self.token_file.stat().st_mode
            token = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"pipeline.gateway.token-file: cannot read {self.token_file}: {exc}") from exc
        if mode & 0o077:
            raise ConfigError(
                f"pipeline.gateway.token-file: {self.token_file} may be read by others (mode {mode & 0o777:04o}); "
                f"chmod 600 it: a cluster's code must not read the gateway token"
            )
        if not TOKEN_SHAPE.fullmatch(token):  # its content is never quoted: it may hold a token among other text
            raise ConfigError(
                f"pipeline.gateway.token-file: {self.token_file} must hold one gateway token (mp_ and 43 url-safe "
                "characters) and nothing else, as `tokens create --role gateway` prints it without --json"
            )
        return token

    def account_for(self, user: str) -> str:
        """The account a gateway user's clusters belong to."""
        return self.account_rule.format(user=user)

    def cluster_home(self, cluster_name: str) -> Path:
        """A cluster's own ``pipeline.home`` (its spool)."""
        return self.home / cluster_name

    @functools.cached_property
    def _client(self) -> ApiClient:
        """One client for the gateway's life: its connections and TLS context are reused (a new one costs
        each cluster's start 30 ms). The token goes with each request, so a replaced token file counts."""
        return ApiClient(Credentials(self.url, ""))

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def register(self, user: str, cluster_name: str) -> dict[str, Any]:
        """Register a cluster owned by ``user``; the registration (cluster token included).

        :raises ApiError: the control plane refused or cannot be reached
        """
        body = {"account": self.account_for(user), "user": user, "name": cluster_name}
        registration: dict[str, Any] = self._client.json("POST", "/v1/clusters", json=body, headers=self._auth())
        return registration

    def close(self, cluster_id: str, cluster_token: str | None = None) -> None:
        """Close a cluster this gateway registered (idempotent); with the cluster's own token (held for its
        life) where the gateway token in the file now is not the one that registered it (a rotation: 404).

        :raises ApiError:
        """
        path = f"/v1/clusters/{quote(cluster_id, safe='')}/close"
        try:
            self._client.json("POST", path, headers=self._auth())
        except ApiError as exc:
            if exc.status != 404 or cluster_token is None:
                raise
            self._client.json("POST", path, headers={"Authorization": f"Bearer {cluster_token}"})


#: how long a stopped cluster's spool is delivered for in the background (the control plane down meanwhile)
SPOOL_DELIVERY_SECONDS = 3600.0


def deliver_spool(
    registration: dict[str, Any], spool_dir: Path, *, close: bool, timeout: float = SPOOL_DELIVERY_SECONDS
) -> bool:
    """Deliver what a stopped cluster's scheduler left in its spool, with the cluster's own token (which
    lived only in the scheduler's environment and in this process), then, with ``close``, close the
    cluster; whether everything went. Retried until ``timeout``: the control plane may be down a while."""
    from pipeline.delivery import HTTPDelivery
    from pipeline.emitter import Emitter
    from pipeline.intake import load_public_key

    delivery = HTTPDelivery(
        registration["ingest_url"],
        registration["token"],
        load_public_key(registration["intake_public_key"]),
        cluster_id=registration["cluster_id"],
    )
    emitter = Emitter(delivery, Spool(spool_dir))
    emitter.start()
    return emitter.close(timeout, retire=close)


def scheduler_env(registration: dict[str, Any], home: Path, close_timeout: float | None) -> dict[str, str]:
    """The ``DASK_PIPELINE__*`` variables a registered cluster's scheduler runs with, and this gateway's
    :data:`~pipeline.apiclient.TRUST_VARIABLES` (how it trusts the control plane's certificate: its schedulers
    post to the same URL, and the local backends pass on only PATH and a few others).

    Values are Python literals (``repr``), which dask reads back as strings: an account
    called ``123`` stays a string.
    """
    config: dict[str, Any] = {**plugin_config(registration), "home": str(home)}
    if close_timeout is not None:
        config["emitter"] = {"close-timeout": f"{close_timeout:g}s"}
    trust = {name: os.environ[name] for name in TRUST_VARIABLES if os.environ.get(name)}
    return trust | {name: repr(value) for name, value in _flatten(config, "DASK_PIPELINE") if value is not None}


def _flatten(config: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}__{key.upper().replace('-', '_')}"
        pairs.extend(_flatten(value, name) if isinstance(value, dict) else [(name, value)])
    return pairs


def registering_backend(base: type, settings: GatewaySettings) -> type:
    """A subclass of the gateway backend ``base`` that registers, configures and closes each cluster.

    :raises ConfigError: ``base`` is not a database-backed backend (its start path is not in this process)
    """
    from dask_gateway_server.backends.db_base import DBBackendBase, JobStatus

    if not (isinstance(base, type) and issubclass(base, DBBackendBase)):
        raise ConfigError(
            f"pipeline.integrations.gateway: backend {getattr(base, '__name__', base)!r} is not supported "
            "(local, jobqueue and YARN backends are; Kubernetes starts clusters in its controller)"
        )

    class PipelineBackend(base):  # type: ignore[misc,valid-type]
        """The operator's backend; every cluster registered with the control plane and running the plugin."""

        _registrations: dict[str, dict[str, Any]]

        async def do_start_cluster(self, cluster: Any) -> AsyncIterator[dict[str, Any]]:
            try:
                registration = await asyncio.to_thread(settings.register, cluster.username, cluster.name)
            except (ApiError, ConfigError) as exc:  # the gateway logs it with its traceback (the HTTP client's)
                raise type(exc)(f"cluster {cluster.name} not registered with the control plane: {exc}") from None
            cluster_id = registration["cluster_id"]
            # in memory only, for the cluster's life: its scheduler's environment, and its spool at the stop
            self._registered()[cluster.name] = registration
            started = False
            try:
                async for state in super().do_start_cluster(cluster):
                    yield {**state, STATE_KEY: cluster_id}
                started = True
            finally:
                if not started:  # it never ran: nothing will close it
                    self._registered().pop(cluster.name, None)
                    await self._close(cluster_id, cluster.name, registration)

        def get_scheduler_env(self, cluster: Any) -> dict[str, str]:
            env: dict[str, str] = super().get_scheduler_env(cluster)
            registration = self._registered().get(cluster.name)
            if registration is None:  # never run a scheduler unregistered (it would be embedded mode)
                raise ConfigError(f"cluster {cluster.name} is not registered with the control plane")
            sigint = getattr(self, "sigint_timeout", None)
            close_timeout = max(1.0, sigint / 2) if sigint else None  # the plugin's flush fits before SIGTERM
            env.update(scheduler_env(registration, settings.cluster_home(cluster.name), close_timeout))
            return env

        def get_scheduler_command(self, cluster: Any) -> list[str]:
            return [*super().get_scheduler_command(cluster), *_PRELOAD]

        async def do_stop_cluster(self, cluster: Any) -> None:
            await super().do_stop_cluster(cluster)
            registration = self._registered().pop(cluster.name, None)
            cluster_id = (cluster.state or {}).get(STATE_KEY)
            if cluster_id is None:
                return
            failed = cluster.target == JobStatus.FAILED  # its scheduler died: it becomes lost, not closed
            spool = spool_folder(settings.cluster_home(cluster.name), cluster_id)
            left = spool.is_dir() and bool(Spool(spool).pending_files())
            if left and registration is None:  # the gateway restarted since it started the cluster
                self.log.warning(
                    "Cluster %s stopped with batches in %s: left open, to become lost (not delivered: its "
                    "token was in the scheduler's environment and this gateway's memory only)",
                    cluster.name,
                    spool,
                )
                return
            if left and registration is not None:
                then = "" if failed else ", then closing it"
                self.log.info("Cluster %s stopped with batches in %s: delivering them%s", cluster.name, spool, then)
                task = asyncio.ensure_future(self._deliver(registration, spool, cluster.name, close=not failed))
                self._deliveries().add(task)
                task.add_done_callback(self._deliveries().discard)
            if failed and spool.is_dir():
                self.log.info(
                    "Cluster %s failed: %s is left to become lost in the control plane", cluster.name, cluster_id
                )
            elif not left:  # a failed one that never made a batch was never heard of: it would stay open, never lost
                await self._close(cluster_id, cluster.name, registration)

        async def _deliver(self, registration: dict[str, Any], spool: Path, name: str, *, close: bool) -> None:
            try:
                delivered = await asyncio.to_thread(deliver_spool, registration, spool, close=close)
            except Exception as exc:  # a background task: nothing above it would say
                self.log.warning("Cluster %s: its spool was not delivered: %s", name, first_line(exc))
                return
            if delivered:
                self.log.info("Cluster %s: its spool delivered%s", name, " and the cluster closed" if close else "")
            else:
                self.log.warning(
                    "Cluster %s: batches left in %s (refused, or not delivered within %.0f s); it becomes lost",
                    name,
                    spool,
                    SPOOL_DELIVERY_SECONDS,
                )

        async def _close(self, cluster_id: str, name: str, registration: dict[str, Any] | None) -> None:
            try:
                await asyncio.to_thread(
                    settings.close, cluster_id, None if registration is None else registration["token"]
                )
            except Exception as exc:  # the control plane is down: the cluster becomes lost instead
                self.log.warning(
                    "Could not close cluster %s (%s) in the control plane: %s", name, cluster_id, first_line(exc)
                )
            else:
                self.log.info("Cluster %s closed in the control plane (%s)", name, cluster_id)

        def _registered(self) -> dict[str, dict[str, Any]]:
            if not hasattr(self, "_registrations"):
                self._registrations = {}
            return self._registrations

        def _deliveries(self) -> set[asyncio.Future[None]]:
            if not hasattr(self, "_delivering"):
                self._delivering: set[asyncio.Future[None]] = set()
            return self._delivering

    PipelineBackend.__name__ = PipelineBackend.__qualname__ = f"Pipeline{base.__name__}"
    return PipelineBackend


def configure(c: Any) -> None:
    """Make every cluster the gateway configured by ``c`` starts run the plugin (call after choosing the backend).

    ``pipeline.gateway.*`` incomplete or the backend unsupported ends ``dask-gateway-server`` as every command
    of the pipeline ends on a configuration error: one line naming it, exit status 2 (raised through the
    gateway's loading of its config file, it was a traceback of that file's ``exec``).
    """
    try:
        _configure(c)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _configure(c: Any) -> None:
    from traitlets.utils.importstring import import_item

    backend = c.DaskGateway.get("backend_class", "dask_gateway_server.backends.local.UnsafeLocalBackend")
    if isinstance(backend, str):
        try:
            backend = import_item(backend)
        except ImportError as exc:  # KubeBackend without kubernetes_asyncio, a typo: the backend cannot be used
            raise ConfigError(f"DaskGateway.backend_class {backend!r} cannot be imported: {first_line(exc)}") from exc
    if _chowns_the_root(backend):
        raise ConfigError(
            f"pipeline.integrations.gateway: {backend.__name__} of this dask-gateway-server changes the owner of / "
            "to the cluster's user as it starts a cluster (its setup chowns each character of the TLS files' "
            "paths); use a jobqueue or YARN backend until that is fixed upstream (or UnsafeLocalBackend, for one "
            "trusted user)"
        )
    c.DaskGateway.backend_class = registering_backend(backend, GatewaySettings.from_config())


def _chowns_the_root(backend: Any) -> bool:
    """Whether ``backend`` is a LocalBackend whose working-directory setup has dask-gateway-server 2026.3's
    bug: ``paths.extend(path)`` puts each character of a TLS file's path ("/" first) in the list it chowns."""
    from dask_gateway_server.backends.local import LocalBackend

    if not (isinstance(backend, type) and issubclass(backend, LocalBackend)):
        return False
    if getattr(backend, "set_file_permissions", None) is not LocalBackend.set_file_permissions:
        return False  # UnsafeLocalBackend: chowns nothing
    try:
        source = inspect.getsource(getattr(backend, "setup_working_directory"))  # noqa: B009
    except (OSError, TypeError):
        return False
    return "paths.extend(path)" in source
