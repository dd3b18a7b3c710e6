"""The control plane's commands: tokens, login, and records/erase/clusters through the API with a login."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dask.config
import httpx
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import make_record, one_line
from controlplane import ControlPlane, assert_problem, serving

from pipeline.cli import main
from pipeline.config import Settings, http_url_problem
from pipeline.delivery import HTTPDelivery
from pipeline.errors import ConfigError
from pipeline.intake import load_public_key, seal_batch
from pipeline.runtime import Pipeline
from pipeline.spool import SpooledBatch


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


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


def test_login_says_who_with_one_space_between_words(plane: ControlPlane, user_home: Path) -> None:
    token = plane.tokens.create("admin", None, "privacy-team").token
    result = run("login", "--url", plane.url, "--token", token)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"logged in to {plane.url} as admin privacy-team"


def test_login_with_a_bad_token_writes_nothing(plane: ControlPlane, user_home: Path) -> None:
    result = run("login", "--url", plane.url, "--token", "mp_" + "x" * 43)
    assert result.exit_code == 2
    assert "401" in result.output and "unknown token" in result.output
    assert not (user_home / ".config/metadata-pipeline/credentials.yaml").exists()
    assert run("login", "--url", "ftp://x", "--token", "t").exit_code == 2


def test_login_to_a_url_naming_a_user_and_password_is_one_line_not_a_wrong_401(
    plane: ControlPlane, user_home: Path
) -> None:
    """httpx sent them as Basic auth in place of the bearer token: "401 missing bearer token", a valid token given."""
    token = plane.tokens.create("admin", user="ops").token
    url = plane.url.replace("http://", "http://u:secret@")
    result = run("login", "--url", url, "--token", token)
    assert result.exit_code == 2
    assert "names a user or password: the API token is the credential" in result.stderr
    assert "secret" not in result.output and result.stderr.count("\n") == 1
    assert not (user_home / ".config/metadata-pipeline/credentials.yaml").exists()


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


@pytest.mark.slow
def test_code_on_the_remote_demos_scheduler_finds_no_key(home: Path) -> None:
    """Issue 18 case 9: `demo --remote` ran its control plane inside the scheduler's process.

    A process of its own, as people run it (this test process holds keyrings of other tests)."""
    env = {**os.environ, "DASK_PIPELINE__HOME": str(home)}
    command = [sys.executable, "-m", "pipeline", "demo", "--remote", "--tasks", "50"]
    shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "code on the scheduler found no key (remote mode: the cluster only writes)" in shown.stdout


@pytest.mark.slow
def test_demo_embedded_says_it_is_single_tenant(home: Path) -> None:
    result = run("demo", "--tasks", "100", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)["keys_in_reach_of_the_scheduler"]
    assert any("Keyring" in item for item in found) and any(item.endswith("master.key") for item in found)


@pytest.mark.parametrize("out_dir", ["/proc/pipeline-out", "/dev/null", "/dev/null/etl"])
def test_clusters_create_to_a_folder_it_cannot_write_registers_nothing(plane: ControlPlane, out_dir: str) -> None:
    """The folder was found unwritable after the registration: each try left a cluster registered, then
    closed, and its audit entries (r23)."""
    refused = run("clusters", "create", "--account", "acme", "--out", out_dir)
    assert refused.exit_code == 2 and refused.stderr.startswith(f"error: cannot write to {out_dir}: ")
    assert len(refused.stderr.splitlines()) == 1
    assert list(plane.pipeline.audit.entries(actions=["cluster.registered", "cluster.closed"])) == []
    with plane.admin() as admin:
        assert admin.get("/v1/clusters").json() == []


def test_clusters_create_to_a_dangling_link_registers_nothing(plane: ControlPlane, tmp_path: Path) -> None:
    """A link to a folder that is not there passed as a folder to make, in a parent that is writable (r28)."""
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "deeper")
    refused = run("clusters", "create", "--account", "acme", "--out", str(tmp_path / "out"))
    assert refused.exit_code == 2 and refused.stderr.startswith(f"error: cannot write to {tmp_path / 'out'}: ")
    assert list(plane.pipeline.audit.entries(actions=["cluster.registered", "cluster.closed"])) == []


def test_clusters_create_writes_one_private_config_per_role(plane: ControlPlane, tmp_path: Path) -> None:
    import yaml

    out_dir = tmp_path / "fresh" / "etl"  # a fresh home: the folder and its parents do not exist yet
    local = run("clusters", "create", "--account", "acme", "--name", "etl", "--out", str(out_dir))
    assert local.exit_code == 0, local.output
    assert oct(out_dir.stat().st_mode & 0o777) == "0o700"
    files = {role: out_dir / f"{role}.yaml" for role in ("scheduler", "worker", "client")}
    configs = {role: yaml.safe_load(path.read_text()) for role, path in files.items()}
    assert {oct(path.stat().st_mode & 0o777) for path in files.values()} == {"0o600"}
    for role, config in configs.items():
        tls = config["distributed"]["comm"]["tls"]
        assert set(tls) == {"ca-file", role}  # its own certificate and key, no other role's
        assert "PRIVATE KEY" in tls[role]["key"] and "BEGIN CERTIFICATE" in tls["ca-file"]
    scheduler = configs["scheduler"]["pipeline"]
    assert scheduler["account"] == "acme" and scheduler["ingest"]["token"].startswith("mp_")
    assert scheduler["user"] is None  # an account-level service cluster
    assert "pipeline" not in configs["worker"]
    worker_cert = configs["worker"]["distributed"]["comm"]["tls"]["worker"]["cert"]
    assert configs["client"]["pipeline"] == {"aws": {"worker-cert": worker_cert}}  # public, for AWS session tokens
    assert "mp_" not in files["worker"].read_text() + files["client"].read_text()
    assert "PRIVATE KEY" not in local.output and "mp_" not in local.output  # nothing secret on the terminal
    assert f"DASK_CONFIG={files['worker']} dask worker" in local.output
    again = run("clusters", "create", "--account", "acme", "--out", str(out_dir))
    assert again.exit_code == 2 and "already holds scheduler.yaml" in again.output
    assert run("clusters", "create", "--account", "acme").exit_code == 2  # neither --out nor --json
    owned = json.loads(run("clusters", "create", "--account", "acme", "--user", "ann", "--json").output)
    assert owned["user"] == "ann"  # the operator names the owner

    assert (
        run("login", "--url", plane.url, "--token", plane.tokens.create("member", "globex", "bob").token).exit_code == 0
    )
    remote = json.loads(run("clusters", "create", "--account", "globex", "--json").output)
    assert remote["ingest_url"] == plane.url and remote["tls"]["worker_key"]  # the whole registration
    assert remote["user"] == "bob"  # a member's cluster is theirs
    for refused in (
        run("clusters", "create", "--account", "acme", "--out", str(tmp_path / "other")),
        run("clusters", "create", "--account", "globex", "--user", "carol", "--json"),
    ):
        assert refused.exit_code == 2 and "403" in refused.output
    listed = [json.loads(line) for line in run("clusters", "list", "--json").output.splitlines()]
    assert [c["cluster_id"] for c in listed] == [remote["cluster_id"]]  # bob sees globex's cluster only


def test_clusters_create_on_a_control_plane_listening_everywhere_needs_the_url_clusters_reach(
    plane: ControlPlane, tmp_path: Path
) -> None:
    """The README's `DASK_PIPELINE__SERVER__HOST=0.0.0.0` gave clusters `ingest.url: http://0.0.0.0:PORT`,
    where a scheduler spooled for ever."""
    with dask.config.set({"pipeline.server.host": "0.0.0.0"}):
        refused = run("clusters", "create", "--account", "acme", "--json")
        assert refused.exit_code == 2 and refused.stderr.startswith("error: pipeline.api.url: set it to the URL")
        with dask.config.set({"pipeline.api.url": "https://plane.example:8800"}):
            made = run("clusters", "create", "--account", "acme", "--json")
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["ingest_url"] == "https://plane.example:8800"
    with dask.config.set({"pipeline.server.host": "::1"}):  # http://::1:8800 was no URL its plugin would take (r49)
        made = run("clusters", "create", "--account", "acme", "--json")
    ingest_url = json.loads(made.stdout)["ingest_url"]
    assert ingest_url == "http://[::1]:8800" and http_url_problem(ingest_url) is None


def test_a_cluster_whose_files_cannot_be_written_is_closed_and_leaves_no_file(
    plane: ControlPlane, tmp_path: Path
) -> None:
    """Nobody holds its token then: it must not stay open, its token valid for a month."""
    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    (out_dir / "client.yaml").symlink_to(tmp_path / "elsewhere")  # dangling: not there to the check, there to the write
    failed = run("clusters", "create", "--account", "acme", "--out", str(out_dir))
    assert failed.exit_code == 2 and "appeared while writing" in failed.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["client.yaml"] and not (tmp_path / "elsewhere").exists()
    [cluster] = [json.loads(line) for line in run("clusters", "list", "--json").output.splitlines()]
    assert cluster["state"] == "closed"
    assert all(t.revoked_at is not None for t in plane.tokens.list() if t.kind == "cluster")


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--out", "r"],
        ["audit", "verify"],
        ["audit", "export", "--out", "a"],
        ["enforce"],
        ["keys", "rotate"],
        ["tokens", "list"],
        ["tokens", "create", "--role", "admin"],
        ["init"],
        ["demo", "--tasks", "5"],  # it made the machine a second pipeline, and tokens create then ran on it
    ],
)
def test_commands_that_need_the_keys_say_where_they_run_on_a_logged_in_machine(
    plane: ControlPlane, tmp_path: Path, args: list[str]
) -> None:
    """Issue 18 case 5: they said `run metadata-pipeline init`, and init made a second, empty pipeline."""
    assert run("login", "--url", plane.url, input=plane.tokens.create("admin", user="compliance").token).exit_code == 0
    laptop = tmp_path / "laptop"
    with dask.config.set({"pipeline.home": str(laptop)}):
        result = run(*args)
    assert result.exit_code == 2
    command = " ".join(args[:2] if args[0] in ("audit", "keys", "tokens") else args[:1])
    assert f"`{command}` runs on the control-plane host" in result.output
    assert "init" not in result.output.replace("`init`", "")
    assert not laptop.exists()


@pytest.mark.parametrize("args", [["records"], ["audit", "verify"], ["enforce"], ["erase", "list"], ["init"]])
def test_commands_that_need_the_keys_say_where_they_run_on_a_cluster_host(tmp_path: Path, args: list[str]) -> None:
    """With a cluster's scheduler.yaml (no login, no master key) they made a full metadata.db in the host's
    home, then said `run metadata-pipeline init`: a second pipeline, as the design says never to make."""
    host = tmp_path / "scheduler-host"
    cluster = {"pipeline.home": str(host), "pipeline.ingest.url": "http://control-plane.invalid:8800"}
    with dask.config.set(cluster):
        result = run(*args)
    assert result.exit_code == 2
    command = " ".join(args[:2] if args[0] in ("audit", "erase") else args[:1])
    assert f"`{command}` runs on the control-plane host" in result.output and "pipeline.ingest.url" in result.output
    assert not (host / "metadata.db").exists()


def test_an_erasure_followed_through_the_api_to_its_end(plane: ControlPlane, tmp_path: Path) -> None:
    """Issue 18 cases 1 and 6: `erase status` crashed on final_at; `tokens list` showed an erased token active."""
    from pipeline.retention.requests import process_pending

    ann = plane.tokens.create("member", "acme", "ann")
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(plane.tokens.create("admin", user="compliance").token + "\n")
    assert run("login", "--url", plane.url, "--token-file", str(admin_file)).exit_code == 0
    filed = run("erase", "request", "--account", "acme", "--user", "ann", "--json")
    request_id = json.loads(filed.output)["request_id"]
    [done] = process_pending(plane.pipeline)
    assert done.state == "completed"
    status = run("erase", "status", request_id)
    assert status.exit_code == 0, status.output
    assert "completed" in status.output and "final on 20" in status.output
    rows = {
        json.loads(line)["token_id"]: json.loads(line) for line in run("tokens", "list", "--json").output.splitlines()
    }
    assert rows[ann.token_id]["state"] == "erased"
    assert f"{ann.token_id}  member  ended: erased" in run("tokens", "list").output


def test_login_reads_the_token_from_standard_input_or_a_file(plane: ControlPlane, tmp_path: Path) -> None:
    """Issue 18 case 8: the token was an argument only, visible in ps and shell history."""
    token = plane.tokens.create("member", "acme", "ann").token
    assert run("login", "--url", plane.url, input=f"{token}\n").exit_code == 0
    token_file = tmp_path / "token"
    token_file.write_text(token)
    assert run("login", "--url", plane.url, "--token-file", str(token_file), "--json").exit_code == 0
    empty = run("login", "--url", plane.url, input="\n")
    assert empty.exit_code == 2 and "no token given" in empty.output
    missing = run("login", "--url", plane.url, "--token-file", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_a_member_follows_their_own_erasure_after_it_ended_their_token(plane: ControlPlane, user_home: Path) -> None:
    """Issue 18 case 6: once the erasure completed, the requester's token was refused and they lost sight of it."""
    from pipeline.retention.requests import process_pending

    assert run("login", "--url", plane.url, input=plane.tokens.create("member", "acme", "ann").token).exit_code == 0
    filed = run("erase", "request", "--account", "acme", "--user", "ann")
    assert filed.exit_code == 0, filed.output
    request_id = filed.stdout.strip()
    receipt = user_home / f".config/metadata-pipeline/receipts/{request_id}.yaml"
    assert oct(receipt.stat().st_mode & 0o777) == "0o600" and "mr_" not in filed.stdout
    [done] = process_pending(plane.pipeline)
    assert done.state == "completed"
    refused = run("records")
    assert refused.exit_code == 2 and "401" in refused.output  # the erasure ended the token
    status = run("erase", "status", request_id)
    assert status.exit_code == 0, status.output
    assert "completed" in status.output and "final on 20" in status.output
    wrong = httpx.get(f"{plane.url}/v1/erasure-requests/{request_id}/receipt", headers={"Receipt-Token": "mr_x"})
    assert wrong.status_code == 404
    token = {"Receipt-Token": yaml.safe_load(receipt.read_text())["receipt_token"]}
    not_ascii = httpx.get(f"{plane.url}/v1/erasure-requests/%C3%A9/receipt", headers=token)
    assert not_ascii.status_code == 404, not_ascii.text  # was a 500


def test_a_member_closes_their_clusters_and_only_theirs(plane: ControlPlane) -> None:
    """Issue 18 case 3: a cluster's owner had no way to close it or revoke its token; another member of
    the account may not close it either."""
    from pipeline.server.auth import TokenStore

    assert run("login", "--url", plane.url, input=plane.tokens.create("member", "acme", "ann").token).exit_code == 0
    mine = json.loads(run("clusters", "create", "--account", "acme", "--json").output)
    assert run("login", "--url", plane.url, input=plane.tokens.create("member", "globex", "gil").token).exit_code == 0
    other = run("clusters", "close", mine["cluster_id"])
    assert other.exit_code == 2 and "404" in other.output
    assert run("login", "--url", plane.url, input=plane.tokens.create("member", "acme", "bob").token).exit_code == 0
    colleague = run("clusters", "close", mine["cluster_id"])  # bob sees ann's cluster listed, may not close it
    assert colleague.exit_code == 2 and "403" in colleague.output and "owner" in colleague.output
    assert json.loads(run("clusters", "list", "--json").output)["state"] == "open"
    assert run("login", "--url", plane.url, input=plane.tokens.create("member", "acme", "ann").token).exit_code == 0
    closed = run("clusters", "close", mine["cluster_id"])
    assert closed.exit_code == 0, closed.output
    assert f"cluster {mine['cluster_id']} closed; its token is revoked" in closed.output
    [listed] = [json.loads(line) for line in run("clusters", "list", "--json").output.splitlines()]
    assert (listed["state"], listed["last_contact_at"]) == ("closed", None)
    revoked = {t.token_id: t.revoked_at for t in TokenStore(plane.pipeline).list()}
    assert revoked[mine["token_id"]] is not None
    text = run("clusters", "list").output
    assert "closed" in text and "last contact never" in text


def test_an_account_level_cluster_is_closed_by_an_admin_not_by_a_member(plane: ControlPlane) -> None:
    with plane.admin() as admin:
        shared = admin.post("/v1/clusters", json={"account": "acme"}).json()  # no user: a service cluster
    with plane.client(plane.tokens.create("member", "acme", "ann").token) as ann:
        refused = ann.post(f"/v1/clusters/{shared['cluster_id']}/close")
    assert refused.status_code == 403, refused.text
    with plane.admin() as admin:
        assert admin.post(f"/v1/clusters/{shared['cluster_id']}/close").status_code == 204


def test_a_cluster_token_closing_another_accounts_cluster_gets_404_as_for_an_unknown_id(plane: ControlPlane) -> None:
    """It was 403 ("its own cluster only"), where the contract makes another account's cluster 404 (r43); another
    cluster of its own account stays 403."""
    with plane.admin() as admin:
        acme, acme_too, globex = (
            admin.post("/v1/clusters", json={"account": a}).json() for a in ("acme",) * 2 + ("globex",)
        )
    with plane.client(globex["token"]) as cluster:
        assert_problem(cluster.post(f"/v1/clusters/{acme['cluster_id']}/close"), 404)
        assert_problem(cluster.post("/v1/clusters/cluster-000000000000/close"), 404)
    with plane.client(acme_too["token"]) as cluster:
        assert_problem(cluster.post(f"/v1/clusters/{acme['cluster_id']}/close"), 403)
        assert cluster.post(f"/v1/clusters/{acme_too['cluster_id']}/close").status_code == 204


def test_an_owner_closes_a_cluster_registered_for_her_name_typed_in_another_form(plane: ControlPlane) -> None:
    """josé (composed) was refused closing the cluster an admin registered for jose\u0301 (decomposed): one
    name to ingest and erasure, two to the owner check."""
    with plane.admin() as admin:
        registered = admin.post("/v1/clusters", json={"account": "acme", "user": "jose\u0301"}).json()
    with plane.client(plane.tokens.create("member", "acme", "jos\u00e9").token) as jose:
        assert jose.post(f"/v1/clusters/{registered['cluster_id']}/close").status_code == 204


def test_a_malformed_saved_token_is_never_quoted_in_the_error(plane: ControlPlane) -> None:
    """httpx refuses a header holding a newline, and its message quoted the header: the token."""
    from pipeline.apiclient import ApiClient, Credentials
    from pipeline.errors import ApiError

    with (
        ApiClient(Credentials(plane.url, "mp_" + "s" * 43 + "\nmp_" + "t" * 43)) as client,
        pytest.raises(ApiError, match="a header is malformed") as refused,
    ):
        client.json("GET", "/v1/whoami")
    assert "sss" not in str(refused.value) and "ttt" not in str(refused.value)


def test_a_saved_token_that_is_not_ascii_is_one_line_never_quoted(plane: ControlPlane) -> None:
    """A token pasted from a web page with a non-breaking space: httpx's encoder raised, a traceback."""
    from pipeline.apiclient import ApiClient, Credentials
    from pipeline.errors import ApiError

    with pytest.raises(ApiError, match="a header is malformed .*one line of ASCII") as refused:
        ApiClient(Credentials(plane.url, "mp_\u00a0" + "s" * 42))
    assert "sss" not in str(refused.value)


def test_clusters_list_shows_an_erased_accounts_cluster_without_a_name(plane: ControlPlane, tmp_path: Path) -> None:
    """Its account's name is gone with the erasure: the text line said `None` where `-` stands for it."""
    from pipeline.retention.requests import file_request, process_pending

    assert run("login", "--url", plane.url, "--token", plane.tokens.create("admin", user="ops").token).exit_code == 0
    made = json.loads(run("clusters", "create", "--account", "acme", "--name", "etl", "--json").output)
    file_request(plane.pipeline, "acme")
    process_pending(plane.pipeline)
    listed = run("clusters", "list")
    assert listed.exit_code == 0, listed.output
    cluster_id, _state, account, name, *_when = listed.stdout.split()
    assert (cluster_id, account, name) == (made["cluster_id"], "-", "-")


def test_clusters_list_json_is_the_same_logged_in_or_not(plane: ControlPlane) -> None:
    """Through the API its times ended in ``Z``, on the control plane in ``+00:00``: a script comparing or
    parsing them got other strings on a logged-in host (r42)."""
    made = json.loads(run("clusters", "create", "--account", "acme", "--name", "etl", "--json").output)
    assert run("clusters", "close", made["cluster_id"]).exit_code == 0  # a closed_at too
    local = run("clusters", "list", "--json")
    assert run("login", "--url", plane.url, "--token", plane.tokens.create("admin", user="ops").token).exit_code == 0
    through_api = run("clusters", "list", "--json")
    assert through_api.exit_code == local.exit_code == 0, through_api.output
    assert through_api.stdout == local.stdout
    made_through_api = json.loads(run("clusters", "create", "--account", "acme", "--json").output)  # r46
    assert made["expires_at"].endswith("+00:00") and made_through_api["expires_at"].endswith("+00:00")
    [listed] = [json.loads(line) for line in local.stdout.splitlines()]
    assert listed["closed_at"].endswith("+00:00") and listed["last_contact_at"] is None


@pytest.mark.parametrize("bundle", ["missing", "no certificate"])
def test_a_trust_bundle_that_cannot_be_loaded_is_named(
    bundle: str, plane: ControlPlane, user_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SSL_CERT_FILE`` is how the README has people and schedulers trust a private CA: one that does not exist,
    or holds no certificate, was "[Errno 2] No such file or directory" for every command, and the same bare line
    in a scheduler's log while it spooled on (r38)."""
    path = tmp_path / "ca-bundle.pem"
    if bundle == "no certificate":
        path.write_text("not a certificate\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    token = plane.tokens.create("member", "acme", "ann").token
    line = one_line(run("login", "--url", plane.url, "--token", token))
    assert line.startswith(f"error: cannot load the certificates to trust (SSL_CERT_FILE={path}): "), line
    assert not (user_home / ".config/metadata-pipeline").exists()
    key = load_public_key(plane.pipeline.intake_public_key)
    delivery = HTTPDelivery(plane.url, token, key)
    with pytest.raises(ConfigError, match=rf"^cannot load the certificates to trust \(SSL_CERT_FILE={path}\): "):
        delivery.deliver(SpooledBatch("b-1", seal_batch(key, "b-1", [make_record()])))
