"""Compliance reports: DuckDB over decrypted Arrow, rendered as HTML, JSON and CSV.

::

    report = build_report(Pipeline.open(), now=..., show_names=False)
    write_report(report, Path("reports"), ["html", "json", "csv"])
"""

from __future__ import annotations

from pipeline.reports.collect import build_report
from pipeline.reports.model import Report
from pipeline.reports.render import FORMATS, render_html, write_report

__all__ = ["FORMATS", "Report", "build_report", "render_html", "write_report"]
