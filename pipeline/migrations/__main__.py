"""``python -m pipeline.migrations MESSAGE``: autogenerate a revision against a scratch SQLite database."""

from __future__ import annotations

import sys
import tempfile

from alembic import command

from pipeline.db import alembic_config, engine_for

with tempfile.TemporaryDirectory() as scratch, engine_for(f"sqlite:///{scratch}/scratch.db").begin() as conn:
    config = alembic_config(conn)
    command.upgrade(config, "head")
    script = command.revision(config, message=" ".join(sys.argv[1:]) or "schema change", autogenerate=True)
print(f"now set SCHEMA_HEAD in pipeline/db.py to {getattr(script, 'revision', '?')!r}")
