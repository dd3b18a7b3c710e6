"""The control plane's commands: tokens, login, and records/erase/clusters through the API with a login."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner, Result
from conftest import make_record
from controlplane import ControlPlane, serving

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.runtime import Pipeline


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME of the person running the command line (where login keeps credentials)."""
    monkeypatch.setenv("HOME", str(tmp_path / "person"))
    return tmp_path / "person"


@pytest.fixture
def plane(home: Path, user_home: Path) -> Iterator[ControlPlane]:
    pipeline = Pipeline.open(Settings.from_config(), create=True)
    pipeline.write_records([make_record(account="acme", user="ann"), make_record(account="globex", user="bob")])
    with serving(pipeline) as plane:
        yield plane
    pipeline.close()


def test_tokens_create_prints_the_contract_fields_once_and_list_never_shows_it(home: Path) -> None:
    created = run("tokens", "create", "--account", "acme", "--user", "ann", "--json")
    assert created.exit_code == 0, created.output
    issued = json.loads(created.output)
    assert list(issued) == ["token_id", "token", "kind", "account", "user"]
    assert re.fullmatch(r"mp_[A-Za-z0-9_-]{43}", issued["token"])
    assert (issued["kind"], issued["account"], issued["user"]) == ("member", "acme", "ann")
    admin = json.loads(run("tokens", "create", "--role", "admin", "--json").output)
    assert (admin["kind"], admin["account"]) == ("admin", None)
    listed = run("tokens", "list", "--json")
    assert listed.exit_code == 0
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [r["token_id"] for r in rows] == [issued["token_id"], admin["token_id"]]
    assert issued["token"] not in listed.output and "token" not in rows[0]
    revoked = run("tokens", "revoke", issued["token_id"], "--json")
    assert json.loads(revoked.output)["revoked_at"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tokens", "create", "--account", "acme"], "a member token needs --account and --user"),
        (["tokens", "create", "--role", "admin", "--account", "acme"], "give no --account"),
        (["tokens", "create", "--role", "owner", "--account", "acme", "--user", "x"], "'owner' is not one of"),
        (["tokens", "revoke", "nope"], "no API token with id 'nope'"),
    ],
)
def test_bad_token_commands_exit_2_with_one_line(home: Path, args: list[str], message: str) -> None:
    assert run("init").exit_code == 0
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_login_keeps_a_0600_credentials_file_and_records_are_scoped_to_the_token(
    plane: ControlPlane, user_home: Path
) -> None:
    token = plane.tokens.create("member", "acme", "ann").token
    result = run("login", "--url", plane.url, "--token", token, "--json")
    assert result.exit_code == 0, result.output
    credentials = user_home / ".config/metadata-pipeline/credentials.yaml"
    assert oct(credentials.stat().st_mode & 0o777) == "0o600"
    assert json.loads(result.output)["account"] == "acme"
    mine = run("records", "--json")
    assert mine.exit_code == 0, mine.output
    assert {json.loads(line)["account"] for line in mine.output.splitlines()} == {"acme"}
    other = run("records", "--account", "globex", "--json")
    assert other.exit_code == 2
    assert "404" in other.output and "globex" not in other.output.replace("--account globex", "")


def test_login_with_a_bad_token_writes_nothing(plane: ControlPlane, user_home: Path) -> None:
    result = run("login", "--url", plane.url, "--token", "mp_" + "x" * 43)
    assert result.exit_code == 2
    assert "401" in result.output and "unknown token" in result.output
    assert not (user_home / ".config/metadata-pipeline/credentials.yaml").exists()
    assert run("login", "--url", "ftp://x", "--token", "t").exit_code == 2


def test_erase_through_the_api_is_limited_to_the_members_own_user(plane: ControlPlane) -> None:
    assert (
        run("login", "--url", plane.url, "--token", plane.tokens.create("member", "acme", "ann").token).exit_code == 0
    )
    refused = run("erase", "request", "--account", "acme", "--user", "someone-else")
    assert refused.exit_code == 2 and "403" in refused.output
    filed = run("erase", "request", "--account", "acme", "--user", "ann", "--json")
    assert filed.exit_code == 0, filed.output
    request_id = json.loads(filed.output)["request_id"]
    status = run("erase", "status", request_id)
    assert status.exit_code == 0 and request_id in status.output and "pending" in status.output
    assert [json.loads(line)["request_id"] for line in run("erase", "list", "--json").output.splitlines()] == [
        request_id
    ]


def test_the_revoked_login_stops_working(plane: ControlPlane) -> None:
    issued = plane.tokens.create("member", "acme", "ann")
    assert run("login", "--url", plane.url, "--token", issued.token).exit_code == 0
    assert run("records").exit_code == 0
    assert run("tokens", "revoke", issued.token_id).exit_code == 0
    result = run("records")
    assert result.exit_code == 2 and "token revoked" in result.output


def test_serve_refuses_a_bad_port_and_a_taken_address_with_one_line(plane: ControlPlane) -> None:
    with dask.config.set({"pipeline.server.port": "eighty"}):
        bad = run("serve")
    assert bad.exit_code == 2
    assert bad.output.strip() == "error: pipeline.server.port: 'eighty' is not a TCP port number"
    port = plane.url.rsplit(":", 1)[1]
    with dask.config.set({"pipeline.server.host": "127.0.0.1", "pipeline.server.port": port}):
        taken = run("serve", "--no-retention")
    assert taken.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in taken.output.splitlines()[-1]


def test_a_credentials_file_others_can_read_is_refused(plane: ControlPlane, user_home: Path) -> None:
    assert (
        run("login", "--url", plane.url, "--token", plane.tokens.create("member", "acme", "ann").token).exit_code == 0
    )
    credentials = user_home / ".config/metadata-pipeline/credentials.yaml"
    credentials.chmod(0o644)
    result = run("records")
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"error: {credentials} is readable by others; run chmod 600 {credentials} (or log in again)"
    )


@pytest.mark.slow
def test_demo_remote_runs_the_workload_through_a_loopback_control_plane(home: Path) -> None:
    result = run("demo", "--remote", "--tasks", "100", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["jobs"] == 3 and summary["erred"] == 1
    assert summary["tls"] and summary["scheduler_address"].startswith("tls://")  # the registration's credentials
    assert summary["stored"]["long_term"]["cluster_jobs"] >= 3
    assert not (home / "demo-cluster" / "master.key").exists()


def test_clusters_create_prints_the_dask_config_a_cluster_needs(plane: ControlPlane) -> None:
    import yaml

    local = run("clusters", "create", "--account", "acme", "--name", "etl")  # operator, on the control plane
    assert local.exit_code == 0, local.output
    config = yaml.safe_load(local.output)["pipeline"]
    assert set(config) == {"account", "user", "cluster-id", "image", "ingest"}
    assert set(config["ingest"]) == {"url", "token", "public-key"}
    assert config["account"] == "acme" and config["ingest"]["token"].startswith("mp_")
    assert config["user"] is None  # an account-level service cluster
    owned = run("clusters", "create", "--account", "acme", "--user", "ann")  # the operator names the owner
    assert yaml.safe_load(owned.output)["pipeline"]["user"] == "ann"
    assert (
        run("login", "--url", plane.url, "--token", plane.tokens.create("member", "globex", "bob").token).exit_code == 0
    )
    remote = yaml.safe_load(run("clusters", "create", "--account", "globex").output)["pipeline"]
    assert remote["ingest"]["url"] == plane.url and remote["user"] == "bob"  # a member's cluster is theirs
    for refused in (
        run("clusters", "create", "--account", "acme"),
        run("clusters", "create", "--account", "globex", "--user", "carol"),
    ):
        assert refused.exit_code == 2 and "403" in refused.output
    listed = [json.loads(line) for line in run("clusters", "list", "--json").output.splitlines()]
    assert [c["cluster_id"] for c in listed] == [remote["cluster-id"]]  # bob sees globex's cluster only
