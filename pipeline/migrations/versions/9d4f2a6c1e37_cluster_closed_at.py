"""clusters.closed_at: a cluster whose plugin closed and gave up its token

Revision ID: 9d4f2a6c1e37
Revises: c1d2e3f4a5b6
Create Date: 2026-11-30 13:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.db

revision: str = "9d4f2a6c1e37"
down_revision: str | Sequence[str] | None = "c1d2e3f4a5b6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("closed_at", pipeline.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("closed_at")
