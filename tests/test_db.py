"""The metadata database: migrations match the tables, concurrent start-ups, UTC on every dialect,
pooled PostgreSQL connections that die while idle."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from tcpproxy import TCPProxy

from pipeline.db import (
    SCHEMA_HEAD,
    alembic_config,
    create_schema,
    engine_for,
    include_in_migrations,
    leases,
    metadata,
    reading,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/m.db"


def test_schema_head_names_the_newest_migration() -> None:
    """create_schema skips alembic when the database is at SCHEMA_HEAD: a new migration must move it."""
    head = ScriptDirectory.from_config(alembic_config(None)).get_current_head()
    assert head == SCHEMA_HEAD, f"set SCHEMA_HEAD in pipeline/db.py to {head!r}"


def test_migrations_create_exactly_the_declared_tables(database_url: str) -> None:
    engine = engine_for(database_url)
    create_schema(engine)
    create_schema(engine)  # idempotent
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": include_in_migrations})
        assert compare_metadata(context, metadata) == [], (
            "pipeline/db.py changed without a migration: run .venv/bin/python -m pipeline.migrations 'what changed'"
        )


def test_concurrent_first_start_ups_agree_on_one_schema(database_url: str) -> None:
    code = f"from pipeline.db import create_schema, engine_for; create_schema(engine_for({database_url!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


def test_datetimes_come_back_utc_aware(database_url: str) -> None:
    engine = engine_for(database_url)
    create_schema(engine)
    moment = datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(leases.insert().values(name="x", holder="h", expires_at=moment))
        assert conn.execute(select(leases.c.expires_at)).scalar_one() == moment


def test_a_pooled_postgres_connection_dropped_while_idle_is_replaced_unnoticed(postgres_url: str) -> None:
    """A server restart or a dropped link kills the pool's idle connections: the next read gets a live one."""
    url = make_url(postgres_url)
    proxy = TCPProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        engine = engine_for(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
        with reading(engine, "a read") as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        proxy.cut()  # the pooled connection is reset
        proxy.restore()
        time.sleep(1.1)  # idle past the ping threshold (pipeline.db._PING_AFTER_IDLE)
        with reading(engine, "a read after the drop") as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
        engine.dispose()
    finally:
        proxy.close()
