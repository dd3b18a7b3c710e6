"""Write a :class:`Report` as HTML (one self-contained file), JSON, or CSV (one file per table)."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from html import escape
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.fsmodes import output_folder, write_all_private
from pipeline.output import to_json
from pipeline.reports.model import Report
from pipeline.reports.plots import account_label

__all__ = ["FORMATS", "HTML_ROWS", "html_table", "render_html", "write_report"]

FORMATS = ("html", "json", "csv")
#: rows a table of the HTML report shows (the first, in the report's order); every row is in the CSV files
HTML_ROWS = 100


def write_report(report: Report, out_dir: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the chosen formats into ``out_dir``; returns the files written."""
    writers: dict[str, Callable[[Report, Path], dict[Path, bytes]]] = {"html": _html, "json": _json, "csv": _csv}
    files: dict[Path, bytes] = {}
    for name in formats:
        files.update(writers[name](report, out_dir))
    with output_folder(out_dir):  # all of them or none: never some of this run's files beside the last run's
        write_all_private(files)
    return list(files)


def _json(report: Report, out_dir: Path) -> dict[Path, bytes]:
    return {out_dir / "report.json": (to_json(report.as_dict(), indent=2) + "\n").encode()}


def _csv(report: Report, out_dir: Path) -> dict[Path, bytes]:
    files = {}
    for name, rows in report.tables().items():
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, report.columns(name))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        files[out_dir / f"{name}.csv"] = text.getvalue().encode()
    return files


#: what a spreadsheet reads a cell starting with as a formula (OWASP's list): names come from clusters and people
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict | list):
        return to_json(value)
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value  # shown as text, never run
    return value


def render_html(report: Report) -> str:
    """The report as one HTML page with its plots embedded."""
    try:
        import jinja2
    except ModuleNotFoundError as exc:
        raise ConfigError("the HTML report needs jinja2: install dask-metadata-pipeline[reports]") from exc
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(num=_num, when=_when, size=_size, b64=lambda b: base64.b64encode(b).decode())
    env.globals.update(account_label=account_label, html_rows=HTML_ROWS)
    return env.get_template("report.html.j2").render(r=report)


def _html(report: Report, out_dir: Path) -> dict[Path, bytes]:
    return {out_dir / "report.html": render_html(report).encode()}


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _when(value: datetime | date | None) -> str:
    if value is None:
        return "–"
    return value.strftime("%Y-%m-%d %H:%M UTC") if isinstance(value, datetime) else value.isoformat()


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    size, units = float(value), ["B", "KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:,.1f} {units[0]}"


def html_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as a plain HTML table, numbers and times formatted as in the report (for notebooks)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return _num(value, 3)
        if isinstance(value, int) and not isinstance(value, bool):
            return _num(value)
        if isinstance(value, datetime | date):
            return _when(value)
        return "–" if value is None else str(value)

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
