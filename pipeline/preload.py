"""``dask scheduler --preload pipeline.preload``: install the MetadataPlugin.

Works for every Scheduler, LocalCluster included, through the config key
``distributed.scheduler.preload`` or ``scheduler_kwargs={"preload": [...]}``.
Plugins added here start with the scheduler.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import dask.config

from pipeline.plugin import MetadataPlugin

if TYPE_CHECKING:
    from distributed import Scheduler


def dask_setup(scheduler: Scheduler) -> None:
    _log_like_distributed()
    scheduler.add_plugin(MetadataPlugin())


def _log_like_distributed() -> None:
    """Give the plugin's log lines distributed's format (time, logger, level) and INFO level.

    distributed configures only its own loggers: without this, ``dask scheduler`` prints the
    plugin's warnings through Python's last-resort handler, bare. A process whose logging is
    already set up (a notebook, pytest, an application) keeps its own.
    """
    pipeline_logger = logging.getLogger("pipeline")
    if pipeline_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
    pipeline_logger.addHandler(handler)
    pipeline_logger.setLevel(logging.INFO)
