"""What a report leaves on disk when its process is killed: its DuckDB folder of decrypted job rows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.processes import alive

__all__ = ["folder_prefix", "remove_killed_reports"]


def folder_prefix() -> str:
    """The name a report's folder starts with: this process's id, so that another process can tell it died."""
    return f"report-{os.getpid()}-"


def remove_killed_reports(folder: Path) -> None:
    """Delete the folders of reports whose process died before closing them (SIGKILL): each holds
    decrypted job rows, which would outlive an erasure of their owner. A folder of a live process
    (a report running now) is kept."""
    for found in folder.glob("report-*"):
        pid = found.name.split("-")[1]
        if found.is_dir() and not (pid.isdigit() and alive(int(pid))):  # an earlier release's: no id
            shutil.rmtree(found, ignore_errors=True)
