"""Is MetadataPlugin invisible to Dask? distributed's own tests with and without it on every scheduler.

    python -m benchmarks.distributed_suite CHECKOUT [--files test_scheduler.py,...] [--rounds N]

CHECKOUT is a copy of the dask/distributed repository at the commit matching the
installed version (or the nearest), e.g. ``git archive COMMIT conftest.py
pyproject.toml distributed/tests | tar -x -C CHECKOUT``; this script fetches
nothing. Its tests, conftest and pytest settings are copied to a temp folder
without the package source, so they run against the installed distributed.

Each file runs in pytest both ways, alternating which goes first: once plain
and once with ``DASK_DISTRIBUTED__SCHEDULER__PRELOAD=["pipeline.preload"]`` (so
every Scheduler loads the plugin) and a temp ``DASK_PIPELINE__HOME``. A test is
broken when it passed in every plain run and failed in a run with the plugin;
each broken test is run alone twice more both ways, and is reported as
reproducible only if it fails there with the plugin and passes without it.
Not part of ``make test`` or ``make bench``: a round runs the four files both ways,
about 10 minutes here, so the default two rounds take about 20.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

FILES = ("test_scheduler.py", "test_client.py", "test_worker.py", "test_steal.py")
MODES = ("plain", "plugin")
GOAL_RATIO = 1.1


def _ini(checkout: Path) -> str:
    """distributed's pytest settings as a pytest.ini, less what needs plugins not installed here."""
    options = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = [a for a in options.get("addopts", "").split() if a not in ("--color=yes", "--durations=20")]
    markers = list(options.get("markers", ()))
    if importlib.util.find_spec("pytest_timeout") is None:
        options.pop("timeout", None)
        options.pop("timeout_method", None)
    if importlib.util.find_spec("pytest_rerunfailures") is None:
        markers.append("flaky: rerun marker (pytest-rerunfailures not installed: runs once)")
    lines = ["[pytest]", "addopts = " + " ".join(addopts)]
    lines += ["filterwarnings ="] + [f"    {w}" for w in options.get("filterwarnings", ())]
    lines += ["markers ="] + [f"    {m}" for m in markers]
    lines += [f"{k} = {options[k]}" for k in ("minversion", "timeout", "timeout_method") if k in options]
    return "\n".join(lines) + "\n"


def prepare(checkout: Path, into: Path) -> Path:
    """The installed distributed package with the checkout's tests, conftest and settings beside it.

    A copy of the installed package rather than the checkout's source, so that
    the tests exercise what the plugin runs with; its ``tests`` folder is where
    ``distributed.utils_test`` looks for the TLS certificates the tests use.
    """
    if not (checkout / "distributed" / "tests").is_dir() or not (checkout / "pyproject.toml").is_file():
        raise SystemExit(f"error: {checkout} holds no distributed/tests and pyproject.toml of dask/distributed")
    installed = Path(importlib.util.find_spec("distributed").origin).parent  # type: ignore[arg-type,union-attr]
    shutil.copytree(installed, into / "distributed", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(checkout / "distributed" / "tests", into / "distributed" / "tests", dirs_exist_ok=True)
    shutil.copy(checkout / "conftest.py", into / "conftest.py")
    (into / "pytest.ini").write_text(_ini(checkout))
    return into


def _environment(root: Path, mode: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    if mode == "plugin":
        env["DASK_DISTRIBUTED__SCHEDULER__PRELOAD"] = '["pipeline.preload"]'
        env["DASK_PIPELINE__HOME"] = str(home)
        env["DASK_PIPELINE__ACCOUNT"] = "distributed-suite"
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_pytest(root: Path, mode: str, targets: list[str], report: Path) -> tuple[float, float]:
    """Run targets under root in one mode; wall and CPU seconds. Outcomes go to the JUnit XML report.

    CPU time (of pytest and the worker processes it waited for) is the steadier
    figure on a shared machine, where wall time swings with other people's load.
    """
    with tempfile.TemporaryDirectory(prefix="suite-home-") as home:
        cpu = _children_cpu()
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *targets,
                "-p",
                "no:cacheprovider",
                "-q",
                "-o",
                "junit_family=xunit1",
                f"--junitxml={report}",
            ],
            cwd=root,
            env=_environment(root, mode, Path(home)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return time.perf_counter() - started, _children_cpu() - cpu


def outcomes(report: Path) -> dict[str, str]:
    """Test id → passed / failed / skipped from a JUnit XML report (an error counts as failed)."""
    if not report.exists():
        return {}
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('file')}::{case.get('name')}"
        if case.find("skipped") is not None:
            result[test] = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            result[test] = "failed"
        else:
            result[test] = "passed"
    return result


def recheck(root: Path, test: str, out: Path) -> bool:
    """Whether a test broken in the file run fails alone with the plugin and passes without, twice each."""
    for attempt in range(2):
        for mode in MODES:
            report = out / f"recheck-{attempt}-{mode}.xml"
            run_pytest(root, mode, [test], report)
            if outcomes(report).get(test) != ("passed" if mode == "plain" else "failed"):
                return False
    return True


def compare(root: Path, files: list[str], rounds: int, out: Path) -> list[dict[str, Any]]:
    rows = []
    for name in files:
        seconds: dict[str, float] = defaultdict(float)
        cpu: dict[str, float] = defaultdict(float)
        results: dict[str, list[dict[str, str]]] = defaultdict(list)
        for round_ in range(rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                report = out / f"{name}-{mode}-{round_}.xml"
                wall, used = run_pytest(root, mode, [f"distributed/tests/{name}"], report)
                seconds[mode] += wall
                cpu[mode] += used
                results[mode].append(outcomes(report))
                print(f"{name} {mode} round {round_}: {wall:.0f} s wall, {used:.0f} s CPU", file=sys.stderr)
        plain_passed = set.intersection(*({t for t, o in r.items() if o == "passed"} for r in results["plain"]))
        broken = sorted({t for r in results["plugin"] for t, o in r.items() if o == "failed"} & plain_passed)
        reproducible = [t for t in broken if recheck(root, t, out)]
        rows.append(
            {
                "file": name,
                "tests": len(results["plain"][0]),
                "passed_plain": len(plain_passed),
                "passed_plugin": len(
                    set.intersection(*({t for t, o in r.items() if o == "passed"} for r in results["plugin"]))
                ),
                "broken_in_run": broken,
                "broken_reproducible": reproducible,
                "seconds_plain": seconds["plain"] / rounds,
                "seconds_plugin": seconds["plugin"] / rounds,
                "cpu_plain": cpu["plain"] / rounds,
                "cpu_plugin": cpu["plugin"] / rounds,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| file | tests | passed plain | passed plugin | broken (in run / alone) | wall s plain / plugin | ratio "
        "| CPU s plain / plugin | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows + [_total(rows)]:
        lines.append(
            f"| {r['file']} | {r['tests']} | {r['passed_plain']} | {r['passed_plugin']} | "
            f"{len(r['broken_in_run'])} / {len(r['broken_reproducible'])} | "
            f"{r['seconds_plain']:.0f} / {r['seconds_plugin']:.0f} | {r['seconds_plugin'] / r['seconds_plain']:.2f} | "
            f"{r['cpu_plain']:.0f} / {r['cpu_plugin']:.0f} | {r['cpu_plugin'] / r['cpu_plain']:.2f} |"
        )
    for r in rows:
        for test in r["broken_in_run"]:
            state = "reproducible" if test in r["broken_reproducible"] else "passes alone: flaky"
            lines.append(f"- broken in the file run: {test} ({state})")
    return "\n".join(lines)


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"file": "all", "broken_in_run": [], "broken_reproducible": []}
    for r in rows:
        for key, value in r.items():
            if key != "file":
                total[key] = total.get(key, 0 if not isinstance(value, list) else []) + value
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="dask/distributed repository copy (tests, conftest.py, pyproject)")
    parser.add_argument("--files", default=",".join(FILES), help="comma-separated test files (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each file in each mode (default: 2)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/distributed-suite"), help="JUnit reports")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="distributed-suite-") as tmp:
        root = prepare(args.checkout, Path(tmp))
        rows = compare(root, [f.strip() for f in args.files.split(",") if f.strip()], args.rounds, args.out.absolute())
    print(table(rows))
    total = _total(rows)
    print(f"goal: no test broken, ≤ {GOAL_RATIO}× the time", file=sys.stderr)
    return 1 if total["broken_reproducible"] or total["cpu_plugin"] > GOAL_RATIO * total["cpu_plain"] else 0


if __name__ == "__main__":
    sys.exit(main())
