"""A LocalCluster whose scheduler loads MetadataPlugin as ``dask scheduler --preload pipeline.preload`` does."""

from __future__ import annotations

from typing import Any

from distributed import LocalCluster


def preloaded_cluster(**kwargs: Any) -> LocalCluster:
    """LocalCluster(**kwargs) with the pipeline preload on its scheduler and the dashboard on a free port."""
    return LocalCluster(dashboard_address=":0", scheduler_kwargs={"preload": ["pipeline.preload"]}, **kwargs)
