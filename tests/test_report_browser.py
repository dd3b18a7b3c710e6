"""The HTML report in headless Chromium: the page renders and its embedded plots show."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from test_reports import T0, write_demo_records

from pipeline.reports import build_report, write_report
from pipeline.runtime import Pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MATPLOTLIB_BLUE = np.array([0x1F, 0x77, 0xB4]) / 255  # the first bar colour of every plot


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("PIPELINE_REQUIRE_CHROMIUM") != "1",  # .ci/run installs it and requires it
    reason="chromium is not installed (apt-get install chromium)",
)
def test_report_renders_with_its_plots_in_headless_chromium(home: Path, tmp_path: Path) -> None:
    pipeline = Pipeline.open(create=True)
    write_demo_records(pipeline)
    write_report(build_report(pipeline, now=T0), tmp_path, ["html"])
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1200,4200",
            f"--screenshot={screenshot}",
            (tmp_path / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (4200, 1200)
    assert pixels.std() > 0.05, "the screenshot is blank"
    blue = np.all(np.abs(pixels - MATPLOTLIB_BLUE) < 0.02, axis=-1)
    # bars of the four plots, spread down the page (CSS uses no such blue)
    assert blue.sum() > 20_000
    rows_with_blue = np.flatnonzero(blue.any(axis=1))
    assert rows_with_blue.max() - rows_with_blue.min() > 2000
