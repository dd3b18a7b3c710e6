"""ended_jobs: a job whose end was stored is never recorded lost after, whichever replica admits what first

Revision ID: d9e3b7a1c604
Revises: c2e8a4d6f153
Create Date: 2026-12-07 19:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d9e3b7a1c604"
down_revision: str | Sequence[str] | None = "c2e8a4d6f153"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "ended_jobs",
        sa.Column("cluster_id", sa.String(64), primary_key=True),
        sa.Column("record_id", sa.String(32), primary_key=True),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("ended_jobs")
