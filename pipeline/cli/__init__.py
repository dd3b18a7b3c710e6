"""The ``metadata-pipeline`` command (also ``python -m pipeline``), one module per command group.

Exit status: 0 success, 1 a failed check, 2 bad usage or bad input (one line on
stderr naming what is wrong).
"""

from __future__ import annotations

from pipeline.cli import audit, clusters, erase, home, records, retention, tokens  # noqa: F401 - they add commands
from pipeline.cli.core import main

__all__ = ["main"]
