"""Upgrades lose nothing (issue 19).

``tests/fixtures/upgrade/<release>/`` holds a home written by that release's own
code (``make_fixture.py`` there says how): its SQLite database, local log store
and key files, and what the release itself read back. After ``init`` (which
runs the migrations) the current code reads every record, in both stores, with
the same counts; records the first release sealed under the account's key for a
user are re-sealed under the user's own key, so erasing that user removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner
from sqlalchemy import text, update
from test_audit_export import readme_script, verify

from pipeline.cli import main
from pipeline.db import clusters
from pipeline.retention.requests import file_request, get_request, not_final, process_pending
from pipeline.runtime import Pipeline

FIXTURES = Path(__file__).parent / "fixtures" / "upgrade"
#: the first release, the last one before issue 19, and the first as the last one upgraded it
RELEASES = ["7bcb039", "b60f8d6", "7bcb039+b60f8d6"]


def _home(release: str, tmp_path: Path) -> Path:
    """The fixture copied to a fresh home, with the modes git does not keep."""
    home = tmp_path / "home"
    shutil.copytree(FIXTURES / release, home, ignore=shutil.ignore_patterns("expected.json"))
    for path in [home, *home.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return home


def _ids(pipeline: Pipeline, store: str, account: str) -> list[str]:
    return sorted(r["record_id"] for r in pipeline.read_records(store, account=account))


@pytest.mark.parametrize("release", RELEASES)
def test_a_home_written_by_an_earlier_release_reads_back_whole_after_init(release: str, tmp_path: Path) -> None:
    expected = json.loads((FIXTURES / release / "expected.json").read_text())
    home = _home(release, tmp_path)
    with dask.config.set({"pipeline.home": str(home)}):
        result = CliRunner().invoke(main, ["init"])
        assert result.exit_code == 0, result.output
        pipeline = Pipeline.open()
        for store, accounts in expected["records"].items():
            for account, ids in accounts.items():
                assert _ids(pipeline, store, account) == ids, (store, account)

        verified = CliRunner().invoke(main, ["audit", "verify"])
        assert verified.exit_code == 0, verified.output
        entries = list(pipeline.audit.entries())
        assert entries[expected["audit"]["entries"] - 1].entry_hash == expected["audit"]["head"]
        exported = tmp_path / "export"
        assert CliRunner().invoke(main, ["audit", "export", "--out", str(exported)]).exit_code == 0
        checked = verify(readme_script(exported, tmp_path), exported)  # a third party follows any hand-over
        assert checked.returncode == 0 and checked.stdout.startswith(f"intact: {len(entries)} entries"), checked.stdout

        for request_id, filed in expected["requests"].items():  # reasons: readable while open, shredded after
            request = get_request(pipeline, request_id)
            assert request.state == filed["state"]
            assert request.reason == (filed["reason"] if filed["state"] != "completed" else None)
            assert request.receipt["reason_sha256"] == hashlib.sha256(filed["reason"].encode()).hexdigest()
            status = CliRunner().invoke(main, ["erase", "status", request_id])  # its receipt agrees with the trail
            assert status.exit_code == 0, status.output
            if filed["state"] == "completed":  # a backup from before it opens its data until the old versions retire
                assert request.final_at is not None
                assert request_id in [r.request_id for r in not_final(pipeline)]

        # ann's records are under her own key now: erasing her removes exactly them (gil's request runs too)
        file_request(pipeline, "acme", "ann")
        assert {done.state for done in process_pending(pipeline)} == {"completed"}
        gone = {"rec-04", "rec-05", "rec-06", "rec-07", "rec-10"}
        for store, accounts in expected["records"].items():
            for account, ids in accounts.items():
                assert _ids(pipeline, store, account) == sorted(set(ids) - gone), (store, account)
        assert CliRunner().invoke(main, ["audit", "verify"]).exit_code == 0


def test_init_upgrades_once_and_a_second_init_changes_nothing(tmp_path: Path) -> None:
    home = _home("7bcb039", tmp_path)
    with dask.config.set({"pipeline.home": str(home)}):
        first = CliRunner().invoke(main, ["init", "--json"])
        assert first.exit_code == 0, first.output
        assert json.loads(first.stdout)["upgraded"] == {
            "segments": {"long_term": 6, "cloud_logging": 4},  # ann, bob and gil
            "reasons": {"resealed": 1, "dropped": 1},
            "erasures_rotated": 1,  # gil's: the first release rotated no master key after an erasure
        }
        again = CliRunner().invoke(main, ["init", "--json"])
        assert again.exit_code == 0 and "upgraded" not in json.loads(again.stdout)
        pipeline = Pipeline.open()
        upgraded = json.loads(first.stdout)["upgraded"]
        assert [e.details for e in pipeline.audit.entries() if e.action == "upgrade.resealed"] == [
            {key: upgraded[key] for key in ("segments", "reasons")}
        ]
        [rotated] = [e.details for e in pipeline.audit.entries() if e.action == "key.rotated"][-1:]
        assert rotated["after_erasures"] == ["72986ebd-19b9-4e9a-865d-a9bbcdbd3727"]
        assert pipeline.keyring.key_state("deletion-reasons") == "destroyed"


def test_a_database_migrated_by_release_71832a6_upgrades(database: str) -> None:
    """That release's a8c4e2f6b371 also added ``clusters.user_ref``, later moved to a revision of its own:
    every command then failed on the duplicate column, for good."""
    pipeline = Pipeline.open(create=True)
    with pipeline.keyring.engine.begin() as conn:  # the schema as 71832a6 left it
        conn.execute(text("ALTER TABLE clusters DROP COLUMN owner_names"))
        conn.execute(text("DROP TABLE ended_jobs"))
        conn.execute(text("UPDATE alembic_version SET version_num = 'a8c4e2f6b371'"))
    pipeline.close()
    result = CliRunner().invoke(main, ["init"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["clusters", "list"]).exit_code == 0


def test_an_owned_clusters_name_and_image_from_an_earlier_release_go_with_her_erasure(database: str) -> None:
    """Releases before owners had names of their own kept a cluster's name and image with the account's:
    after ``init`` and ann's erasure every member of acme still listed them."""
    from pipeline.server.clusters import ClusterRegistry
    from pipeline.server.names import NameBox

    pipeline = Pipeline.open(create=True)
    registry = ClusterRegistry(pipeline)
    cluster = registry.register("acme", "http://control-plane.invalid", user="ann", name="ann-secret", image="ann/i:1")
    earlier = {"account": "acme", "name": "ann-secret", "image": "ann/i:1"}  # as those releases sealed them
    names = NameBox(pipeline.keyring).seal(cluster.cluster_id, earlier, subject_ref=pipeline.subject_ref("acme"))
    with pipeline.keyring.engine.begin() as conn:
        conn.execute(update(clusters).values(names=names, owner_names=None))
    pipeline.close()

    upgraded = CliRunner().invoke(main, ["init", "--json"])
    assert json.loads(upgraded.stdout)["upgraded"] == {"cluster_names": 1}
    again = CliRunner().invoke(main, ["init", "--json"])
    assert "upgraded" not in json.loads(again.stdout)
    pipeline = Pipeline.open()
    registry = ClusterRegistry(pipeline)
    assert [(c["account"], c["name"], c["image"]) for c in registry.list()] == [("acme", "ann-secret", "ann/i:1")]
    file_request(pipeline, "acme", "ann")
    assert [done.state for done in process_pending(pipeline)] == ["completed"]
    assert [(c["account"], c["name"], c["image"]) for c in registry.list()] == [("acme", None, None)]
    pipeline.close()


_KILLED_AFTER_DDL = """
import os, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

done = 0

@event.listens_for(Engine, "after_cursor_execute")
def killed(conn, cursor, statement, *args):
    global done
    if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
        done += 1
        if done == int(sys.argv[1]):
            os._exit(137)

from pipeline.cli import main
main(["init"])
"""


@pytest.mark.parametrize("killed_after", [1, 5])
def test_an_upgrade_killed_mid_migration_is_taken_up_by_the_next_init(killed_after: int, tmp_path: Path) -> None:
    """SQLite's driver ran the migrations' DDL outside a transaction: killed after its first statements,
    the database was left half migrated, and every command failed on a duplicate column for good."""
    expected = json.loads((FIXTURES / "b60f8d6" / "expected.json").read_text())
    home = _home("b60f8d6", tmp_path)
    env = {**os.environ, "DASK_PIPELINE__HOME": str(home)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_DDL, str(killed_after)], env=env, check=False)
    assert killed.returncode == 137
    with dask.config.set({"pipeline.home": str(home)}):
        result = CliRunner().invoke(main, ["init"])
        assert result.exit_code == 0, result.output
        pipeline = Pipeline.open()
        for account, ids in expected["records"]["long_term"].items():
            assert _ids(pipeline, "long_term", account) == ids
        pipeline.close()
