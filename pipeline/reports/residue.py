"""What a report leaves on disk when its process is killed: its DuckDB folder of decrypted job rows."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pipeline.processes import dead_here, namespace

__all__ = ["folder_prefix", "remove_killed_reports"]

#: a report's own folders, and no folder a person names (``report --out HOME/report-jan``)
_PREFIX = "report-db-"
#: a folder untouched this long is a killed report's, whoever's it was (another container's, a pid 1's):
#: a report writes its database as it reads, and takes minutes
IDLE_AFTER = 24 * 3600


def folder_prefix() -> str:
    """The name a report's folder starts with: this process's namespace and id, so that another process
    can tell it died (:mod:`pipeline.processes`)."""
    return f"{_PREFIX}{namespace()}-{os.getpid()}-"


def remove_killed_reports(folder: Path) -> None:
    """Delete the folders of reports whose process died before closing them (SIGKILL): each holds
    decrypted job rows, which would outlive an erasure of their owner. A folder of a live process
    (a report running now) is kept, and one of a process this one cannot check (another container's)
    until it has been idle for :data:`IDLE_AFTER`."""
    for found in folder.glob(f"{_PREFIX}*"):
        where, _, rest = found.name.removeprefix(_PREFIX).partition("-")
        pid = rest.partition("-")[0]
        if found.is_dir() and (dead_here(where, pid) or _idle(found)):
            shutil.rmtree(found, ignore_errors=True)


def _idle(found: Path) -> bool:
    """Whether nothing in ``found`` changed for :data:`IDLE_AFTER`."""
    try:
        newest = max(path.stat().st_mtime for path in (found, *found.rglob("*")))
    except OSError:  # deleted meanwhile: its report ended
        return False
    return time.time() - newest > IDLE_AFTER
