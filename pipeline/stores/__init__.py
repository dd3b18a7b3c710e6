"""Store backends, chosen by URL scheme.

Each scheme maps to ``module:Class``, imported only when used, so an optional
dependency that is missing becomes an error naming the extra to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipeline.errors import ConfigError
from pipeline.redact import mask_url
from pipeline.stores.base import Removed, Store

if TYPE_CHECKING:
    from pipeline.keys import Keyring

__all__ = ["SCHEMES", "Removed", "Store", "is_sql_url", "open_store"]

#: scheme -> (module:Class, extra that provides its dependencies)
SCHEMES: dict[str, tuple[str, str | None]] = {
    "sqlite": ("pipeline.stores.sql:SQLStore", None),
    "postgresql": ("pipeline.stores.sql:SQLStore", "postgres"),
    "postgresql+psycopg": ("pipeline.stores.sql:SQLStore", "postgres"),
    "file": ("pipeline.stores.localfiles:LocalFileStore", None),
    "gcp-logging": ("pipeline.stores.cloud_logging:CloudLoggingStore", "gcp"),
    "memory": ("pipeline.stores.memory:MemoryStore", None),
    "s3": ("pipeline.stores.archive:ArchiveStore", "aws"),
}


def is_sql_url(url: str) -> bool:
    """Whether ``url`` names a SQL database: the one backend that can also be the metadata database."""
    return SCHEMES.get(urlparse(url).scheme, ("", None))[0] == SCHEMES["sqlite"][0]


def open_store(url: str, *, setting: str = "store URL", keyring: Keyring | None = None) -> Store:
    """Open the backend for ``url``; ``setting`` names the config key in errors.

    ``keyring`` is handed to backends that re-encrypt what they hold (the S3 archive).
    """
    scheme = urlparse(url).scheme
    if scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES))
        raise ConfigError(f"{setting}: unknown store URL scheme {scheme!r} in {mask_url(url)!r} (known: {known})")
    target, extra = SCHEMES[scheme]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = f"; pip install 'dask-metadata-pipeline[{extra}]'" if extra else ""
        raise ConfigError(f"{setting}: backend for {scheme!r} needs {exc.name}{hint}") from exc
    backend = getattr(module, class_name)
    if not getattr(backend, "needs_keyring", False):
        store: Store = backend(url)
    elif keyring is None:
        raise ConfigError(f"{setting}: the {scheme!r} backend re-encrypts records and needs the keyring")
    else:
        store = backend(url, keyring=keyring)
    return store
