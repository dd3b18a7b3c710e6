"""Alembic environment: migrations run on the connection pipeline.db hands over."""

from __future__ import annotations

from alembic import context

from pipeline.db import include_in_migrations, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection, target_metadata=metadata, render_as_batch=True, include_name=include_in_migrations
)
with context.begin_transaction():
    context.run_migrations()
