"""One output interface for the command line: human text or JSON.

Text is for a terminal: control characters in it (a newline or ESC sequence in
an account name) are escaped, so a row stays one line. JSON stays exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

import click

from pipeline.redact import printable

__all__ = ["Output", "to_json"]


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any, **kwargs: Any) -> str:
    """JSON with ISO 8601 datetimes; the one encoder every output uses."""
    return json.dumps(value, default=_default, **kwargs)


class Output:
    """Write results as text for people or JSON for scripts (``--json``)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, data: Any, text: Callable[[Any], str] | str) -> None:
        """One result: a JSON document, or the text rendering of it."""
        if self.as_json:
            click.echo(to_json(data, indent=2))
        else:
            click.echo(printable(text(data) if callable(text) else text, keep="\n"))

    def rows(self, rows: Iterable[Mapping[str, Any]], text: Callable[[Mapping[str, Any]], str]) -> int:
        """Many results: JSON lines, or one text line each. Returns how many."""
        count = 0
        for row in rows:
            click.echo(to_json(row) if self.as_json else printable(text(row)))
            count += 1
        return count
