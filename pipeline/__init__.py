"""Metadata and audit pipeline with retention enforcement for Dask clusters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MetadataPlugin", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from pipeline.plugin import MetadataPlugin


def __getattr__(name: str) -> Any:
    # importing distributed costs ~1 s: only pay for it when the plugin is wanted
    if name == "MetadataPlugin":
        from pipeline.plugin import MetadataPlugin

        return MetadataPlugin
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
