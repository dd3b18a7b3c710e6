"""Run the benchmark modules, print one table, write every row as JSON.

A module that fails to import or raises shows up as an error row; the others
still run. The exit status is 1 when a module crashed (a missed goal is a
result, not a crash) and 2 for an unknown topic.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import benchmarks
from benchmarks import ROW_KEYS, row

DEFAULT_JSON = Path("bench-out/results.json")


def topics() -> list[str]:
    """``bench_<topic>.py`` modules next to this file, sorted."""
    names = (m.name for m in pkgutil.iter_modules(benchmarks.__path__))
    return sorted(n.removeprefix("bench_") for n in names if n.startswith("bench_"))


def run_topic(topic: str, quick: bool, large: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """The module's rows tagged with its topic, and whether it crashed (``large``: to modules that have large sizes)."""
    try:
        module = importlib.import_module(f"benchmarks.bench_{topic}")
        sizes = {"large": True} if large and "large" in inspect.signature(module.run).parameters else {}
        rows = list(module.run(quick, **sizes))
        for result in rows:
            missing = set(ROW_KEYS) - set(result)
            if missing:
                raise ValueError(f"row {result.get('benchmark')!r} lacks {', '.join(sorted(missing))}")
    except Exception as exc:
        traceback.print_exc()
        error = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        return [{**row(f"{topic}: crashed", math.nan, "", note=error), "topic": topic}], True
    return [{**r, "topic": topic} for r in rows], False


def _value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _met(met: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}[met]


def render(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("benchmark")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("goal")
    table.add_column("met")
    table.add_column("note", overflow="fold")
    for r in rows:
        table.add_row(r["benchmark"], _value(r["value"]), r["unit"], r["goal"], _met(r["met"]), r["note"])
    return table


def _json_safe(r: dict[str, Any]) -> dict[str, Any]:
    value = r["value"]
    return {**r, "value": None if value is None or math.isnan(value) else float(value)}


def main(argv: list[str] | None = None) -> int:
    known = topics()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("topic", nargs="*", help=f"which modules to run (default all: {', '.join(known)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test of every benchmark")
    parser.add_argument("--large", action="store_true", help="also the large sizes (reports: 100 M records)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write rows (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    unknown = [t for t in args.topic if t not in known]
    if unknown:
        print(f"unknown benchmark topic {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2

    console = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    crashed = False
    for topic in args.topic or known:
        console.print(f"[bold]{topic}[/] …")
        started = time.perf_counter()
        topic_rows, topic_crashed = run_topic(topic, args.quick, args.large)
        rows += topic_rows
        crashed |= topic_crashed
        console.print(f"[bold]{topic}[/] done in {time.perf_counter() - started:.1f} s")

    out = Console()
    if not out.is_terminal:
        out.width = max(out.width, 160)  # a log file or pipe: keep rows on one line
    out.print(render(rows, "benchmarks (quick)" if args.quick else "benchmarks"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([_json_safe(r) for r in rows], indent=2) + "\n")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
