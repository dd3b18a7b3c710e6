"""What a report leaves on disk when its process is killed: its DuckDB folder of decrypted job rows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.processes import dead_here, namespace

__all__ = ["folder_prefix", "remove_killed_reports"]


def folder_prefix() -> str:
    """The name a report's folder starts with: this process's namespace and id, so that another process
    can tell it died (:mod:`pipeline.processes`)."""
    return f"report-{namespace()}-{os.getpid()}-"


def remove_killed_reports(folder: Path) -> None:
    """Delete the folders of reports whose process died before closing them (SIGKILL): each holds
    decrypted job rows, which would outlive an erasure of their owner. A folder of a live process
    (a report running now), or of one this process cannot check (another container's), is kept."""
    for found in folder.glob("report-*-*-*"):
        _report, where, pid, _random = found.name.split("-", 3)
        if found.is_dir() and dead_here(where, pid):
            shutil.rmtree(found, ignore_errors=True)
