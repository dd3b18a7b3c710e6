"""The command line of the spine: init, accounts add, records, spool replay, keys rotate, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner, Result
from conftest import make_record, one_line, sealed_batch

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.records import KINDS
from pipeline.runtime import Pipeline
from pipeline.spool import Spool

COMMON = ["record_id", "data_type", "kind", "account", "user", "cluster_id", "observed_at"]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def add_acme() -> Result:
    return run(
        "accounts",
        "add",
        "--account",
        "acme",
        "--username",
        "ann",
        "--email",
        "ann@acme.test",
        "--team",
        "data",
        "--quota",
        "workers=20",
    )


def test_init_is_idempotent_and_key_file_is_private(home: Path) -> None:
    first, second = run("init", "--json"), run("init", "--json")
    assert first.exit_code == second.exit_code == 0, first.output
    assert json.loads(second.output)["home"] == str(home)
    assert oct((home / "master.key").stat().st_mode & 0o777) == "0o600"
    assert oct(home.stat().st_mode & 0o777) == "0o700"


def test_accounts_add_then_records_json_has_exactly_the_contract_fields(home: Path) -> None:
    assert add_acme().exit_code == 0
    result = run("records", "--account", "acme", "--json")
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    record = json.loads(line)
    assert list(record) == COMMON + [f.name for f in KINDS["account"].schema if f.name not in COMMON]
    assert (record["username"], record["email"], record["team"], record["quotas"]) == (
        "ann",
        "ann@acme.test",
        "data",
        {"workers": 20.0},
    )
    assert record["observed_at"].endswith("+00:00")
    assert run("records", "--account", "acme", "--store", "cloud_logging", "--json").output == ""


def test_accounts_add_run_again_stores_no_copy_and_a_change_is_a_new_record(home: Path) -> None:
    """Run again after a store was unreachable (exit 2, the others written), it completes, not duplicates."""
    assert add_acme().exit_code == 0 and add_acme().exit_code == 0
    assert len(run("records", "--account", "acme", "--json").output.splitlines()) == 1
    assert run("accounts", "add", "--account", "acme", "--username", "ann", "--email", "ann@acme.test").exit_code == 0
    assert len(run("records", "--account", "acme", "--json").output.splitlines()) == 2  # no team now: a change


def test_records_filters_by_data_type_and_store(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    pipeline.write_records([make_record("cluster_snapshot"), make_record("job", job_id="j1", task_prefixes=["inc"])])
    add_acme()
    lines = run("records", "--account", "acme", "--data-type", "cluster_jobs", "--store", "cloud_logging", "--json")
    kinds = sorted(json.loads(line)["kind"] for line in lines.output.splitlines())
    assert kinds == ["cluster_snapshot", "job"]


def test_unknown_account_is_bad_input(home: Path) -> None:
    add_acme()
    result = run("records", "--account", "nobody")
    assert result.exit_code == 2
    assert result.output.strip() == "error: unknown account 'nobody': no records are stored for it"


def test_unknown_store_url_scheme_is_bad_input(home: Path) -> None:
    with dask.config.set({"pipeline.cloud-logging.url": "ftp://example/logs"}):
        result = run("init")
    assert result.exit_code == 2
    assert "pipeline.cloud-logging.url: unknown store URL scheme 'ftp'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_key_file_readable_by_others_is_refused(home: Path) -> None:
    run("init")
    os.chmod(home / "master.key", 0o644)
    result = run("records")
    assert result.exit_code == 2
    assert f"master key file {home / 'master.key'} is readable by others (mode 0644)" in result.output


@pytest.mark.parametrize("shape", ['{"current": 1, "keys": [1, 2]}', '{"current": 1e400, "keys": {}}'])
def test_a_master_key_file_of_another_json_shape_is_one_line(home: Path, shape: str) -> None:
    run("init")
    (home / "master.key").write_text(shape)
    assert one_line(run("records")).startswith(f"error: master key file {home / 'master.key'} is malformed: ")


@pytest.mark.parametrize(
    "command", [["erase", "status"], ["erase", "retry"], ["erase", "lift"], ["tokens", "revoke"]], ids=" ".join
)
def test_an_id_that_is_not_utf8_is_one_line(home: Path, command: list[str]) -> None:
    run("init")
    assert "is not valid UTF-8 text" in one_line(run(*command, "\udcff"))  # how Python reads byte 0xff of argv


def test_login_files_that_are_not_utf8_are_one_line(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.apiclient import Receipt
    from pipeline.errors import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path))
    run("init")
    saved = tmp_path / ".config" / "metadata-pipeline"
    (saved / "receipts").mkdir(parents=True, mode=0o700)
    (saved / "receipts" / "r-1.yaml").write_bytes(b"\xff\xfe")
    (saved / "credentials.yaml").write_bytes(b"\xff\xfe")
    (saved / "credentials.yaml").chmod(0o600)
    assert "is not a credentials file written by login" in one_line(run("records"))
    with pytest.raises(ConfigError, match="r-1.yaml is not a receipt written by erase request"):
        Receipt.load("r-1")


def test_wrong_key_for_an_existing_store_writes_nothing(home: Path, tmp_path: Path, settings: Settings) -> None:
    add_acme()
    with dask.config.set({"pipeline.home": str(tmp_path / "other")}):
        run("init")
    shutil.copy(tmp_path / "other" / "master.key", home / "master.key")
    before = sorted(p.name for p in home.rglob("*"))
    db_bytes = (home / "metadata.db").read_bytes()
    result = run("accounts", "add", "--account", "globex", "--username", "bo", "--email", "bo@globex.test")
    assert result.exit_code == 2
    assert "does not open this keyring (wrong key)" in result.output
    assert sorted(p.name for p in home.rglob("*")) == before
    assert (home / "metadata.db").read_bytes() == db_bytes


@pytest.mark.parametrize("command", [["records"], ["init"]])
def test_a_lost_master_key_file_is_named_lost_and_never_made_again(home: Path, command: list[str]) -> None:
    """init made a new, unrelated key before: it opened nothing, and every error after named it, not the loss."""
    add_acme()
    (home / "master.key").unlink()
    result = run(*command)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: master key file {home / 'master.key'} does not exist, but the metadata database holds a keyring "
        "made with it: restore the file from a backup (a new key would open nothing)"
    ]
    assert not (home / "master.key").exists()


def test_spool_replay_sets_corrupt_files_aside_and_delivers_the_rest(home: Path, settings: Settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    spool = Spool(settings.spool_dir)
    spool.append(*sealed_batch(pipeline, [make_record("cluster_snapshot") for _ in range(3)]))
    broken = spool.append(*sealed_batch(pipeline, [make_record("cluster_snapshot")]))
    path = settings.spool_dir / f"{broken.batch_id}.batch"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    (settings.spool_dir / "zz.batch").mkdir()  # unreadable as a file: it stopped the replay (and an emitter) dead

    result = run("spool", "replay", "--timeout", "20", "--json")
    assert result.exit_code == 2
    assert f"2 corrupt spool file(s) set aside in {settings.spool_dir / 'corrupt'}: {path.name}" in result.stderr
    summary = json.loads(result.stdout)  # the summary all the same: it was printed only when nothing went aside
    assert summary["corrupt_files"] == [
        str(settings.spool_dir / "corrupt" / n) for n in sorted([path.name, "zz.batch"])
    ]
    assert (summary["batches_delivered"], summary["batches_left"]) == (1, 0)
    assert (settings.spool_dir / "corrupt" / path.name).exists() and (settings.spool_dir / "corrupt/zz.batch").is_dir()
    assert spool.pending_files() == []
    assert len(list(pipeline.read_records("long_term"))) == 3
    assert len(list(pipeline.read_records("cloud_logging"))) == 3


def test_spool_replay_without_a_database_fails_fast_with_one_line(home: Path, settings: Settings) -> None:
    result = run("spool", "replay", "--timeout", "20")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "run metadata-pipeline init" in result.output


def test_keys_rotate_keeps_data_readable(home: Path) -> None:
    add_acme()
    result = run("keys", "rotate", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["master_key_version"] == 2
    assert json.loads(run("records", "--account", "acme", "--json").output)["username"] == "ann"


@pytest.mark.parametrize(
    "command", [[], ["init"], ["records"], ["accounts", "add"], ["spool", "replay"], ["keys", "rotate"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_accounts_add_of_a_suppressed_user_stores_nothing_and_says_so(home: Path, settings: Settings) -> None:
    """``--suppress`` drops the subject's later records: ``accounts add`` wrote carl's e-mail back, exit 0."""
    assert run("init").exit_code == 0
    assert run("erase", "request", "--account", "globex", "--user", "carl", "--suppress").exit_code == 0
    assert run("enforce").exit_code == 0
    added = run("accounts", "add", "--account", "globex", "--username", "carl", "--email", "carl@globex.test")
    assert "an erasure of them is open, or suppresses them until lifted" in one_line(added)
    pipeline = Pipeline.open(settings)
    assert [r for store in pipeline.stores for r in pipeline.read_records(store)] == []
    assert [e.details["records"] for e in pipeline.audit.entries() if e.action == "ingest.dropped"] == [1]
    pipeline.close()


def test_accounts_add_while_an_erasure_of_the_user_is_open_stores_nothing_and_says_so(home: Path) -> None:
    """Filed, not yet carried out: what is stored now would be erased with the rest, or outlive it."""
    assert run("init").exit_code == 0
    assert run("erase", "request", "--account", "globex", "--user", "carl").exit_code == 0
    added = run("accounts", "add", "--account", "globex", "--username", "carl", "--email", "carl@globex.test")
    assert "an erasure of them is open" in one_line(added)


def test_accounts_add_under_a_policy_that_keeps_account_records_nowhere_is_an_error(home: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nstores:\n  long_term:\n    cluster_jobs: until_deleted\n")
    with dask.config.set({"pipeline.policy": str(policy)}):
        added = run("accounts", "add", "--account", "zed", "--username", "z", "--email", "z@zed.test")
    assert "stores: no store keeps account records" in one_line(added)
