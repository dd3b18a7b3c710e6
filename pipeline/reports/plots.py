"""Plots over time as PNG bytes (matplotlib's object API: no pyplot, no global state)."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.reports.model import Report

__all__ = ["account_label", "render_plots"]

TOP_ACCOUNTS = 8


def account_label(row: Mapping[str, Any]) -> str:
    """The account's name when the report shows names, else a short subject ref."""
    return row.get("account") or f"{row['subject_ref'][:10]}…"


def render_plots(report: Report) -> dict[str, bytes]:
    """Plot name → PNG; plots without data are left out."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        raise ConfigError("plots need matplotlib: install dask-metadata-pipeline[reports]") from exc

    def stacked(rows: Sequence[Mapping[str, Any]], group: str, value: str, title: str, unit: str) -> bytes | None:
        totals: dict[str, float] = defaultdict(float)
        for row in rows:
            totals[row[group]] += row[value] or 0
        if not any(totals.values()):
            return None
        top = sorted(totals, key=lambda g: -totals[g])[:TOP_ACCOUNTS]
        series: dict[str, dict[Any, float]] = defaultdict(lambda: defaultdict(float))
        for row in rows:
            series[row[group] if row[group] in top else "other"][row["day"]] += row[value] or 0
        days = sorted({row["day"] for row in rows})
        fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        bottom = [0.0] * len(days)
        for name in [*top, "other"] if "other" in series else top:
            heights = [series[name].get(day, 0.0) for day in days]
            ax.bar(days, heights, bottom=bottom, label=_literal(name), width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        fig.autofmt_xdate()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    daily = [{**row, "who": account_label(row)} for row in report.usage_daily]
    plots = {
        "records_by_day": stacked(
            report.records_by_day, "store", "records", "Records held, by day observed", "records"
        ),
        "compute_hours": stacked(daily, "who", "compute_hours", "Compute hours per day, by account", "hours"),
        "tasks_completed": stacked(daily, "who", "tasks_completed", "Tasks completed per day, by account", "tasks"),
        "cluster_hours": stacked(daily, "who", "cluster_hours", "Cluster hours per day, by account", "hours"),
    }
    return {name: png for name, png in plots.items() if png is not None}


def _literal(label: str) -> str:
    """A name shown as it is: matplotlib reads text between two ``$`` as mathtext (a name ``pay$_$day`` was a
    parse error, and no report), and hides a label starting with ``_`` from the legend."""
    escaped = label.replace("$", r"\$")
    return f" {escaped}" if escaped.startswith("_") else escaped
