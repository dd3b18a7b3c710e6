"""lost_jobs: a job recorded lost is stored once, though its end record arrives later (a spool replayed)

Revision ID: a8c4e2f6b371
Revises: f7b3d1e5a920
Create Date: 2026-12-06 22:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a8c4e2f6b371"
down_revision: str | Sequence[str] | None = "f7b3d1e5a920"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "lost_jobs",
        sa.Column("cluster_id", sa.String(64), primary_key=True),
        sa.Column("record_id", sa.String(32), primary_key=True),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("lost_jobs")
