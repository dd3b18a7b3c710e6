"""notebooks/compliance_report.ipynb runs top to bottom against a fixture home and shows the report."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_reports import write_demo_records

from pipeline.records import utcnow
from pipeline.retention.enforcer import enforce
from pipeline.runtime import Pipeline

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "compliance_report.ipynb"


def outputs(nb: nbformat.NotebookNode) -> tuple[str, list[str], int]:
    """(all text printed, HTML shown, number of PNG images shown)."""
    text, html, images = [], [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                text.append(output.text)
            elif output.output_type == "error":
                pytest.fail(f"notebook cell raised {output.ename}: {output.evalue}")
            else:
                data = output.get("data", {})
                html += [data["text/html"]] if "text/html" in data else []
                images += "image/png" in data
    return "".join(text), html, images


@pytest.mark.slow
def test_notebook_builds_the_report_with_plots(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = Pipeline.open(create=True)
    # noon yesterday: each day's two snapshots (2 h and 1.5 h before the day's hour) fall on one UTC day,
    # whenever the test runs (the notebook reports as of now: no later than now)
    write_demo_records(pipeline, utcnow().replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(hours=12))
    enforce(pipeline)
    monkeypatch.setenv("DASK_PIPELINE__HOME", str(home))  # the kernel is another process: config by env

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text, html, images = outputs(nb)
    assert f"home: {home}" in text
    assert "retention: PASS (0 records past their limit)" in text
    assert f"audit trail intact: {pipeline.audit.verify():,} entries" in text
    assert "last retention pass: entry" in text
    assert images == 4
    inventory = html[0]
    assert "cloud_logging" in inventory and "long_term" in inventory
    assert "acme" not in "".join(html)  # pseudonymous unless SHOW_NAMES
