"""No plaintext account name, username or e-mail in any file under the home folder or any table."""

from __future__ import annotations

from pathlib import Path

import dask.config
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster, wait
from sqlalchemy import select

from pipeline.cli import main
from pipeline.config import Settings
from pipeline.db import engine_for, metadata
from pipeline.runtime import Pipeline

SECRETS = [b"Plaintext Corp", b"ann.lee", b"ann.lee@plaintext-corp.test"]


@pytest.fixture(params=["sqlite", "postgresql"])
def long_term_url(request: pytest.FixtureRequest, home: Path) -> str:
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else f"sqlite:///{home}/metadata.db"


def _table_bytes(url: str) -> bytes:
    """Every value of every table of the metadata database, as bytes."""
    engine = engine_for(url)
    chunks = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                chunks += [v if isinstance(v, bytes) else str(v).encode() for v in row]
    return b"\0".join(chunks)


def test_names_never_reach_files_or_tables(home: Path, long_term_url: str) -> None:
    config = {"pipeline.account": "Plaintext Corp", "pipeline.user": "ann.lee", "pipeline.long-term.url": long_term_url}
    with dask.config.set(config):
        with (
            LocalCluster(
                n_workers=1, processes=False, dashboard_address=":0", scheduler_kwargs={"preload": ["pipeline.preload"]}
            ) as cluster,
            Client(cluster) as client,
        ):
            wait(client.map(abs, range(-50, 50)))
        result = CliRunner().invoke(
            main,
            [
                "accounts",
                "add",
                "--account",
                "Plaintext Corp",
                "--username",
                "ann.lee",
                "--email",
                "ann.lee@plaintext-corp.test",
            ],
        )
        assert result.exit_code == 0, result.output
        settings = Settings.from_config()

    records = list(Pipeline.open(settings).read_records(account="Plaintext Corp"))
    assert {r["kind"] for r in records} >= {"account", "job", "cluster_snapshot", "software_env"}
    assert {r["user"] for r in records} == {"ann.lee"}  # the names are there, inside the ciphertext

    assert home.stat().st_mode & 0o777 == 0o700  # created by the plugin: its owner only
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".seg" for p in files)
    tables = _table_bytes(long_term_url)
    assert len(tables) > 10_000
    for path, data in [*((p, p.read_bytes()) for p in files), ("the metadata tables", tables)]:
        for secret in SECRETS:
            assert secret not in data, f"{secret!r} in plaintext in {path}"
            assert secret.lower() not in data.lower(), f"{secret!r} (any case) in {path}"
