"""Performance suite: ``python -m benchmarks [topic ...] [--quick] [--json PATH]``.

Each ``bench_<topic>.py`` module defines ``run(quick: bool) -> list[dict]``; every
dict is one table row with the keys in :data:`ROW_KEYS`. See README.md here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROW_KEYS", "row"]

ROW_KEYS = ("benchmark", "value", "unit", "goal", "met", "note")


def row(
    benchmark: str, value: float, unit: str, goal: str = "", met: bool | None = None, note: str = ""
) -> dict[str, Any]:
    """One result row; ``met`` is None for figures that have no goal."""
    return {"benchmark": benchmark, "value": value, "unit": unit, "goal": goal, "met": met, "note": note}
