"""Issue 10: every bad input a review found gives one line and exit 2 (1 for a failed check), and loses nothing.

Each test is the attack or mistake as a user would make it, run through the real
command line on a real home (SQLite, local log files, key file).
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dask.config
import pytest
from click.testing import Result
from conftest import make_record, one_line, run, sealed_batch
from sqlalchemy import update

from pipeline import db
from pipeline.config import Settings, default_policy_path
from pipeline.errors import ConfigError, PolicyError
from pipeline.retention.policy import load_policy
from pipeline.runtime import Pipeline
from pipeline.spool import Spool

SECRET = "s3cret-Pa55"


def add_account(account: str = "acme", user: str = "ann") -> Result:
    return run("accounts", "add", "--account", account, "--username", user, "--email", f"{user}@example.test")


def write_policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


SHIPPED = default_policy_path().read_text()


# 1. Policy YAML bombs -------------------------------------------------------------------------------------------


def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nversion: *a{levels - 1}\n"


def test_policy_with_yaml_aliases_is_refused_before_expanding_them(tmp_path: Path, home: Path) -> None:
    path = write_policy(tmp_path, _bomb(5))  # 59,049 strings once expanded (the review's 9 levels: 2.3 GB)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: not valid YAML at line 2: YAML aliases (*name) are not allowed"
    with dask.config.set({"pipeline.policy": str(path)}):
        line = one_line(run("records"))
    assert line == f"error: {path}: not valid YAML at line 2: YAML aliases (*name) are not allowed"


def test_a_huge_bad_value_is_quoted_only_in_part(tmp_path: Path) -> None:
    path = write_policy(tmp_path, SHIPPED.replace("cluster_jobs: 30d", "cluster_jobs: " + "9" * 100_000 + "x"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.field == "stores.cloud_logging.cluster_jobs"
    assert info.value.reason.startswith("'99999") and "… is not a duration like 30d or 12h" in info.value.reason
    assert len(str(info.value)) < len(str(path)) + 120


# 2. Policy validation ------------------------------------------------------------------------------------------

INVALID_POLICIES = {
    "duration overflowing timedelta": (
        SHIPPED.replace("cluster_jobs: 30d", "cluster_jobs: 99999999999999999999d"),
        "stores.cloud_logging.cluster_jobs",
        "'99999999999999999999d' is not a duration like 30d or 12h",
    ),
    "duration in Arabic-Indic digits": (
        SHIPPED.replace("cluster_jobs: 30d", "cluster_jobs: \u0663\u0660d"),
        "stores.cloud_logging.cluster_jobs",
        "'\u0663\u0660d' is not a duration like 30d or 12h",
    ),
    "duration ending in a newline": (
        SHIPPED.replace("cluster_jobs: 30d", 'cluster_jobs: "30d\\n"'),
        "stores.cloud_logging.cluster_jobs",
        "'30d\\n' is not a duration like 30d or 12h",
    ),
    "duration of 2.7 million years": (
        SHIPPED.replace("cluster_jobs: 30d", "cluster_jobs: 999999999d"),
        "stores.cloud_logging.cluster_jobs",
        "'999999999d' is longer than 36500d (100 years)",
    ),
    "erasure deadline of 2.7 million years": (
        SHIPPED.replace("deadline: 30d", "deadline: 999999999d"),
        "erasure.deadline",
        "'999999999d' is longer than 36500d (100 years)",
    ),
    "hours beyond 100 years": (
        SHIPPED.replace("cluster_jobs: 30d", "cluster_jobs: 876001h"),
        "stores.cloud_logging.cluster_jobs",
        "'876001h' is longer than 36500d (100 years)",
    ),
    "typo in an erasure key": (
        SHIPPED.replace("deadline: 30d", "deadlin: 1d"),
        "erasure.deadlin",
        "unknown field (known: deadline, stores)",
    ),
    "unknown top-level keys of mixed types": (
        SHIPPED + "1: one\nnotes: two\n",
        "1",
        "unknown field (known: version, stores, erasure)",
    ),
    "erasure covering no store": (
        SHIPPED.replace("stores: [long_term, cloud_logging]", "stores: []"),
        "erasure.stores",
        "must be a non-empty list of store names",
    ),
    "erasure missing a store that holds data": (
        SHIPPED.replace("stores: [long_term, cloud_logging]", "stores: [long_term]"),
        "erasure.stores",
        "misses cloud_logging, which holds data: an erasure must cover it",
    ),
    "version given as a boolean": (SHIPPED.replace("version: 1", "version: true"), "version", "unsupported version"),
}


@pytest.mark.parametrize("case", sorted(INVALID_POLICIES))
def test_invalid_policy_names_field_and_reason(case: str, tmp_path: Path) -> None:
    text, field, reason = INVALID_POLICIES[case]
    with pytest.raises(PolicyError) as info:
        load_policy(write_policy(tmp_path, text))
    assert (info.value.field, info.value.reason[: len(reason)]) == (field, reason)


@pytest.mark.parametrize(
    ("inserted", "key"),
    [
        ("version: 1", "version"),
        ("  long_term:\n    account: 30d", "long_term"),
        ("    software_env: 1h", "software_env"),
    ],
    ids=["top level", "store", "data type"],
)
def test_duplicate_yaml_keys_are_refused(inserted: str, key: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, SHIPPED.replace("erasure:", f"{inserted}\nerasure:"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: not valid YAML at line 10: duplicate key {key!r}"


@pytest.mark.parametrize("key", ["[a]", "{a: 1}"], ids=["list", "mapping"])
def test_a_compound_yaml_key_is_one_line_not_a_traceback(key: str, tmp_path: Path, home: Path) -> None:
    path = write_policy(tmp_path, SHIPPED.replace("erasure:", f"? {key}\n: 30d\nerasure:"))
    with dask.config.set({"pipeline.policy": str(path)}):
        line = one_line(run("records"))
    assert line == f"error: {path}: not valid YAML at line 10: a mapping key must be a name"


def test_a_policy_nested_hundreds_deep_is_one_line_not_a_traceback(tmp_path: Path, home: Path) -> None:
    """The YAML parser's RecursionError was 2,990 lines of traceback (r23)."""
    path = write_policy(tmp_path, "version: 1\nstores: " + "[" * 400 + "]" * 400 + "\n")
    with dask.config.set({"pipeline.policy": str(path)}):
        assert one_line(run("records")) == f"error: {path}: nested too deeply to be a policy"


@pytest.mark.parametrize("key", ["long-term.url", "cloud-logging.url", "keys.url", "audit.witness-url"])
def test_a_url_setting_with_a_broken_host_is_one_line(key: str, home: Path) -> None:
    """An unclosed ``[`` (``postgresql+psycopg://root@[::1/test``) was a ValueError traceback from each
    store's own URL parser (r23)."""
    with dask.config.set({f"pipeline.{key}": "postgresql+psycopg://root:pw@[::1/test"}):
        line = one_line(run("records"))
    assert line == f"error: pipeline.{key}: 'postgresql+psycopg://***@[::1/test' is not a URL: Invalid IPv6 URL"


def test_a_home_that_is_not_utf8_is_one_line_and_made_nowhere(tmp_path: Path) -> None:
    """``DASK_PIPELINE__HOME=$'…\\xff'`` made the folder, then a UnicodeEncodeError traceback (r23)."""
    named = os.fsdecode(os.fsencode(str(tmp_path)) + b"/h\xff")
    with dask.config.set({"pipeline.home": named}):
        line = one_line(run("records"))
    assert line.startswith("error: pipeline.home: ") and line.endswith("is not UTF-8 text")
    assert os.listdir(tmp_path) == []


def test_a_home_under_a_home_folder_that_is_not_utf8_is_one_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~/pl`` (or the default home) with ``$HOME`` not UTF-8 passed the check, made as given (r28)."""
    monkeypatch.setenv("HOME", os.fsdecode(os.fsencode(str(tmp_path)) + b"/h\xff"))
    with dask.config.set({"pipeline.home": "~/pl"}):
        line = one_line(run("records"))
    assert line.startswith("error: pipeline.home: ") and line.endswith("is not UTF-8 text")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "command",
    [["erase", "request", "--account", "acme"], ["enforce"], ["report", "--out", "REPORT"]],
)
def test_a_policy_with_an_absurd_deadline_stops_every_command_with_one_line(
    command: list[str], tmp_path: Path, home: Path
) -> None:
    add_account()
    path = write_policy(tmp_path, SHIPPED.replace("deadline: 30d", "deadline: 999999999d"))
    with dask.config.set({"pipeline.policy": str(path)}):
        line = one_line(run(*[str(tmp_path / "r") if a == "REPORT" else a for a in command]))
    assert line == f"error: {path}: erasure.deadline: '999999999d' is longer than 36500d (100 years)"


# 3. --now ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["0001-01-01", "9999-12-31T23:59:59", "1969-12-31T23:59:59Z", "9000-01-01"])
@pytest.mark.parametrize("command", [["enforce"], ["report", "--out", "REPORT"]])
def test_now_out_of_range_is_one_line(when: str, command: list[str], tmp_path: Path, home: Path) -> None:
    run("init")
    args = [str(tmp_path / "r") if a == "REPORT" else a for a in command]
    line = one_line(run(*args, "--now", when))
    assert (
        line == f"error: Invalid value for '--now': '{when}' is out of range (1970-01-01 or later, before 9000-01-01)"
    )
    assert not (tmp_path / "r").exists()


def test_a_bad_now_is_one_line_too(home: Path) -> None:
    line = one_line(run("enforce", "--now", "yesterday\nforged"))
    assert line == (
        "error: Invalid value for '--now': 'yesterday\\nforged' is not an ISO 8601 time like 2026-01-31T12:00:00Z"
    )


def test_a_pass_with_a_simulated_clock_says_so_in_its_output_and_audit_entry(home: Path, tmp_path: Path) -> None:
    run("init")
    result = run("enforce", "--now", "2030-01-01T00:00:00Z", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["retention"]
    assert (summary["now"], summary["simulated_clock"]) == ("2030-01-01T00:00:00+00:00", True)
    text = run("enforce", "--now", "2030-01-02")
    assert "retention pass as of 2030-01-02T00:00:00+00:00 (simulated clock: --now)" in text.stdout
    real = run("enforce", "--json")
    assert json.loads(real.stdout)["retention"]["simulated_clock"] is False

    pipeline = Pipeline.open(Settings.from_config())
    passes = [e.details for e in pipeline.audit.entries() if e.action == "retention.pass"]
    assert [(d["now"][:10], d["simulated_clock"]) for d in passes[:2]] == [("2030-01-01", True), ("2030-01-02", True)]
    assert passes[2]["simulated_clock"] is False

    report = run("report", "--out", str(tmp_path / "r"), "--now", "2030-01-01", "--format", "json")
    assert report.stdout.startswith("report as of --now 2030-01-01T00:00:00+00:00\n")


# 4. A foreign file in the logging store ------------------------------------------------------------------------


def _logs_with_strays(settings: Settings) -> tuple[Pipeline, list[Path]]:
    pipeline = Pipeline.open(settings, create=True)
    old = datetime.now(UTC) - timedelta(days=40)
    pipeline.write_records(
        [
            make_record("cluster_snapshot"),
            make_record("cluster_snapshot", observed_at=old),
            make_record("software_env", account="globex"),
        ]
    )
    logs = settings.home / "logs"
    (subject_folder,) = [p for p in (logs / "cluster_jobs").glob("*/*") if p.parent.name == f"{old:%Y-%m-%d}"]
    strays = [subject_folder / "notes.seg", logs / "notes.seg", logs / "cluster_jobs" / "backup" / "x.seg"]
    for stray in strays:
        stray.parent.mkdir(exist_ok=True)
        stray.write_text("my notes\n")
    return pipeline, strays


def test_a_foreign_file_in_the_logging_store_is_skipped_and_reported_by_records(home: Path, settings: Settings) -> None:
    _pipeline, strays = _logs_with_strays(settings)
    result = run("records", "--store", "cloud_logging")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3
    shown = sorted(str(p.parent) if p.parent.name == "backup" else str(p) for p in strays)
    assert result.stderr.splitlines() == [
        "3 records in cloud_logging",
        f"skipped 3 foreign file(s) in cloud_logging: {', '.join(shown)}",
    ]


def test_a_foreign_file_does_not_stop_retention_or_the_report(home: Path, settings: Settings, tmp_path: Path) -> None:
    _pipeline, strays = _logs_with_strays(settings)
    enforced = run("enforce", "--json")
    assert enforced.exit_code == 0, enforced.output
    summary = json.loads(enforced.stdout)["retention"]
    assert summary["removed"]["cloud_logging"]["cluster_jobs"]["records"] == 1
    assert summary["foreign_files"] == {"cloud_logging": 2}  # those inside the type folders a pass reads
    assert all(p.exists() for p in strays)  # not ours: left in place

    reported = run("report", "--out", str(tmp_path / "r"), "--format", "json")
    assert reported.exit_code == 0, reported.output
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(doc["foreign_files"]) == 3
    assert sum(row["records"] for row in doc["inventory"] if row["store"] == "cloud_logging") == 2


def test_a_foreign_file_does_not_fail_an_erasure(home: Path, settings: Settings) -> None:
    from pipeline.retention.requests import file_request, get_request, process_pending

    pipeline, strays = _logs_with_strays(settings)
    request = file_request(pipeline, "acme")
    process_pending(pipeline)
    done = get_request(pipeline, request.request_id)
    assert (done.state, done.error) == ("completed", None)
    assert done.receipt["stores"]["cloud_logging"]["records"] == 2
    assert strays[0].exists()
    assert [r["account"] for r in pipeline.read_records("cloud_logging")] == ["globex"]


# 5. Secrets in output ------------------------------------------------------------------------------------------


def test_init_masks_credentials_in_every_url_it_prints(home: Path) -> None:
    url = f"memory://archiver:{SECRET}@logs?token={SECRET}&region=eu"
    with dask.config.set({"pipeline.cloud-logging.url": url}):
        text, as_json = run("init"), run("init", "--json")
    assert text.exit_code == as_json.exit_code == 0, text.output
    assert SECRET not in text.output + as_json.output
    assert json.loads(as_json.stdout)["cloud_logging"] == "memory://archiver:***@logs?token=***&region=eu"
    assert "memory://archiver:***@logs?token=***&region=eu" in text.stdout


def test_init_masks_the_postgresql_password(home: Path, postgres_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(password=SECRET).render_as_string(hide_password=False)
    with dask.config.set({"pipeline.long-term.url": url}):
        result = run("init", "--json")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert ":***@" in json.loads(result.stdout)["long_term"]


@pytest.mark.parametrize(
    ("key", "scheme"), [("pipeline.cloud-logging.url", "ftp"), ("pipeline.keys.url", "vault")], ids=["store", "keys"]
)
def test_unknown_scheme_error_masks_the_password(key: str, scheme: str, home: Path) -> None:
    with dask.config.set({key: f"{scheme}://admin:{SECRET}@example.test/x"}):
        line = one_line(run("init"))
    assert SECRET not in line
    assert f"'{scheme}://admin:***@example.test/x'" in line


# 6. Tracebacks instead of one line -----------------------------------------------------------------------------

NOT_UTF8 = "\udcff"  # what Python makes of the argument bytes $'\xff'


@pytest.mark.parametrize(
    "command",
    [
        ["accounts", "add", "--account", NOT_UTF8, "--username", "u", "--email", "e"],
        ["accounts", "add", "--account", "acme", "--username", f"ann{NOT_UTF8}", "--email", "e"],
        ["records", "--account", NOT_UTF8],
        ["erase", "request", "--account", NOT_UTF8],
        ["erase", "request", "--account", "acme", "--user", NOT_UTF8],
        ["report", "--out", f"out{NOT_UTF8}"],  # written, and printed by --json as another path (r23)
        ["audit", "export", "--out", f"out{NOT_UTF8}"],
    ],
)
def test_arguments_that_are_not_utf8_are_one_line(command: list[str], home: Path) -> None:
    add_account()
    line = one_line(run(*command))
    assert line.startswith("error: Invalid value for '--") and line.endswith("is not valid UTF-8 text")
    assert any(f"'{name}\\udcff'" in line for name in ("", "ann", "out"))


def command_line(home: Path, *args: bytes) -> subprocess.CompletedProcess[bytes]:
    """The real ``metadata-pipeline`` in a process of its own (argv bytes, logging and stderr as a shell sees them)."""
    env = {**os.environ, "DASK_PIPELINE__HOME": str(home)}
    argv = [sys.executable.encode(), b"-m", b"pipeline", *args]
    return subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)


@pytest.mark.parametrize("script", [False, True], ids=["python -m pipeline", "metadata-pipeline"])
@pytest.mark.parametrize(
    "text",
    [
        "a: b: c\n",
        "- a list\n",
        "logging:\n  distributed: loud\n",
        "logging: debug\n",
        "logging:\n",
        "distributed:\n  logging:\n    distributed: loud\n",
        "distributed:\n  admin:\n    log-format: 5\n",
        "1: 2\n",
        "array: 5\n",
        "log-format: 5\n",
    ],
    ids=[
        "not YAML",
        "not a mapping",
        "a logging level distributed does not know (r31)",
        "logging not a mapping",
        "logging empty (r34)",
        "distributed.logging (r34)",
        "a log format not text (r34)",
        "a key not text (r35)",
        "a section of dask's not a mapping (r35)",
        "a log format under the old name distributed moves (r35)",
    ],
)
def test_a_malformed_dask_config_file_is_one_line_from_a_real_shell(
    script: bool, text: str, home: Path, tmp_path: Path
) -> None:
    """dask reads its config files when it is imported, before the command line is: a hand-edited file that
    does not parse was dask's own traceback for every command, ``--help`` included (r23)."""
    config = tmp_path / "dask.yaml"
    config.write_text(text)
    argv = [str(Path(sys.executable).with_name("metadata-pipeline"))] if script else [sys.executable, "-m", "pipeline"]
    env = {**os.environ, "DASK_PIPELINE__HOME": str(home), "DASK_CONFIG": str(config)}
    done = subprocess.run([*argv, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        (f"error: A dask config file at '{config}' is malformed", "error: dask refused its configuration: ")
    ) or line.startswith("error: distributed refused the dask configuration: "), line


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("pipeline:\n  long-term: postgresql+psycopg://pipeline:secret@db/metadata\n", "pipeline.long-term"),
        ("pipeline:\n  archive: s3://bucket/prefix\n", "pipeline.archive"),
        ("pipeline: /srv/pipeline\n", "pipeline"),
    ],
)
def test_a_value_given_for_a_section_is_one_line_not_the_defaults(
    text: str, named: str, home: Path, tmp_path: Path
) -> None:
    """Merging the pipeline's defaults replaced such a value with the section's own without a word: ``init``
    made a SQLite database, or left the archive off, where PostgreSQL or an S3 archive was meant (r39)."""
    config = tmp_path / "dask.yaml"
    config.write_text(text)
    env = {**os.environ, "DASK_CONFIG": str(config), "HOME": str(tmp_path)}  # the default home is under it
    if named != "pipeline":
        env["DASK_PIPELINE__HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "init"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: {named}: a section of settings ({named}."), line
    assert "secret" not in line
    assert not home.exists() and not (tmp_path / ".local").exists()  # nothing made: no SQLite database instead


@pytest.mark.parametrize(
    ("text", "variable", "line"),
    [
        (
            "pipeline:\n  long-term:\n    ulr: postgresql+psycopg://pipeline:secret@db/metadata\n",
            None,
            "error: pipeline.long-term.ulr: no such setting (did you mean pipeline.long-term.url?)",
        ),
        (
            "pipeline:\n  plugin:\n    intervall: 60s\n",
            None,
            "error: pipeline.plugin.intervall: no such setting (did you mean pipeline.plugin.interval?)",
        ),
        (
            "",
            ("DASK_PIPELINE__LONG_TERM_URL", "postgresql+psycopg://pipeline:secret@db/metadata"),
            "error: pipeline.long_term_url: no such setting (did you mean pipeline.long-term?)",
        ),
        (  # hyphens and underscores mixed: dask reads a name as written or with every hyphen an underscore (r46)
            "pipeline:\n  audit:\n    signing_key-url: file:///srv/keys/audit-signing.key\n",
            None,
            "error: pipeline.audit.signing_key-url: no such setting (did you mean pipeline.audit.signing-key-url?)",
        ),
        (  # no space after the colon: the URL is a name, its password masked as in a value (r46)
            "pipeline:\n  long-term: {url:postgresql+psycopg://app:secret@db/metadata}\n",
            None,
            "error: pipeline.long-term.url:postgresql+psycopg://app:***@db/metadata: no such setting",
        ),
        (  # a long one masked before it is cut: the cut left the start of the password (r49)
            "pipeline:\n  {postgresql://u:TopSecretPassword@db.example.com/" + "m" * 80 + ": 1}\n",
            None,
            "error: 'pipeline.postgresql://u:***@db.example…: no such setting",
        ),
    ],
)
def test_a_setting_of_no_such_name_is_one_line_not_its_default(
    text: str, variable: tuple[str, str] | None, line: str, home: Path, tmp_path: Path
) -> None:
    """A mistyped name (``ulr``, one underscore short in a variable) was never read: ``init`` made a SQLite
    database where PostgreSQL was meant, exit 0 (r44)."""
    config = tmp_path / "dask.yaml"
    config.write_text(text)
    env = {**os.environ, "DASK_CONFIG": str(config), "HOME": str(tmp_path), "DASK_PIPELINE__HOME": str(home)}
    env.update([variable] if variable else [])
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "init"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert (done.returncode, done.stderr) == (2, line + "\n")
    assert not home.exists()


def test_every_spelling_dask_reads_is_taken_and_an_empty_host_is_every_interface(home: Path) -> None:
    """Names as dask reads them (underscores for every hyphen) are settings; ``server.host: ""`` listened on every
    interface before null was refused, and stays so (r46)."""
    with dask.config.set({"pipeline": {"long_term": {"url": f"sqlite:///{home}/other.db"}, "server": {"host": ""}}}):
        settings = Settings.from_config()
    assert (settings.long_term_url, settings.server_host) == (f"sqlite:///{home}/other.db", "")


def test_a_value_set_for_a_section_in_process_is_named_too(home: Path) -> None:
    """``dask.config.set`` after ``import pipeline`` (a notebook registering the plugin on its LocalCluster) replaces
    the section, which then read as its defaults: SQLite, no archive, without a word (r40)."""
    with (
        dask.config.set({"pipeline.long-term": "postgresql+psycopg://pipeline:secret@db/metadata"}),
        pytest.raises(
            ConfigError, match=r"^pipeline\.long-term: a section of settings \(pipeline\.long-term\.url, …\)"
        ),
    ):
        Settings.from_config()
    with (
        dask.config.set({"pipeline.archive.ur": "s3://bucket/prefix"}),
        pytest.raises(
            ConfigError, match=r"^pipeline\.archive\.ur: no such setting \(did you mean pipeline\.archive\.url\?\)$"
        ),
    ):
        Settings.from_config()


def test_an_old_name_distributed_moves_is_one_line_from_the_environment_too(home: Path) -> None:
    """distributed renames its settings' old names (``log-format``) before it reads them: a value it refuses
    under one of them was not looked for, and every command that imports distributed was a traceback (r35)."""
    env = {**os.environ, "DASK_PIPELINE__HOME": str(home), "DASK_LOG_FORMAT": "5"}
    argv = [sys.executable, "-m", "pipeline", "init"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: distributed refused the dask configuration: TypeError: "), line


def test_arguments_that_are_not_utf8_are_one_line_from_a_real_shell(home: Path) -> None:
    done = command_line(home, b"records", b"--account", b"\xff")
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "error: Invalid value for '--account': '\\udcff' is not valid UTF-8 text"
    ]


@pytest.mark.parametrize("command", [["report", "--format", "json"], ["audit", "export"]])
def test_an_unwritable_out_folder_is_one_line(command: list[str], home: Path) -> None:
    run("init")
    line = one_line(run(*command, "--out", "/proc/x"))
    assert line.startswith("error: cannot write to /proc/x: ")


def test_a_report_file_that_cannot_be_replaced_leaves_the_last_report_whole_and_is_named(
    home: Path, tmp_path: Path
) -> None:
    """The new report.html and report.json were left beside the last run's CSV files, and the error named the
    folder, with the wrong cause ("Is a directory"), not the file in the way (r23)."""
    run("init")
    out = tmp_path / "report"
    assert run("report", "--out", str(out), "--now", "2026-12-01T00:00:00+00:00").exit_code == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    (out / "inventory.csv").unlink()
    (out / "inventory.csv").mkdir()
    line = one_line(run("report", "--out", str(out), "--now", "2026-12-02T00:00:00+00:00"))
    assert line == f"error: cannot write to {out / 'inventory.csv'}: Is a directory"
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after == {name: data for name, data in before.items() if name != "inventory.csv"}


def test_an_export_file_that_cannot_be_replaced_leaves_the_last_export_whole_and_is_named(
    home: Path, tmp_path: Path
) -> None:
    """Each file was moved into place as it was written: the new entries.jsonl and public_key.pem were left
    beside the last export's manifest, whose count and head they no longer matched (r23)."""
    run("init")
    out = tmp_path / "export"
    assert run("audit", "export", "--out", str(out)).exit_code == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert add_account().exit_code == 0  # the trail grows: the next export's entries differ
    (out / "manifest.json").unlink()
    (out / "manifest.json").mkdir()
    line = one_line(run("audit", "export", "--out", str(out)))
    assert line == f"error: cannot write to {out / 'manifest.json'}: Is a directory"
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after == {name: data for name, data in before.items() if name != "manifest.json"}


# 7. Terminal injection -----------------------------------------------------------------------------------------


def test_a_name_with_control_characters_is_refused_in_one_escaped_line(home: Path) -> None:
    """A name may not hold one (account ``a\\0b`` would be user ``b`` of account ``a``); the refusal quotes none."""
    evil = "acme\x1b[2J\x1b]0;pwned\x07"
    refused = add_account(evil)
    assert "account: a name may not hold a control character (U+001B)" in one_line(refused)
    assert "\x1b" not in refused.output
    assert "user: a name may not hold a control character (U+000D)" in one_line(add_account("acme", "ann\rmallory"))


def test_control_characters_in_other_fields_are_escaped_in_text_and_exact_in_json(
    home: Path, settings: Settings
) -> None:
    evil = "c\n2026-01-01 00:00:00  account/account  root  -  -\x1b[2J\x1b]0;pwned\x07"
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record(cluster_id=evil)])
    pipeline.close()
    text = run("records")
    assert text.exit_code == 0, text.output
    (line,) = text.stdout.splitlines()
    assert "\x1b" not in text.output and "\r" not in text.output
    assert "c\\x0a2026-01-01 00:00:00  account/account  root  -  -\\x1b[2J\\x1b]0;pwned\\x07" in line
    record = json.loads(run("records", "--json").stdout)
    assert record["cluster_id"] == evil


# 8. Corrupt segments -------------------------------------------------------------------------------------------


def test_records_shows_what_is_readable_names_each_corrupt_segment_and_exits_1(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records(
        [
            make_record("account", username="ann", email="a@x"),
            make_record("cluster_snapshot"),
            make_record("job", job_id="j1"),
            make_record("software_env"),
        ]
    )
    segments = {s.kind: s.segment_id for s in pipeline.stores["long_term"].scan(with_payload=False)}
    engine = pipeline.keyring.engine
    with engine.begin() as conn:
        table = db.segments
        conn.execute(update(table).where(table.c.segment_id == segments["job"]).values(key_version=2))
        conn.execute(update(table).where(table.c.segment_id == segments["software_env"]).values(subject_ref="f" * 64))
        payload = conn.execute(table.select().where(table.c.segment_id == segments["cluster_snapshot"])).one().payload
        flipped = payload[:-1] + bytes([payload[-1] ^ 1])
        conn.execute(update(table).where(table.c.segment_id == segments["cluster_snapshot"]).values(payload=flipped))

    result = run("records")
    assert result.exit_code == 1
    assert [line.split()[2] for line in result.stdout.splitlines()] == ["account/account"]
    stderr = result.stderr.splitlines()
    assert stderr[0] == "1 records in long_term"
    named = sorted(line.split()[2] for line in stderr[1:-1])
    assert named == sorted([segments["job"], segments["software_env"], segments["cluster_snapshot"]])
    assert all(line.startswith("unreadable segment ") for line in stderr[1:-1])
    assert stderr[-1] == "check failed: 3 segment(s) could not be read; every other record was shown"


def test_report_marks_corrupt_segments_and_reports_every_other_account(
    home: Path, settings: Settings, tmp_path: Path
) -> None:
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record("cluster_snapshot"), make_record("cluster_snapshot", account="globex")])
    (acme_file,) = [p for p in (home / "logs").rglob("*.seg") if pipeline.keyring.subject_ref("acme") in str(p)]
    data = acme_file.read_bytes()
    acme_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    result = run("report", "--out", str(tmp_path / "r"), "--format", "json,html")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("check failed: 1 segment(s) could not be read")
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [(u["store"], u["segment_id"]) for u in doc["unreadable_segments"]] == [
        ("cloud_logging", acme_file.name.split("~")[0])
    ]
    globex, acme = pipeline.keyring.subject_ref("globex"), pipeline.keyring.subject_ref("acme")
    assert {row["subject_ref"] for row in doc["usage"]["accounts"]} == {globex, acme}  # acme: its long-term copy
    assert "1 segments do not decrypt" in (tmp_path / "r" / "report.html").read_text()


# 9. File modes -------------------------------------------------------------------------------------------------


def test_everything_the_pipeline_writes_is_owner_only(home: Path, settings: Settings, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert add_account().exit_code == 0
        pipeline = Pipeline.open(settings)
        pipeline.write_records([make_record("cluster_snapshot")])
        spool = Spool(settings.spool_dir)
        batch = spool.append(*sealed_batch(pipeline, [make_record("job", job_id="j1")]))
        broken = spool.append(*sealed_batch(pipeline, [make_record("job", job_id="j2")]))
        spool.refuse(broken, "kept for the test")
        assert run("report", "--out", str(tmp_path / "out" / "report"), "--show-names").exit_code == 0
        assert run("audit", "export", "--out", str(tmp_path / "out" / "export")).exit_code == 0
    finally:
        os.umask(old)
    written = [home, *home.rglob("*"), tmp_path / "out", *(tmp_path / "out").rglob("*")]
    names = {p.name for p in written}
    assert {
        "metadata.db-wal",
        "metadata.db-shm",
        "metadata.db.schema-lock",
        f"{batch.batch_id}.batch",
        "refused",
    } <= names
    assert {"report.html", "report.json", "inventory.csv", "entries.jsonl", "manifest.json"} <= names
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in written if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert wrong == {}


def test_a_home_others_can_write_is_refused_with_the_fix(home: Path) -> None:
    run("init")
    os.chmod(home, 0o1777)
    line = one_line(run("records"))
    assert line == f"error: pipeline home {home} is writable by others (mode 1777); run chmod 700 {home}"
    os.chmod(home, 0o700)
    assert run("records").exit_code == 0


# 10. Smaller ---------------------------------------------------------------------------------------------------


def test_a_corrupt_spool_file_gives_one_stderr_line(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    path = settings.spool_dir / f"{spool.append(*sealed_batch(pipeline, [make_record()])).batch_id}.batch"
    path.write_bytes(b"garbage")
    done = command_line(home, b"spool", b"replay", b"--timeout", b"5")
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith(f"error: 1 corrupt spool file(s) set aside in {settings.spool_dir / 'corrupt'}")


def test_a_run_reports_only_the_requests_it_carried_out(home: Path, settings: Settings) -> None:
    from pipeline.retention import requests

    pipeline = Pipeline.open(settings, create=True)
    for account in ("acme", "globex"):
        requests.file_request(pipeline, account)
    listed_before_the_other_run = requests.list_requests(pipeline, states=requests.OPEN_STATES)
    assert [r.state for r in requests.process_pending(pipeline)] == ["completed", "completed"]  # the other run

    stale = Pipeline.open(settings)  # a concurrent run that listed the requests before they were done
    original = requests.list_requests
    try:
        requests.list_requests = lambda *_a, **_k: listed_before_the_other_run  # type: ignore[assignment]
        assert requests.process_pending(stale) == []
    finally:
        requests.list_requests = original


def test_an_erased_account_and_a_never_seen_one_get_the_same_answer(home: Path) -> None:
    add_account("acme")
    assert run("erase", "request", "--account", "acme").exit_code == 0
    assert run("enforce").exit_code == 0
    erased, unknown = run("records", "--account", "acme"), run("records", "--account", "acme2")
    assert (erased.exit_code, erased.stderr.replace("acme", "X")) == (
        unknown.exit_code,
        unknown.stderr.replace("acme2", "X"),
    )
    assert one_line(unknown) == "error: unknown account 'acme2': no records are stored for it"


def test_audit_actor_is_the_os_user_not_the_user_variable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.audit import default_actor

    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    default_actor.cache_clear()
    try:
        run("init")
        entries = list(Pipeline.open(Settings.from_config()).audit.entries())
    finally:
        default_actor.cache_clear()
    assert {e.actor for e in entries} == {f"{pwd.getpwuid(os.geteuid()).pw_name}@{socket.gethostname()}"}


def test_a_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """The system refuses the folder (NotADirectoryError): that was a traceback and exit 1."""
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    with dask.config.set({"pipeline.home": str(taken)}):
        line = one_line(run("init"))
    assert str(taken) in line and "not a directory" in line


def test_a_database_url_with_a_port_that_is_no_number_is_one_line(home: Path) -> None:
    with dask.config.set({"pipeline.long-term.url": "postgresql+psycopg://root@127.0.0.1:notaport/x"}):
        line = one_line(run("records"))
    assert "not a database URL" in line


def test_serve_with_a_tls_file_that_is_no_certificate_is_one_line(tmp_path: Path, home: Path) -> None:
    garbage = tmp_path / "bad.pem"
    garbage.write_text("garbage\n")
    run("init")
    with dask.config.set({"pipeline.server.tls-cert": str(garbage), "pipeline.server.tls-key": str(garbage)}):
        line = one_line(run("serve", "--no-retention"))
    assert line.startswith("error: pipeline.server.tls-cert/tls-key: ") and "not a PEM certificate" in line


@pytest.mark.parametrize(
    "command",
    [
        ["erase", "request", "--account", ""],
        ["erase", "request", "--account", "acme", "--user", " "],
        ["accounts", "add", "--account", "", "--username", "ann", "--email", "ann@example.com"],
        ["accounts", "add", "--account", "acme", "--username", "", "--email", "ann@example.com"],
        ["tokens", "create", "--account", ""],
    ],
)
def test_a_blank_name_is_refused_as_the_api_refuses_it(command: list[str], home: Path) -> None:
    """`erase request --account ""` filed an erasure of nobody, and `accounts add` stored a blank account."""
    line = one_line(run(*command))
    assert "must not be empty" in line


def test_a_group_alone_shows_its_help_not_one_escaped_line() -> None:
    result = run("erase")
    assert result.exit_code == 2
    assert "\\x0a" not in result.stderr and "Usage:" in result.stderr and len(result.stderr.splitlines()) > 3


def test_a_quota_that_is_not_a_finite_number_is_refused(home: Path) -> None:
    """NaN and Infinity were stored, and `records --json` printed them: not JSON."""
    for value in ("nan", "inf", "-1"):
        line = one_line(
            run("accounts", "add", "--account", "a", "--username", "u", "--email", "e", "--quota", f"cpu={value}")
        )
        assert "a quota is a finite number" in line


def test_a_quota_above_2_53_is_refused_not_stored_as_another_number(home: Path) -> None:
    """``cpu=9007199254740993`` was stored as 9007199254740992.0, and 10**20 as 1e+20 (r23)."""
    for value in ("9007199254740993", "99999999999999999999", "1e17"):
        line = one_line(
            run("accounts", "add", "--account", "a", "--username", "u", "--email", "e", "--quota", f"cpu={value}")
        )
        assert "a quota is at most 2**53" in line and not (home / "metadata.db").exists()
    quota = "--quota", "cpu=9007199254740992"
    assert run("accounts", "add", "--account", "a", "--username", "u", "--email", "e", *quota).exit_code == 0


@pytest.mark.parametrize(
    ("quotas", "reason"),
    [(["=5"], "names no quota"), (["cpu=1", "cpu=2"], "names quota 'cpu' a second time")],
)
def test_a_quota_without_a_name_or_named_twice_is_refused(home: Path, quotas: list[str], reason: str) -> None:
    """``=5`` stored a quota named "", and a repeated name kept the last value unsaid."""
    args = [arg for quota in quotas for arg in ("--quota", quota)]
    line = one_line(run("accounts", "add", "--account", "a", "--username", "u", "--email", "e", *args))
    assert reason in line and not (home / "metadata.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["accounts", "add", "--account", "a" * 201, "--username", "u", "--email", "e"],
        ["tokens", "create", "--account", "a" * 201, "--user", "u"],
        ["tokens", "create", "--account", "a", "--user", "u" * 201],
        ["clusters", "create", "--account", "a" * 201, "--out", "c"],
    ],
    ids=["account", "token-account", "token-user", "cluster-account"],
)
def test_a_name_longer_than_the_api_takes_is_refused_where_it_would_be_made(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """A member token was issued for an account the API refuses: it could never register a cluster."""
    monkeypatch.chdir(tmp_path)  # `--out c`, written here if it were taken
    line = one_line(run(*args))
    assert "201 characters; the API takes at most 200" in line


@pytest.mark.parametrize(("option", "value"), [("--name", "evil\x1b[2J\rname"), ("--image", "img\nnext")])
def test_a_cluster_name_or_image_with_a_control_character_is_refused_on_the_control_plane_host_too(
    home: Path, tmp_path: Path, option: str, value: str
) -> None:
    """Only POST /v1/clusters refused it; registered locally, the image's newline went into scheduler.yaml."""
    run("init")
    line = one_line(run("clusters", "create", "--account", "acme", option, value, "--out", str(tmp_path / "c")))
    assert f"{option[2:]}: may not hold a control character" in line
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("url", ["s3://bucket/x", "gcp-logging://project", "file:///tmp/x", "memory://"])
def test_a_long_term_url_that_is_no_sql_database_says_so(url: str, home: Path) -> None:
    """An s3:// URL said the backend "needs the keyring", and gcp-logging:// went looking for Google credentials."""
    with dask.config.set({"pipeline.long-term.url": url}):
        line = one_line(run("records"))
    assert line.startswith("error: pipeline.long-term.url must be a SQL database"), line


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("server.header-timeout", "0s", "must be a finite duration of more than 0"),  # every request: no reply
        ("tls.validity", "0s", "must be a finite duration of more than 0"),  # certificates expired when issued
        ("server.cluster-lost-after", "0", "must be a finite duration of more than 0"),
        ("server.body-timeout", "1e400s", "is not a duration"),  # OverflowError: a traceback
        ("plugin.interval", [1], "is not a duration"),  # YAML's list: AttributeError, a traceback
        ("tls.validity", "9999999d", "must be a finite duration of at most 100 years"),  # a 500 per cluster
    ],
)
def test_a_duration_a_setting_cannot_use_is_one_line_naming_it(key: str, value: str, reason: str, home: Path) -> None:
    with dask.config.set({f"pipeline.{key}": value}):
        line = one_line(run("init"))
    assert line == f"error: pipeline.{key}: {value!r} {reason}"


@pytest.mark.parametrize(
    "key",
    ["account", "user", "image", "policy", "audit.verify-key", "ingest.url", "ingest.token", "aws.role-arn"]
    + ["home", "service.retention-cron"],  # a mapping made a folder named "{'a': 1}" (r49)
)
def test_a_name_the_environment_gives_as_a_number_is_one_line_naming_it(key: str, home: Path) -> None:
    """Dask reads ``DASK_PIPELINE__ACCOUNT=1234`` as a Python literal: the plugin said it was active and dropped
    every record (``expected text, got int``); a numeric policy path, verify key or ingest URL was a traceback
    (r44), a numeric role ARN taken without a word."""
    with dask.config.set({f"pipeline.{key}": 1234}):
        line = one_line(run("init"))
    assert line.startswith(f"error: pipeline.{key}: 1234 is not text") and "quote it" in line


@pytest.mark.parametrize("key", ["account", "user"])
def test_a_name_with_a_control_character_is_one_line_naming_it(key: str, home: Path) -> None:
    """Ingest refuses such a name (one would join two subjects): a plugin configured with one started, and its
    every batch waited in the spool for ever, with every later scheduler's of its home behind them."""
    with dask.config.set({f"pipeline.{key}": "bad\tname"}):
        line = one_line(run("init"))
    assert line == f"error: pipeline.{key}: 'bad\\tname' holds a control character (U+0009); a name may not"


@pytest.mark.parametrize("key", ["account", "user", "cluster-id", "image"])
def test_a_name_longer_than_ingest_takes_is_one_line_naming_it(key: str, home: Path) -> None:
    """Ingest refuses a string over 2,048 bytes: a plugin configured with such a name started, and every batch
    it sealed was set aside as refused (its records lost)."""
    with dask.config.set({f"pipeline.{key}": "é" * 1025}):
        line = one_line(run("init"))
    assert line == f"error: pipeline.{key}: 2050 bytes of UTF-8; at most 2048"


@pytest.mark.parametrize("key", ["account", "cluster-id"])
def test_a_name_of_bytes_that_are_no_utf8_is_one_line_naming_it(key: str, home: Path) -> None:
    """An environment variable holding such bytes (``DASK_PIPELINE__ACCOUNT=$'c\\xff'``) reaches Python as a
    lone surrogate: measuring the name's UTF-8 made every command a traceback."""
    with dask.config.set({f"pipeline.{key}": "c\udcff"}):
        line = one_line(run("init"))
    assert line == f"error: pipeline.{key}: 'c\\udcff' is not UTF-8 text"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://ann:secret@127.0.0.1:8800", "'http://ann:***@127.0.0.1:8800' names a user or password"),
        ("ftp://127.0.0.1", "'ftp://127.0.0.1' is not an http(s):// URL"),
    ],
)
def test_an_api_url_that_is_not_the_control_planes_address_is_one_line(home: Path, url: str, reason: str) -> None:
    """With a user and password, httpx sent them as Basic auth in place of the saved token: every command
    said "401 missing bearer token"; clusters registered on the host were told the URL."""
    with dask.config.set({"pipeline.api.url": url}):
        line = one_line(run("init"))
    assert line.startswith(f"error: pipeline.api.url: {reason}") and "secret" not in line


def test_an_unknown_key_url_scheme_names_the_setting(home: Path) -> None:
    with dask.config.set({"pipeline.keys.url": "http://x"}):
        assert one_line(run("init")).startswith("error: pipeline.keys.url: unknown key URL scheme 'http'")


def test_a_cloud_logging_url_without_google_credentials_for_its_configuration_api_is_one_line(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``endpoint=`` names a local logging API, but the bucket's configuration API still looked for Google
    credentials: a 48-line traceback."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "none.json"))
    with dask.config.set({"pipeline.cloud-logging.url": "gcp-logging://proj?endpoint=http://127.0.0.1:9"}):
        line = one_line(run("init"))
    assert line.startswith("error: Cloud Logging proj: no Google credentials for its configuration API")


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(home: Path) -> None:
    """`records --json | head -1` said "error: [Errno 32] Broken pipe" and exited 2, as for bad input."""
    assert command_line(home, b"init").returncode == 0
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first line is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "init", "--json"],
            env={**os.environ, "DASK_PIPELINE__HOME": str(home)},
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, b"")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["records", "--help"], ["erase", "request", "--help"]])
def test_help_into_a_pipe_its_reader_closed_ends_as_a_command_does(args: list[str]) -> None:
    """Help and the version print while the command line is parsed: click ended them with exit 1 (r42)."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *args], stdout=writer, stderr=subprocess.PIPE, timeout=120, check=False
        )
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, b"")
