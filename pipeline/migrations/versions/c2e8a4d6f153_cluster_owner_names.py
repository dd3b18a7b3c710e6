"""clusters.owner_names: an owned cluster's name and image are sealed under its owner's key

Revision ID: c2e8a4d6f153
Revises: b5d1f3a7c902
Create Date: 2026-12-06 22:50:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c2e8a4d6f153"
down_revision: str | Sequence[str] | None = "b5d1f3a7c902"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.add_column(sa.Column("owner_names", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("clusters") as batch:
        batch.drop_column("owner_names")
