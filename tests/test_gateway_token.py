"""A ``gateway`` token (a dask-gateway server's): registers clusters of its accounts, closes its own, nothing else."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from controlplane import ControlPlane, serving

from pipeline.cli import main
from pipeline.runtime import Pipeline


@pytest.fixture
def plane(pipeline: Pipeline) -> Iterator[ControlPlane]:
    """The API over SQLite and PostgreSQL (``tokens create`` runs on the same database)."""
    with serving(pipeline) as plane:
        yield plane


def gateway(plane: ControlPlane, *accounts: str) -> tuple[str, str]:
    """A gateway token issued by ``tokens create --role gateway`` (its id and the token)."""
    args = [
        "tokens",
        "create",
        "--role",
        "gateway",
        "--json",
        *(a for account in accounts for a in ("--account", account)),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    issued = json.loads(result.stdout)
    assert (issued["kind"], issued["accounts"], issued["account"], issued["user"]) == (
        "gateway",
        list(accounts),
        None,
        None,
    )
    return issued["token_id"], issued["token"]


def test_a_gateway_registers_for_its_accounts_naming_the_owner_and_gets_no_tls(plane: ControlPlane) -> None:
    _, token = gateway(plane, "acme", "globex")
    with plane.client(token) as gw:
        made = gw.post("/v1/clusters", json={"account": "globex", "user": "bob", "name": "dask-1"})
        anonymous = gw.post("/v1/clusters", json={"account": "acme"})
        other = gw.post("/v1/clusters", json={"account": "initech", "user": "eve"})
    assert made.status_code == 201, made.text
    assert (made.json()["account"], made.json()["user"], made.json()["tls"]) == ("globex", "bob", {})
    assert anonymous.status_code == 400
    assert other.status_code == 403
    with plane.member("globex", "bob") as bob:
        (listed,) = bob.get("/v1/clusters").json()
    assert (listed["cluster_id"], listed["name"], listed["state"]) == (made.json()["cluster_id"], "dask-1", "open")


def test_a_gateway_for_any_account_registers_anywhere(plane: ControlPlane) -> None:
    _, token = gateway(plane, "*")
    with plane.client(token) as gw:
        made = gw.post("/v1/clusters", json={"account": "initech", "user": "eve"})
    assert made.status_code == 201 and made.json()["user"] == "eve"


def test_a_gateway_reads_nothing_files_nothing_and_closes_only_what_it_registered(plane: ControlPlane) -> None:
    _, token = gateway(plane, "*")
    _, other_token = gateway(plane, "*")
    with plane.member("acme", "ann") as ann:
        members = ann.post("/v1/clusters", json={"account": "acme"}).json()["cluster_id"]
    with plane.client(token) as gw, plane.client(other_token) as other_gw:
        own = gw.post("/v1/clusters", json={"account": "acme", "user": "ann"}).json()["cluster_id"]
        refused = {
            "records": gw.get("/v1/records").status_code,
            "clusters": gw.get("/v1/clusters").status_code,
            "envs": gw.get("/v1/software-envs").status_code,
            "erasure": gw.post("/v1/erasure-requests", json={"account": "acme"}).status_code,
            "erasures": gw.get("/v1/erasure-requests").status_code,
            "metrics": gw.get("/metrics").status_code,
            "ingest": gw.post("/v1/ingest", content=b"x").status_code,
        }
        assert gw.post(f"/v1/clusters/{members}/close").status_code == 404
        assert other_gw.post(f"/v1/clusters/{own}/close").status_code == 404
        assert gw.post(f"/v1/clusters/{own}/close").status_code == 204
    assert refused == dict.fromkeys(refused, 403)
    with plane.member("acme", "ann") as ann:
        states = {c["cluster_id"]: c["state"] for c in ann.get("/v1/clusters").json()}
    assert states == {members: "open", own: "closed"}


def test_tokens_list_shows_a_gateway_token_with_its_accounts(plane: ControlPlane) -> None:
    token_id, _ = gateway(plane, "acme", "globex")
    result = CliRunner().invoke(main, ["tokens", "list", "--json"])
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if json.loads(line)["token_id"] == token_id]
    assert (row["kind"], row["accounts"], row["state"]) == ("gateway", ["acme", "globex"], "active")
    text = CliRunner().invoke(main, ["tokens", "list"]).stdout
    assert "gateway" in text and "acme globex" in text


@pytest.mark.parametrize(
    "args",
    [
        ["--role", "gateway"],
        ["--role", "gateway", "--account", "acme", "--user", "gw"],
        ["--role", "member", "--account", "a", "--account", "b", "--user", "u"],
    ],
)
def test_a_gateway_token_needs_accounts_and_nothing_else(home: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["tokens", "create", *args])
    assert result.exit_code == 2, result.output


def test_a_gateway_whose_token_file_was_replaced_closes_what_it_registered_before(
    plane: ControlPlane, tmp_path: Path
) -> None:
    """The token file is read at each registration, so it may be replaced without a restart; but only the
    gateway token that registered a cluster closes it, and a cluster started before the rotation stayed open
    when the gateway stopped it (r26). The gateway closes it with the cluster's own token, held for its life."""
    from pipeline.errors import ApiError
    from pipeline.integrations.gateway import GatewaySettings

    token_file = tmp_path / "gateway.token"
    token_file.write_text(gateway(plane, "acme")[1])
    token_file.chmod(0o600)
    settings = GatewaySettings(plane.url, token_file, "{user}", tmp_path / "clusters")
    with settings._client:  # the gateway's one client, for its life
        registration = settings.register("acme", "dask-1")
        token_file.write_text(gateway(plane, "acme")[1])  # rotated
        with pytest.raises(ApiError) as refused:
            settings.close(registration["cluster_id"])
        assert refused.value.status == 404
        settings.close(registration["cluster_id"], registration["token"])
    with plane.admin() as admin:
        (listed,) = admin.get("/v1/clusters").json()
    assert (listed["cluster_id"], listed["state"]) == (registration["cluster_id"], "closed")
