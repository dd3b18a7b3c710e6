"""The retention policy file: the shipped rules, routing, and every way to get it wrong."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dask.config
import pytest
import yaml
from click.testing import CliRunner
from conftest import make_record

from pipeline.cli import main
from pipeline.config import default_policy_path
from pipeline.errors import PolicyError
from pipeline.retention.policy import load_policy
from pipeline.runtime import Pipeline

SHIPPED = yaml.safe_load(default_policy_path().read_text())


def test_shipped_policy_keeps_long_term_until_deleted_and_logs_30_days() -> None:
    policy = load_policy(default_policy_path())
    assert policy.stores_for("account") == ("long_term",)
    assert policy.stores_for("cluster_jobs") == ("long_term", "cloud_logging")
    assert sorted(policy.limits()) == [
        ("cloud_logging", "cluster_jobs", timedelta(days=30)),
        ("cloud_logging", "software_env", timedelta(days=30)),
    ]
    assert policy.erasure_deadline == timedelta(days=30)
    assert policy.erasure_stores == ("long_term", "cloud_logging")
    assert Path("policies/retention.yaml").read_text() == default_policy_path().read_text()


def test_account_data_never_reaches_the_logging_store(settings) -> None:
    pipeline = Pipeline.open(settings, create=True)
    written = pipeline.write_records(
        [make_record("account", username="ann", email="ann@example.com"), make_record("software_env")]
    )
    assert written == {"long_term": 2, "cloud_logging": 1}
    assert [r["kind"] for r in pipeline.read_records("cloud_logging")] == ["software_env"]


def _with(change) -> dict:  # noqa: ANN001
    doc = yaml.safe_load(yaml.safe_dump(SHIPPED))
    change(doc)
    return doc


INVALID = {
    "unknown store": (
        _with(lambda d: d["stores"].update(archive={"cluster_jobs": "30d"})),
        "stores.archive",
        "unknown store",
    ),
    "unknown data type": (
        _with(lambda d: d["stores"]["cloud_logging"].update(gpu_usage="30d")),
        "stores.cloud_logging.gpu_usage",
        "unknown data type",
    ),
    "bad duration": (
        _with(lambda d: d["stores"]["cloud_logging"].update(cluster_jobs="thirty days")),
        "stores.cloud_logging.cluster_jobs",
        "'thirty days' is not a duration like 30d or 12h",
    ),
    "bad erasure deadline": (
        _with(lambda d: d["erasure"].update(deadline="1 month")),
        "erasure.deadline",
        "'1 month' is not a duration like 30d or 12h",
    ),
    "missing version": (_with(lambda d: d.pop("version")), "version", "missing"),
    "account routed to cloud logging": (
        _with(lambda d: d["stores"]["cloud_logging"].update(account="30d")),
        "stores.cloud_logging.account",
        "cloud_logging must never hold account data",
    ),
    "unknown erasure store": (
        _with(lambda d: d["erasure"].update(stores=["long_term", "tape"])),
        "erasure.stores[1]",
        "unknown store 'tape'",
    ),
}


@pytest.fixture(params=sorted(INVALID))
def bad_policy(request, tmp_path):  # noqa: ANN001, ANN201
    doc, field, reason = INVALID[request.param]
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, field, reason


def test_invalid_policy_is_refused_naming_file_field_and_reason(bad_policy) -> None:
    path, field, reason = bad_policy
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {field}: ")
    assert reason in message
    assert "\n" not in message


def test_cli_refuses_an_invalid_policy_with_exit_status_2(bad_policy, home) -> None:
    path, field, reason = bad_policy
    runner = CliRunner()
    with dask.config.set({"pipeline.policy": str(path)}):
        for args in (["enforce"], ["enforce", "--json"], ["erase", "list"]):
            result = runner.invoke(main, args)
            assert result.exit_code == 2, result.output
            assert result.stderr.startswith(f"error: {path}: {field}: ")
            assert reason in result.stderr
            assert result.stderr.count("\n") == 1
            assert result.stdout == ""


def test_policy_path_comes_from_the_environment_variable(tmp_path, home) -> None:
    path = tmp_path / "env-policy.yaml"
    path.write_text(yaml.safe_dump(_with(lambda d: d.pop("version"))))
    from_env = dask.config.collect_env({"DASK_PIPELINE__POLICY": str(path)})  # as dask reads os.environ
    with dask.config.set({"pipeline.policy": from_env["pipeline"]["policy"]}):
        result = CliRunner().invoke(main, ["enforce"])
    assert result.exit_code == 2
    assert f"{path}: version: missing" in result.stderr
