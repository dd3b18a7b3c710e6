"""Settings from dask's configuration system, section ``pipeline``.

Defaults ship in ``pipeline/pipeline.yaml``; users override them in
``~/.config/dask/*.yaml`` or with ``DASK_PIPELINE__...`` environment variables,
exactly as for any other dask setting. ``{home}`` in a URL expands to
``pipeline.home`` so that one variable moves every embedded file.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dask.config
import yaml
from dask.utils import parse_timedelta

from pipeline.errors import ConfigError
from pipeline.fsmodes import private_folder
from pipeline.limits import MAX_STRING_BYTES
from pipeline.redact import mask_url, mask_urls, quoted
from pipeline.subject_names import control_character

__all__ = [
    "ServerLimits",
    "Settings",
    "default_policy_path",
    "http_url_problem",
    "not_text",
    "spool_folder",
    "text_setting",
]

_DEFAULTS_FILE = Path(__file__).with_name("pipeline.yaml")
_DEFAULTS: dict[str, Any] = yaml.safe_load(_DEFAULTS_FILE.read_text())


def _unread_settings(given: Any, defaults: dict[str, Any], at: str = "") -> list[str]:
    """Dotted names of settings the pipeline never reads, each with why: a section given a single value
    (``pipeline.long-term: postgresql://…`` for ``pipeline.long-term.url``: merging the defaults replaces it
    with the section's, dask's ``update`` mirrored here), and within the ``pipeline`` section a name no
    default has (``long-term.ulr``, ``DASK_PIPELINE__LONG_TERM_URL``). Either would quietly leave the
    setting at its default: the metadata database on SQLite, the archive off. Values are never quoted
    (one may hold a password)."""
    found = []
    if at:  # the pipeline's own section: every name is one of its defaults' (the others are other libraries')
        spellings = {spelling for key in defaults for spelling in (key, key.replace("-", "_"))}
        for key in given:
            if key not in spellings:  # as dask matches names: as written, or every hyphen an underscore
                near = difflib.get_close_matches(str(key).replace("_", "-"), sorted(defaults), n=1)
                # a name may be anything a YAML key can: a URL with its password, masked then cut as values are
                named = mask_urls(f"{at}{key}")
                named = named if len(named) <= _NAME_SHOWN else quoted(named)
                found.append(f"{named}: no such setting" + (f" (did you mean {at}{near[0]}?)" if near else ""))
    for key, default in defaults.items():
        value = given.get(dask.config.canonical_name(key, given)) if isinstance(default, dict) else None
        if isinstance(value, dict):
            found += _unread_settings(value, default, f"{at}{key}.")
        elif value is not None:
            found.append(f"{at}{key}: a section of settings ({at}{key}.{next(iter(default), '…')}, …), given one value")
    return found


#: a setting's name longer than this is quoted cut, as a value is
_NAME_SHOWN = 80


#: read before the defaults join the configuration (files and environment), which they would hide in
_UNREAD_SETTINGS = _unread_settings(dask.config.config, _DEFAULTS)
dask.config.update_defaults(_DEFAULTS)


def default_policy_path() -> Path:
    """The retention policy shipped with the package (``policies/retention.yaml``)."""
    return Path(str(resources.files("pipeline") / "policies" / "retention.yaml"))


def _get(key: str) -> Any:
    """The configured value, else the shipped default.

    The fallback matters: a config reset (``dask.config.config.clear()``, a
    restored snapshot as in distributed's test utilities) drops what
    ``update_defaults`` added at import, and the plugin may start after one.
    """
    return dask.config.get(f"pipeline.{key}", default=dask.config.get(f"pipeline.{key}", None, config=_DEFAULTS))


#: a cluster id that may name a folder as it is
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


#: durations that may be zero: no wait before sealing a batch, a superseded master key destroyed at once
_MAY_BE_ZERO = frozenset({"emitter.linger", "keys.retire-after"})
#: the longest duration of any setting: certificates, tokens and keys past it end after the year 9999
_MAX_DURATION = timedelta(days=100 * 365)


def http_url_problem(url: str) -> str | None:
    """What keeps ``url`` from being the control plane's address, as a phrase (None: nothing): it must be an
    http(s) URL with a host and, if it names one, a port that is a number (one httpx can send to), and name
    no user or password (httpx would send them as Basic auth in place of the bearer token: a 401)."""
    try:
        address = urlparse(url)
        address.port  # noqa: B018 - raises for a port that is no number
    except ValueError:  # an unclosed [IPv6, a port that is no number
        return "is not an http(s):// URL"
    if address.scheme not in ("http", "https") or not address.hostname:
        return "is not an http(s):// URL"
    if address.username is not None or address.password is not None:
        return "names a user or password: the API token is the credential; give the URL without them"
    return None


def base_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, an IPv6 address in brackets (``http://::1:8800`` was no URL a plugin would take)."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def text_setting(key: str, value: Any) -> str | None:
    """A setting that is text (or unset).

    :raises ConfigError: :func:`not_text`
    """
    if value is None or isinstance(value, str):
        return value
    raise not_text(key, value)


def not_text(key: str, value: Any) -> ConfigError:
    """The error of a text setting given something else: dask reads an environment variable as a Python
    literal (``DASK_PIPELINE__ACCOUNT=1234`` is the number 1234, ``…=1e3`` is 1000.0, ``…=None`` is None)."""
    variable = "DASK_PIPELINE__" + key.upper().replace(".", "__").replace("-", "_")
    return ConfigError(
        f"pipeline.{key}: {value!r} is not text; an environment variable is read as a Python literal: "
        f"quote it ({variable}='\"...\"')"
    )


@dataclass(frozen=True)
class ServerLimits:
    """``pipeline.server.*`` limits: what one tenant, token or connection may take of the control plane."""

    ingest_concurrency_per_account: int
    ingest_concurrency_per_token: int
    ingest_rate_per_account: int  # batches a second (also the burst)
    ingest_rate_per_token: int
    erasure_filings_per_hour: int  # per member
    max_connections: int
    header_timeout: float
    body_timeout: float


_LIMIT_COUNTS = [
    "ingest_concurrency_per_account",
    "ingest_concurrency_per_token",
    "ingest_rate_per_account",
    "ingest_rate_per_token",
    "erasure_filings_per_hour",
    "max_connections",
]


@dataclass(frozen=True)
class Settings:
    """A resolved snapshot of the ``pipeline`` configuration section."""

    home: Path
    account: str | None
    user: str | None
    cluster_id: str | None
    image: str | None
    plugin_interval: float
    close_timeout: float
    retry_max: float
    linger: float
    long_term_url: str
    cloud_logging_url: str
    archive_url: str | None
    keys_url: str
    retire_after: timedelta
    witness_url: str
    signing_key_url: str
    policy_path: Path
    retention_cron: str
    requests_interval: float
    tls_validity: float
    aws_role_arn: str | None
    aws_session_duration: float
    server_host: str
    server_port: int
    tls_cert: Path | None
    tls_key: Path | None
    cluster_token_ttl: float
    limits: ServerLimits
    cluster_lost_after: float
    api_url: str | None
    ingest_url: str | None = None
    ingest_token: str | None = None
    ingest_public_key: str | None = None
    verify_key: str | None = None

    @classmethod
    def from_config(cls, **overrides: Any) -> Settings:
        """Read the current dask configuration; keyword arguments win over it."""
        # and as set since (``dask.config.set`` in a notebook replaces the section, which reads as its defaults)
        if problems := _UNREAD_SETTINGS or _unread_settings(dask.config.config, _DEFAULTS):
            raise ConfigError(problems[0])
        named = overrides.pop("home", None) or _get("home")
        if named is not None and not isinstance(named, str | os.PathLike):  # a mapping made a folder "{'a': 1}"
            raise not_text("home", named)
        if named is None or not str(named).strip():  # DASK_PIPELINE__HOME= would make the current folder the home
            raise ConfigError("pipeline.home: must name a folder, not be empty")
        home = Path(os.path.expanduser(str(named))).absolute()
        try:  # as expanded: $HOME or the current folder may hold the bytes
            str(home).encode()
        except UnicodeEncodeError:  # bytes an environment variable held that are no UTF-8
            raise ConfigError(f"pipeline.home: {quoted(str(home))} is not UTF-8 text") from None

        def url(key: str) -> str | None:
            value = _get(key)
            if value is None:
                return None
            try:
                expanded = str(value).format(home=home)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"pipeline.{key}: cannot expand {quoted(mask_url(str(value)))}: {exc}") from exc
            try:  # read by each store's own parser later, where a broken host was a traceback
                urlparse(expanded)
            except ValueError as exc:
                raise ConfigError(f"pipeline.{key}: {quoted(mask_url(expanded))} is not a URL: {exc}") from None
            return expanded

        def seconds(key: str) -> float:
            """A duration; more than none unless :data:`_MAY_BE_ZERO` says (a zero timeout answers nothing)."""
            value = _get(key)
            try:
                duration = float(parse_timedelta(value, default="seconds"))
            except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as exc:
                raise ConfigError(f"pipeline.{key}: {quoted(value)} is not a duration") from exc
            if not (duration >= 0 if key in _MAY_BE_ZERO else duration > 0) or duration == float("inf"):
                at_least = "0 or more" if key in _MAY_BE_ZERO else "more than 0"
                raise ConfigError(f"pipeline.{key}: {quoted(value)} must be a finite duration of {at_least}")
            if duration > _MAX_DURATION.total_seconds():
                raise ConfigError(f"pipeline.{key}: {quoted(value)} must be a finite duration of at most 100 years")
            return duration

        def text(key: str) -> str | None:
            return text_setting(key, _get(key))

        def name(key: str, *, printable: bool = True) -> str | None:
            """A name the plugin's records carry, given as a keyword (a plugin made in code) or configured;
            refused here where ingest would refuse it (every batch of the plugin would be set aside)."""
            given = overrides.pop(key.replace("-", "_"), None)
            value = text(key) if given is None else text_setting(key, given)
            if value is None:
                return None
            found = control_character(value) if printable else None
            if found is not None:
                raise ConfigError(
                    f"pipeline.{key}: {quoted(value)} holds a control character ({found}); a name may not"
                )
            try:
                size = len(value.encode())
            except UnicodeEncodeError:  # bytes an environment variable held that are no UTF-8
                raise ConfigError(f"pipeline.{key}: {quoted(value)} is not UTF-8 text") from None
            if size > MAX_STRING_BYTES:
                raise ConfigError(f"pipeline.{key}: {size} bytes of UTF-8; at most {MAX_STRING_BYTES}")
            return value

        def address(key: str) -> str | None:
            """The control plane's URL as others reach it (empty: unset)."""
            value = text(key)
            if value and (problem := http_url_problem(value)):
                raise ConfigError(f"pipeline.{key}: {quoted(mask_url(value))} {problem}")
            return value

        def path(key: str) -> Path | None:
            value = _get(key)
            return Path(os.path.expanduser(str(value))) if value else None

        def count(key: str) -> int:
            value = _get(key)
            if not str(value).isdigit() or int(value) < 1:
                raise ConfigError(f"pipeline.{key}: {value!r} is not a positive whole number")
            return int(value)

        def port(key: str) -> int:
            value = _get(key)
            number = int(value) if str(value).isdigit() else -1
            if not 0 <= number <= 65535:
                raise ConfigError(f"pipeline.{key}: {value!r} is not a TCP port number")
            return number

        policy = text("policy")
        cron = text("service.retention-cron")
        if cron is None:
            raise ConfigError("pipeline.service.retention-cron: must be a crontab expression (five fields)")
        host = text("server.host")
        if host is None:  # uvicorn took it as the host "None", after a new home's keys were made ("": every interface)
            raise ConfigError("pipeline.server.host: must name an address to listen on (127.0.0.1, 0.0.0.0, ...)")
        values: dict[str, Any] = {
            "home": home,
            "account": name("account"),
            "user": name("user"),
            "cluster_id": name("cluster-id", printable=False),
            "image": name("image", printable=False),
            "plugin_interval": seconds("plugin.interval"),
            "close_timeout": seconds("emitter.close-timeout"),
            "retry_max": seconds("emitter.retry-max"),
            "linger": seconds("emitter.linger"),
            "long_term_url": url("long-term.url"),
            "cloud_logging_url": url("cloud-logging.url"),
            "archive_url": url("archive.url"),
            "keys_url": url("keys.url"),
            "retire_after": timedelta(seconds=seconds("keys.retire-after")),
            "witness_url": url("audit.witness-url"),
            "signing_key_url": url("audit.signing-key-url"),
            "verify_key": text("audit.verify-key"),
            "policy_path": Path(os.path.expanduser(policy)) if policy else default_policy_path(),
            "retention_cron": cron,
            "requests_interval": seconds("service.requests-interval"),
            "tls_validity": seconds("tls.validity"),
            "aws_role_arn": text("aws.role-arn"),
            "aws_session_duration": seconds("aws.session-duration"),
            "server_host": host,
            "server_port": port("server.port"),
            "tls_cert": path("server.tls-cert"),
            "tls_key": path("server.tls-key"),
            "cluster_token_ttl": seconds("server.cluster-token-ttl"),
            "limits": ServerLimits(
                **{field: count(f"server.{field.replace('_', '-')}") for field in _LIMIT_COUNTS},
                header_timeout=seconds("server.header-timeout"),
                body_timeout=seconds("server.body-timeout"),
            ),
            "cluster_lost_after": seconds("server.cluster-lost-after"),
            "api_url": address("api.url"),
            "ingest_url": text("ingest.url"),
            "ingest_token": text("ingest.token"),
            "ingest_public_key": text("ingest.public-key"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def store_urls(self) -> dict[str, str]:
        """Store name (as the policy calls it) → URL."""
        return {"long_term": self.long_term_url, "cloud_logging": self.cloud_logging_url}

    def resolved_cluster_id(self) -> str:
        return self.cluster_id or f"cluster-{uuid.uuid4().hex[:12]}"

    def ensure_home(self) -> Path:
        """Create the home folder if needed; it holds keys and encrypted data, so its owner only."""
        return private_folder(self.home)

    @property
    def spool_dir(self) -> Path:
        return spool_folder(self.home, self.cluster_id)


def spool_folder(home: Path, cluster_id: str | None) -> Path:
    """Where a scheduler spools: ``{home}/spool``, and with a cluster id a folder of that cluster's own.

    Clusters started on one host with one home share it otherwise, and a new cluster's scheduler
    would replay a dead one's batches, all refused (they name another cluster) and set aside.
    An id that is no plain file name goes by its hash.
    """
    spool = home / "spool"
    if cluster_id is None:
        return spool
    name = cluster_id if _PLAIN_NAME.fullmatch(cluster_id) else hashlib.sha256(cluster_id.encode()).hexdigest()[:32]
    return spool / "clusters" / name
