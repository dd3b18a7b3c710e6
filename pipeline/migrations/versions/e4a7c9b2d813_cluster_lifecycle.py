"""clusters.last_contact_at, lost_at and running: a cluster's lifecycle (open, closed, lost)

Revision ID: e4a7c9b2d813
Revises: 9d4f2a6c1e37
Create Date: 2026-12-06 05:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.db

revision: str = "e4a7c9b2d813"
down_revision: str | Sequence[str] | None = "9d4f2a6c1e37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("last_contact_at", pipeline.db.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lost_at", pipeline.db.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("running", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("running")
        batch.drop_column("lost_at")
        batch.drop_column("last_contact_at")
