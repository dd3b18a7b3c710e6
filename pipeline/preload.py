"""``dask scheduler --preload pipeline.preload``: install the MetadataPlugin.

Works for every Scheduler, LocalCluster included, through the config key
``distributed.scheduler.preload`` or ``scheduler_kwargs={"preload": [...]}``.
Plugins added here start with the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.plugin import MetadataPlugin

if TYPE_CHECKING:
    from distributed import Scheduler


def dask_setup(scheduler: Scheduler) -> None:
    scheduler.add_plugin(MetadataPlugin())
